"""The device sampler's counter-based random numbers (qwen_tts_core/generate/sampling.py): what a seeded draw is
keyed on. A seeded request gives the same codes alone or batched only because every draw's noise is a function of
(seed, frame, codebook, token id) and nothing else; these tests pin that each of the four counts, so two requests,
two frames or two codebooks never share noise. Pure tensor functions, no model."""

from __future__ import annotations

import itertools

import torch

from qwen_tts_core.generate.sampling import gumbel, noise_key, seed_key, token_hash

SEEDS = (0, 1, 2, 3, 2**31, 2**32 - 1, 2**32, 2**32 + 1, 2**33, 2**40 + 5, 2**62, 2**63 - 1)


def test_every_bit_of_a_seed_changes_its_key():
    """Seeds that differ only in their upper 32 bits (1 and 2**32 + 1), or whose halves swap (1 and 2**32), are
    different seeds: their keys, and so their audio, must differ too."""
    keys = [seed_key(s) for s in SEEDS]
    assert len(set(keys)) == len(SEEDS), dict(zip(SEEDS, keys))
    assert len({seed_key(1 << b) for b in range(63)}) == 63
    assert all(0 <= k < 2**32 for k in keys)


def test_each_frame_codebook_and_seed_has_its_own_noise_key():
    """The 16 draws of a frame (the talker's codebook 0, then 15 of the code predictor) and those of the next
    frames are keyed apart: frame*16 + codebook is the counter, never frame + codebook, and the seed's key is
    mixed in, so two requests never draw the same noise at the same frame."""
    key = torch.tensor([seed_key(7)])
    seen = {}
    for frame, cb in itertools.product(range(64), range(16)):
        k = int(noise_key(key, torch.tensor([frame]), cb))
        assert k not in seen, ((frame, cb), seen.get(k))
        seen[k] = (frame, cb)
    other = torch.tensor([seed_key(8)])
    for frame, cb in ((0, 0), (0, 1), (5, 3), (63, 15)):
        f = torch.tensor([frame])
        assert int(noise_key(key, f, cb)) != int(noise_key(other, f, cb))


def test_a_batch_of_rows_at_different_frames_keys_each_row_by_its_own_frame():
    """All of a step's code-predictor draws are keyed at once ([B, G]); each row of the batch is at its own frame
    (sessions join at different times), and its keys must be those it gets alone."""
    keys = torch.tensor([seed_key(s) for s in (3, 4, 5, 6)])
    frames = torch.tensor([0, 1, 9, 250])
    groups = torch.arange(1, 16)
    together = noise_key(keys, frames, groups)
    for b, g in itertools.product(range(4), range(15)):
        alone = noise_key(keys[b:b + 1], frames[b:b + 1], int(groups[g]))
        assert int(together[b, g]) == int(alone[0]), (b, g)


def test_the_noise_of_two_keys_is_not_the_same_values_in_another_order():
    """Each token id has its own salt mixed into the draw: with the id itself as the salt, keys that differ in low
    bits (k and k ^ 1) give the same noise values, only swapped between neighbouring ids, so two rows' draws were
    correlated. The values themselves must differ."""
    salt = token_hash(2048)
    for k in (12345, 2**31 + 7, 4096):
        a, b = gumbel(torch.tensor([k]), salt), gumbel(torch.tensor([k ^ 1]), salt)
        assert not torch.equal(a.sort().values, b.sort().values), k
    assert len(set(token_hash(4096).tolist())) == 4096


def test_the_noise_is_finite_at_the_bottom_of_its_grid():
    """The uniform behind the noise lies in (0, 1]: its grid's lowest point is 2**-25, not 0, where -log(-log(0))
    is -inf and the id could never be drawn at that key (the top, where float32 rounds to 1.0, is
    test_engine.py's). Found by hash search: a key whose draw for one token is the grid's lowest point."""
    from qwen_tts_core.generate.sampling import _M32, _mix

    salt = token_hash(64)
    tok, key = 5, None
    for start in range(0, 1 << 28, 1 << 22):
        keys = torch.arange(start, start + (1 << 22), dtype=torch.long)
        hit = ((_mix(keys ^ salt[tok]) & _M32) >> 8 == 0).nonzero()
        if len(hit):
            key = keys[hit[0]]
            break
    assert key is not None
    noise = gumbel(key, salt)
    assert torch.isfinite(noise).all() and noise[0, tok] == noise.min()
