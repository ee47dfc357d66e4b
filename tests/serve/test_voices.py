"""The voice store (serve/voices.py), on a local folder and on S3 (moto_server on loopback): ids, ownership scopes,
size limits, and a cache that notices deletes made through another store instance (another replica or node)."""

from __future__ import annotations

import pytest
import torch

from qwen_tts_core.voice_prompt import VoiceClonePromptItem
from serve.voices import ANYONE, MAX_VOICE_BYTES, VoiceStore

ALICE, BOB = "a" * 32, "b" * 32


def _item(seed: int = 0) -> VoiceClonePromptItem:
    g = torch.Generator().manual_seed(seed)
    return VoiceClonePromptItem(ref_code=torch.randint(0, 2048, (20, 16), generator=g),
                                ref_spk_embedding=torch.randn(64, generator=g), x_vector_only_mode=False,
                                icl_mode=True, ref_text="A reference.")


@pytest.fixture(params=["local", "s3"])
def stores(request, tmp_path):
    """Two stores over the same backend (as two replicas on two nodes would open it)."""
    if request.param == "local":
        return VoiceStore.from_uri(str(tmp_path / "voices")), VoiceStore.from_uri(f"file://{tmp_path}/voices")
    import boto3

    request.getfixturevalue("moto_s3")
    bucket = f"voices-{request.node.name.split('[')[0].replace('_', '-')[:40]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return VoiceStore.from_uri(f"s3://{bucket}/v"), VoiceStore.from_uri(f"s3://{bucket}/v/")


def test_owner_scopes_list_info_load_delete(stores):
    a, b = stores
    mine = a.create(_item(1), name=" alice ", model="base", owner=ALICE)
    theirs = b.create(_item(2), name="bob", model="base", owner=BOB)
    assert mine["name"] == "alice" and "owner" not in mine and mine["id"].startswith("voice_")
    assert [v["id"] for v in a.list(ALICE)] == [mine["id"]]
    assert [v["id"] for v in b.list(BOB)] == [theirs["id"]]
    assert {v["id"] for v in a.list(ANYONE)} == {mine["id"], theirs["id"]}
    for call in (lambda: b.info(mine["id"], BOB), lambda: b.load(mine["id"], BOB),
                 lambda: b.delete(mine["id"], BOB)):
        with pytest.raises(KeyError):
            call()
    item = b.load(mine["id"], ALICE)
    assert torch.equal(item.ref_code, _item(1).ref_code) and item.ref_text == "A reference."
    assert b.load(mine["id"], ANYONE) is item  # cached
    b.delete(theirs["id"], ANYONE)             # an admin may delete any voice
    assert a.list(ANYONE) == [a.info(mine["id"], ALICE)]


def test_delete_through_another_store_invalidates_the_cache(stores):
    a, b = stores
    vid = a.create(_item(3), name="shared", model="base", owner=ALICE)["id"]
    assert b.load(vid, ALICE) is not None and b.load(vid, ALICE) is b.load(vid, ALICE)  # b caches it
    a.delete(vid, ALICE)
    with pytest.raises(KeyError):
        b.load(vid, ALICE)
    with pytest.raises(KeyError):
        a.delete(vid, ALICE)
    assert b.list(ANYONE) == []


def test_info_through_another_store_sees_the_delete(stores):
    """Review finding (tenancy 4): with two ingress replicas (two stores), GET of a voice deleted through the other
    one still answered 200 from the info cache; `load` re-checked existence, `info` did not."""
    a, b = stores
    vid = a.create(_item(4), name="gone", model="base", owner=ALICE)["id"]
    assert b.info(vid, ALICE)["id"] == vid          # b caches its info
    a.delete(vid, ALICE)
    with pytest.raises(KeyError):
        b.info(vid, ALICE)
    with pytest.raises(KeyError):
        b.delete(vid, ALICE)


