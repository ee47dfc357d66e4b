"""Behaviour of the batch jobs the suite did not pin, found by hand mutation testing of jobs/ (each test here was
seen failing on the mutant named in its docstring and passing on the real code). Plain functions, no Ray."""

from __future__ import annotations

import json

import pytest

from jobs.manifest import ManifestRecord, from_sidecar


def _sidecar(**fields) -> bytes:
    rec = ManifestRecord(id="welcome", key="prompts/welcome-0123456789abcdef0123.wav", status="ok").to_dict()
    return json.dumps({**rec, **fields}).encode()


def test_a_sidecar_is_a_written_record_only():
    """A committed output's sidecar counts (the output is reused) only when it records a written status (mutant:
    a `failed` record's sidecar taken as done, so its row was never rendered again)."""
    assert from_sidecar(_sidecar()) is not None and from_sidecar(_sidecar(status="suspect")) is not None
    assert from_sidecar(_sidecar(status="failed")) is None


@pytest.mark.parametrize("value, ok", [(2**31 - 1, True), (2**31, False), (-2**31, True), (True, False)])
def test_a_sidecar_integer_must_fit_its_column_and_not_be_a_bool(value, ok):
    """`attempts` is an int32 column: 2**31 cannot be stored (the manifest write would fail later, for the whole
    pass) and JSON `true` is no count (mutants: `<=` at the top of the range; bools taken as integers)."""
    assert (from_sidecar(_sidecar(attempts=value)) is not None) is ok
