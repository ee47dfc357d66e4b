"""The running service against its own OpenAPI document, fuzzed by schemathesis (real Ray Serve, tiny models):
requests made from the document, valid and deliberately invalid, and the answers checked: never a 5xx, every status
and content type documented, bodies matching their schemas, schema-invalid input refused, a 405's Allow header
true, stateful sequences (create, read, delete) consistent. `positive_data_acceptance` is left out: the document
cannot say everything the core checks (a voice must be one of the model's speakers, text needs a visible character),
so some schema-valid requests are rightly 400s."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_the_service_answers_as_its_openapi_document_says(serve_app, tmp_path):
    exe = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert exe, "schemathesis is a test dependency (pyproject.toml [test])"
    cmd = [exe, "run", f"{serve_app['url']}/openapi.json", "--checks", "all",
           "--exclude-checks", "positive_data_acceptance", "--max-examples", "15", "--seed", "20261205",
           "--workers", "1", "--request-timeout", "60", "--no-color"]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)  # cwd: its example database
    report = out.stdout + out.stderr
    assert out.returncode == 0, report[-6000:]
    assert " passed" in report and "Tested: 9" in report, report[-3000:]
