"""Stored voice files damaged in the store (no client request writes one: storage damage, or another tool), on a
local folder and on S3 (moto_server), then through the real app in-process (tests/serve/inproc.py): the listing
skips them, GET is a 409 naming `voice_id` for whom may see the voice, DELETE removes it, and to any other key it
is the 404 of a voice that does not exist."""

from __future__ import annotations

import json
import secrets

import pytest

from serve.auth import key_digest
from serve.voices import ANYONE, MAX_VOICE_BYTES, DamagedVoice, VoiceStore
from tests.serve.inproc import ingress_app
from tests.serve.test_voice_quota import Base
from tests.serve.test_voices import _item

ALICE, BOB = key_digest("key-a"), key_digest("key-b")


def _parts(data: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def _rewrite(data: bytes, change) -> bytes:
    """The same tensor bytes under a header changed by `change(header)` (its length fixed up)."""
    header, body = _parts(data)
    change(header)
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + body


def _longer_last_tensor(header: dict) -> None:
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    header[last]["data_offsets"][1] += 64


def _header_only(raw: bytes) -> bytes:
    return len(raw).to_bytes(8, "little") + raw


# damaged files whose header still names the owner: the owner sees them (409) and may delete them
OWNER_KNOWN = {
    "truncated-data": lambda d: d[:-7],
    "header-lies-about-sizes": lambda d: _rewrite(d, _longer_last_tensor),
    "trailing-bytes": lambda d: d + b"\0" * 16,
    "offsets-not-numbers": lambda d: _rewrite(d, lambda h: h["ref_code"].update(data_offsets="0-8")),
    "tensor-entry-not-an-object": lambda d: _rewrite(d, lambda h: h.update(ref_code=[1, 2])),
    "oversized": lambda d: _rewrite(d, lambda h: h["ref_code"].update(
        data_offsets=[h["ref_code"]["data_offsets"][0], MAX_VOICE_BYTES])) + b"\0" * MAX_VOICE_BYTES,
}
# damaged files whose owner cannot be read: only ANYONE (an admin key) sees them and may delete them
OWNER_UNKNOWN = {
    "empty": lambda d: b"",
    "cut-in-header": lambda d: d[:40],
    "foreign-bytes": lambda d: b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4,
    "header-not-json": lambda d: _header_only(b"{not json at all}"),
    "header-not-an-object": lambda d: _header_only(b"[1, 2, 3]"),
    "metadata-not-an-object": lambda d: _rewrite(d, lambda h: h.update(__metadata__=["owner", ALICE])),
    "metadata-not-strings": lambda d: _rewrite(d, lambda h: h["__metadata__"].update(created=5)),
    "deeply-nested-header": lambda d: _header_only(b"[" * 200_000 + b"]" * 200_000),
}
DAMAGES = {**OWNER_KNOWN, **OWNER_UNKNOWN}


@pytest.fixture(params=["local", "s3"])
def stores(request, tmp_path):
    """Two stores over the same (fresh) backend, as two processes open it."""
    if request.param == "local":
        return VoiceStore.from_uri(str(tmp_path / "voices")), VoiceStore.from_uri(str(tmp_path / "voices"))
    import boto3

    request.getfixturevalue("moto_s3")
    bucket = f"damaged-{secrets.token_hex(8)}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return VoiceStore.from_uri(f"s3://{bucket}/v"), VoiceStore.from_uri(f"s3://{bucket}/v")


def _damage(store: VoiceStore, voice_id: str, damage: str) -> None:
    store._put_bytes(voice_id, DAMAGES[damage](store._get_bytes(voice_id)))   # past every check, as damage is


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_voice_in_the_store(stores, damage):
    """Review suspicion (voices 2), reproduced: `info`/`delete` of a damaged file raised a bare ValueError (or,
    for a header that is JSON but not an object, AttributeError: the whole listing failed), so the API answered
    500 and nobody could delete the file; a truncated file or one whose header lies about sizes passed `info` and
    failed only when used. Now: DamagedVoice for whom may see it, KeyError for everyone else, skipped by listings,
    deletable."""
    a, b = stores
    vid = a.create(_item(1), name="damaged", model="base", owner=ALICE)["id"]
    kept = a.create(_item(2), name="kept", model="base", owner=ALICE)["id"]
    _damage(a, vid, damage)
    owner_known = damage in OWNER_KNOWN

    for scope in (ALICE, BOB, ANYONE):
        assert [v["id"] for v in b.list(scope)] == ([] if scope == BOB else [kept])
    for call in (b.info, b.load, b.delete):                 # another key: a voice that does not exist
        with pytest.raises(KeyError):
            call(vid, BOB)
    with pytest.raises(DamagedVoice, match=vid):             # an admin: damaged, named
        b.info(vid, ANYONE)
    if owner_known:
        for call in (b.info, b.load):
            with pytest.raises(DamagedVoice, match=vid):
                call(vid, ALICE)
        b.delete(vid, ALICE)
    else:                                                    # no owner to be read: only an admin sees it
        for call in (b.info, b.load, b.delete):
            with pytest.raises(KeyError):
                call(vid, ALICE)
        b.delete(vid, ANYONE)
    for scope in (ALICE, ANYONE):
        with pytest.raises(KeyError):
            a.info(vid, scope)
    assert [v["id"] for v in a.list(ANYONE)] == [kept] and b.load(kept, ALICE) is not None


def test_a_metadata_value_that_is_no_number_is_no_crash(tmp_path):
    """`created` not a number (another tool wrote the file) was int()-ed: GET answered 500. It is 0 now."""
    store = VoiceStore.from_uri(str(tmp_path / "voices"))
    vid = store.create(_item(), name="v", model="base", owner=ALICE)["id"]
    store._put_bytes(vid, _rewrite(store._get_bytes(vid), lambda h: h["__metadata__"].update(created="soon")))
    assert VoiceStore.from_uri(str(tmp_path / "voices")).info(vid, ALICE)["created"] == 0


A, B, ADMIN = ({"Authorization": f"Bearer {k}"} for k in ("key-a", "key-b", "key-admin"))


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_voice_over_http(monkeypatch, tmp_path, damage):
    """GET, DELETE and the listing of a damaged voice: never a 500. Its owner (or, when no owner can be read, an
    admin) gets a 409 naming `voice_id` and can DELETE it (200); another key gets exactly the 404 of a voice id that
    was never stored; every listing skips it."""
    uri = str(tmp_path / "voices")
    store = VoiceStore.from_uri(uri)
    vid = store.create(_item(1), name="damaged", model="base", owner=ALICE)["id"]
    kept = store.create(_item(2), name="kept", model="base", owner=ALICE)["id"]
    _damage(store, vid, damage)
    client, _ = ingress_app(monkeypatch, {"models": [{"name": "base", "model_type": "base"}], "voices_uri": uri,
                                          "api_keys": ["key-a", "key-b"], "admin_api_keys": ["key-admin"]},
                            {"base": Base(uri)})
    never = "voice_" + "0" * 16
    sees = A if damage in OWNER_KNOWN else ADMIN
    with client:
        for headers in (A, B, ADMIN):
            r = client.get("/v1/audio/voices", headers=headers)
            assert r.status_code == 200, r.text
            assert vid not in r.text and (kept in r.text) == (headers is not B)
        blind = [B] if sees is A else [A, B]
        for headers in blind:
            for method in ("GET", "DELETE"):
                r = client.request(method, f"/v1/audio/voices/{vid}", headers=headers)
                absent = client.request(method, f"/v1/audio/voices/{never}", headers=headers)
                assert r.status_code == 404 and r.json() == json.loads(absent.text.replace(never, vid)), r.text
        r = client.get(f"/v1/audio/voices/{vid}", headers=sees)
        err = r.json()["error"]
        assert (r.status_code, err["param"]) == (409, "voice_id") and vid in err["message"], r.text
        r = client.delete(f"/v1/audio/voices/{vid}", headers=sees)
        assert (r.status_code, r.json()) == (200, {"id": vid, "object": "voice", "deleted": True}), r.text
        assert client.get(f"/v1/audio/voices/{vid}", headers=sees).status_code == 404
        assert client.get(f"/v1/audio/voices/{kept}", headers=A).status_code == 200
