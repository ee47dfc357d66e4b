"""The running service against its own OpenAPI document, fuzzed by schemathesis (real Ray Serve, tiny models):
requests made from the document, valid and deliberately invalid, and the answers checked: never a 5xx, every status
and content type documented, bodies matching their schemas, schema-invalid input refused, a 405's Allow header
true, stateful sequences consistent; on the app with API keys also that every operation the document says needs a
key refuses requests without one (`ignored_auth`). `positive_data_acceptance` is left out: the document cannot say
everything the core checks (a voice must be one of the model's speakers, text needs a visible character), so some
schema-valid requests are rightly 400s."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest


def _fuzz(url: str, tmp_path: Path, headers: dict[str, str]) -> str:
    exe = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert exe, "schemathesis is a test dependency (pyproject.toml [test])"
    cmd = [exe, "run", f"{url}/openapi.json", "--url", url, "--checks", "all", "--exclude-checks", "positive_data_acceptance",
           "--max-examples", "15", "--seed", "20261205", "--workers", "1", "--request-timeout", "60", "--no-color"]
    for k, v in headers.items():
        cmd += ["--header", f"{k}: {v}"]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)  # cwd: its example database
    report = out.stdout + out.stderr
    assert out.returncode == 0, report[-6000:]
    assert " passed" in report and "Tested: 9" in report, report[-3000:]
    return report


@pytest.mark.slow
def test_the_service_answers_as_its_openapi_document_says(serve_app, tmp_path):
    spec = httpx.get(f"{serve_app['url']}/openapi.json", timeout=30).json()
    assert "securitySchemes" not in spec["components"]  # no keys: every caller is the anonymous admin
    _fuzz(serve_app["url"], tmp_path, {})


@pytest.mark.slow
def test_with_api_keys_every_operation_but_health_needs_one(keys_app, tmp_path):
    auth = {"Authorization": f"Bearer {keys_app['keys']['alice']}"}
    spec = httpx.get(f"{keys_app['url']}/openapi.json", headers=auth, timeout=30).json()
    assert spec["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"
    needs = {p for p, ops in spec["paths"].items() for op in ops.values() if op.get("security")}
    assert needs == set(spec["paths"]) - {"/health"}
    _fuzz(keys_app["url"], tmp_path, auth)