def test_the_info_cache_evicts_least_recently_used(monkeypatch, tmp_path):
    """Review finding (tenancy 8): past 16 * CACHE_ITEMS infos the cache was wiped (`clear()`), so with more voices
    than that no listing stayed warm (5000 voices: ~100 ms per listing on a local folder, one ranged GET per voice on
    S3). Now it drops the least recently used info, and a listing evicts nothing: it reads only the headers past the
    cache's size."""
    import serve.voices as voices

    monkeypatch.setattr(voices, "CACHE_ITEMS", 1)
    monkeypatch.setattr(voices, "INFO_ITEMS", 16, raising=False)
    store = VoiceStore.from_uri(str(tmp_path / "voices"))
    vid = store.create(_item(), name="v", model="base", owner=ALICE)["id"]
    data = (tmp_path / "voices" / f"{vid}.safetensors").read_bytes()
    ids = [vid] + [store.put(data) for _ in range(19)]            # 20 voices, 16 infos cached at most
    reads = []
    real = store._read_head       # (a header is read with the file's size, one ranged GET on S3)
    monkeypatch.setattr(store, "_read_head", lambda v: reads.append(v) or real(v))
    store.list(ALICE)
    for _ in range(3):
        reads.clear()
        assert len(store.list(ALICE)) == 20
        assert len(reads) <= 4, f"a warm listing read {len(reads)} headers"
    assert len(store._infos) == 16
    uncached = next(v for v in ids if v not in store._infos)
    recent = next(iter(store._infos))            # the least recently used; touch it, then read an uncached one
    store.info(recent, ALICE)
    reads.clear()
    store.info(uncached, ALICE)
    assert reads == [uncached] and recent in store._infos and uncached in store._infos and len(store._infos) == 16


@pytest.mark.parametrize("bad", ["", "voice_123", "../voice_0000000000000000", "voice_000000000000000G", 7, None,
                                 "voice_0000000000000000/../x"])
def test_ids_are_checked(stores, bad):
    a, _ = stores
    for call in (lambda: a.load(bad, ANYONE), lambda: a.info(bad, ANYONE), lambda: a.delete(bad, ANYONE)):
        with pytest.raises(KeyError):
            call()


def test_names_sizes_and_foreign_files(stores):
    a, _ = stores
    with pytest.raises(ValueError, match="^name: "):
        a.create(_item(), name=" ", model="base", owner=ALICE)
    with pytest.raises(ValueError, match="^name: "):
        a.create(_item(), name="x" * 101, model="base", owner=ALICE)
    with pytest.raises(ValueError, match="^name: "):
        a.create(_item(), name="bad\ud800", model="base", owner=ALICE)
    with pytest.raises(ValueError, match="larger than"):
        a.put(b"\0" * (MAX_VOICE_BYTES + 1))
    with pytest.raises(ValueError, match="safetensors"):
        a.put(b"not a safetensors file at all")
    from safetensors.torch import save

    with pytest.raises(ValueError, match="not a voice prompt"):
        a.put(save({"x": torch.zeros(2)}, metadata={"format": "something-else"}))
    assert a.list(ANYONE) == []


def test_an_id_with_a_trailing_newline_is_not_an_id(tmp_path):
    """Review hardening: `^...$` let "voice_<16 hex>\\n" pass the id check (`$` matches before a final newline);
    such an id must neither be stored nor listed."""
    store = VoiceStore.from_uri(str(tmp_path / "voices"))
    vid = store.create(_item(), name="v", model="base", owner=ALICE)["id"]
    data = (tmp_path / "voices" / f"{vid}.safetensors").read_bytes()
    with pytest.raises(KeyError):
        store.put(data, "voice_0000000000000000\n")
    (tmp_path / "voices" / "voice_1111111111111111\n.safetensors").write_bytes(data)   # a foreign file
    assert [v["id"] for v in store.list(ANYONE)] == [vid]
    with pytest.raises(KeyError):
        store.info(vid + "\n", ANYONE)
