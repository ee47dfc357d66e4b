"""POST /v1/audio/speech takes JSON only: a declared Content-Type that is not application/json (nor a `+json` type)
is a 415 naming content-type, before the body is read. text/plain and the form types are CORS "simple requests" a
web page may send to another origin without a preflight (a service without API keys synthesized for any page that
posted `{"input": ...}` as text/plain). A request without a Content-Type is still taken, as before."""

from __future__ import annotations

import pytest

from tests.serve.inproc import ingress_app

BODY = b'{"model": "nope", "input": "Hi."}'   # a JSON body that reaches the model check: a 400 naming model


class Base:
    def info(self) -> dict:
        return {"id": "base", "type": "base", "speakers": []}


def _client(monkeypatch, tmp_path):
    return ingress_app(monkeypatch, {"models": [{"name": "base", "model_type": "base"}], "max_streams_per_key": 1,
                                     "voices_uri": str(tmp_path / "voices")}, {"base": Base()})[0]


@pytest.mark.parametrize("ctype", ["text/plain", "text/plain; charset=utf-8", "application/x-www-form-urlencoded",
                                   "multipart/form-data; boundary=x", "application/jsonx", "", "+json"])
def test_a_body_not_declared_json_is_a_415(monkeypatch, tmp_path, ctype):
    client = _client(monkeypatch, tmp_path)
    with client:
        for _ in range(3):   # each gives its stream place back (max_streams_per_key is 1)
            r = client.post("/v1/audio/speech", content=BODY, headers={"Content-Type": ctype})
            err = r.json()["error"]
            assert (r.status_code, err["param"]) == (415, "content-type"), r.text
            assert "Content-Type: application/json" in err["message"], err
        r = client.post("/v1/audio/speech", content=BODY, headers={"Content-Type": "application/json"})
        assert (r.status_code, r.json()["error"]["param"]) == (400, "model"), r.text


@pytest.mark.parametrize("ctype", ["application/json", "Application/JSON; charset=utf-8",
                                   "application/merge-patch+json", None])
def test_json_or_no_content_type_is_taken(monkeypatch, tmp_path, ctype):
    client = _client(monkeypatch, tmp_path)
    headers = {} if ctype is None else {"Content-Type": ctype}
    with client:
        r = client.post("/v1/audio/speech", content=BODY, headers=headers)
        assert (r.status_code, r.json()["error"]["param"]) == (400, "model"), r.text


def test_the_openapi_document_lists_the_415(monkeypatch, tmp_path):
    client = _client(monkeypatch, tmp_path)
    with client:
        spec = client.get("/openapi.json").json()
    assert "415" in spec["paths"]["/v1/audio/speech"]["post"]["responses"]
