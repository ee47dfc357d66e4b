"""Behaviour the suite did not pin, found by hand mutation testing of serve/ (each test here was seen failing on the
mutant named in its docstring and passing on the real code). No Ray: plain objects and the in-process app."""

from __future__ import annotations

import pytest
import torch

from qwen_tts_core.voice_prompt import VoiceClonePromptItem
from serve.auth import Caller, bearer_token, cross_site
from serve.metrics import ClientStreams
from serve.quotas import StreamQuota
from serve.voices import ANYONE, VoiceStore

ALICE, BOB = "a" * 32, "b" * 32


def _item() -> VoiceClonePromptItem:
    g = torch.Generator().manual_seed(0)
    return VoiceClonePromptItem(ref_code=torch.randint(0, 2048, (8, 16), generator=g),
                                ref_spk_embedding=torch.randn(64, generator=g), x_vector_only_mode=False,
                                icl_mode=True, ref_text="A reference.")


def test_the_bearer_scheme_is_matched_without_regard_to_case_and_spaces():
    """RFC 9110 11.1: the auth scheme is case-insensitive; spaces around the token are not part of it
    (mutants: a case-sensitive 'Bearer ', the token not stripped)."""
    assert bearer_token({"authorization": "bearer k1"}) == b"k1"
    assert bearer_token({"authorization": "BEARER  k1 "}) == b"k1"
    assert bearer_token({"authorization": "Basic k1"}) is None


def test_a_page_of_another_port_or_a_sibling_site_is_cross_site():
    """Sec-Fetch-Site `same-site` is another port or subdomain: not this origin (mutant: only `cross-site`
    refused). An Origin's port is dropped only when it is its own scheme's default: a plain-http page on port 443
    is not this service on port 80 (mutant: either default port dropped from every Origin)."""
    local = {"host": "127.0.0.1:8000"}
    assert cross_site({**local, "sec-fetch-site": "same-site"})
    assert cross_site({"origin": "http://127.0.0.1:443", "host": "127.0.0.1"})
    assert not cross_site({"origin": "http://127.0.0.1", "host": "127.0.0.1:80"})


def test_only_localhost_and_its_subdomains_count_as_a_name_dns_cannot_repoint():
    """`evil-localhost` or `notlocalhost` are DNS names like any other (mutant: any name ENDING in "localhost"
    taken as loopback, so a rebinding page at such a name passed as same-origin)."""
    for host in ("notlocalhost:8000", "evil-localhost"):
        assert cross_site({"host": host, "sec-fetch-site": "same-origin"})
    assert not cross_site({"host": "app.localhost:8000", "sec-fetch-site": "same-origin"})


def test_of_several_forwarded_hosts_the_first_is_the_one_the_browser_asked_for():
    """X-Forwarded-Host gets one value per proxy, the client's first (mutant: the last one read, so a proxy's own
    name decided, and a rebinding name that a proxy forwarded as the first was hidden behind an IP)."""
    assert not cross_site({"x-forwarded-host": "127.0.0.1:8000, proxy.internal", "origin": "http://127.0.0.1:8000"})
    assert cross_site({"x-forwarded-host": "evil.example, 127.0.0.1", "sec-fetch-site": "same-origin"})


def test_a_stream_place_counts_once_in_the_open_streams_and_gives_everything_back():
    """`Place` has ClientStreams' interface and may be handed `opened()` by more than one holder: it counts once
    (mutant: counted again on each call, the open-stream gauge never returned to 0)."""
    total = ClientStreams()
    quota = StreamQuota(1, total)
    place = quota.take(Caller(owner="k1", admin=False))
    place.opened()
    place.opened()
    assert total.count == 1
    place.closed()
    place.closed()
    assert total.count == 0 and not quota.held
    quota.take(Caller(owner="k1", admin=False)).closed()   # the key's place is free again


def test_a_voice_loaded_once_by_its_owner_stays_out_of_reach_of_another_key(tmp_path):
    """The per-process prompt cache is no way around ownership: after ALICE's request loaded her voice on this
    replica, BOB's request naming its id gets "not a stored voice" (mutant: the cached item served to any scope)."""
    store = VoiceStore(tmp_path)
    vid = store.create(_item(), name="alice", model="base", owner=ALICE)["id"]
    assert store.load(vid, ALICE) is store.load(vid, ALICE)      # cached
    with pytest.raises(KeyError):
        store.load(vid, BOB)
    assert store.load(vid, ANYONE) is not None


def test_voices_made_before_keys_were_set_are_no_key_s_but_the_admins(tmp_path):
    """A voice stored by a keyless service has owner "": once keys are configured, no API key sees it (only an
    admin key does); mutant: owner "" visible to every key."""
    store = VoiceStore(tmp_path)
    vid = store.create(_item(), name="old", model="base", owner="")["id"]
    assert store.list(ALICE) == [] and [v["id"] for v in store.list(ANYONE)] == [vid]
    for call in (store.info, store.load, store.delete):
        with pytest.raises(KeyError):
            call(vid, ALICE)
