"""Request bodies through the real app in-process (tests/serve/inproc.py, no Ray): a body that stalls gets 408 naming
`body` after `body_timeout_s`, and a client that leaves mid-body is a 400 naming `body`, never an unhandled 500."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import pytest

from serve.metrics import http_errors
from tests.serve.inproc import asgi_call, ingress_app

JSON = {"content-type": "application/json"}
FORM = {"content-type": "multipart/form-data; boundary=B"}
BODIES = {   # route, headers, the first bytes of a body that never completes
    "speech json": ("/v1/audio/speech", JSON, b'{"input":'),
    "voices json": ("/v1/audio/voices", JSON, b'{"name": "v", '),
    "voices form": ("/v1/audio/voices", FORM, b'--B\r\nContent-Disposition: form-data; name="name"\r\n\r\nv'),
}


class Base:
    def info(self) -> dict:
        return {"id": "base", "type": "base", "speakers": []}


def _app(monkeypatch, tmp_path, **cfg):
    return ingress_app(monkeypatch, {"models": [{"name": "base", "model_type": "base"}],
                                     "voices_uri": str(tmp_path / "voices"), **cfg}, {"base": Base()})[1]


@pytest.mark.parametrize("case", BODIES)
@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_a_body_that_stalls_gets_408(monkeypatch, tmp_path, case, declared):
    """Review finding (tenancy 2): a Content-Length larger than the body sent, or a chunked body that stalls, was
    waited for with no limit (no answer after 120 s), each holding a handler and its partial body."""
    app = _app(monkeypatch, tmp_path, body_timeout_s=0.5)
    path, headers, first = BODIES[case]
    headers = {**headers, **({"content-length": "500"} if declared else {})}
    t0 = time.monotonic()
    status, answer, _ = asyncio.run(asgi_call(app, "POST", path, headers, [first], then="stall"))
    err = json.loads(answer)["error"]
    assert (status, err["param"]) == (408, "body") and "0.5 s" in err["message"], answer
    assert time.monotonic() - t0 < 5


@pytest.mark.parametrize("case", BODIES)
def test_a_client_that_leaves_mid_body_is_not_a_500(monkeypatch, tmp_path, caplog, case):
    """Review finding (tenancy 3): leaving mid-body was counted in qtts_http_errors_total{status="500"} and logged as
    an unhandled ERROR with a traceback, so anyone could inflate the 500 rate and flood the logs."""
    app = _app(monkeypatch, tmp_path)
    path, headers, first = BODIES[case]
    before = http_errors()
    with caplog.at_level(logging.ERROR):
        status, answer, _ = asyncio.run(asgi_call(app, "POST", path, {**headers, "content-length": "500"}, [first],
                                                  then="disconnect"))
    assert (status, json.loads(answer)["error"]["param"]) == (400, "body"), answer
    assert http_errors().get("500", 0) == before.get("500", 0)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("value", [0, -1.0])
def test_body_timeout_is_checked(value):
    from serve.config import ServiceConfig

    with pytest.raises(ValueError, match="body_timeout_s"):
        ServiceConfig.from_dict({"body_timeout_s": value})
