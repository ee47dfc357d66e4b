"""Run the official qwen-tts package (the test oracle) in its own virtualenv.

Oracle scripts live beside this file; each takes plain arguments (paths, JSON) and writes its results to files
(safetensors / JSON). Nothing is pickled across the boundary.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ORACLE_DIR = Path(__file__).resolve().parent
ORACLE_VENV = Path(os.environ.get("ORACLE_VENV", ROOT / ".venv-oracle"))
ORACLE_PY = ORACLE_VENV / "bin" / "python"


def ensure_oracle() -> Path:
    """Create the oracle virtualenv when it is missing (tests/oracle/setup.sh); return its python."""
    if not ORACLE_PY.exists():
        subprocess.run(["bash", str(ORACLE_DIR / "setup.sh")], check=True, cwd=ROOT)
    return ORACLE_PY


def run_oracle(script: str, *args: str, timeout: float = 900) -> str:
    """Run `tests/oracle/<script>` with the oracle's python; return its stdout, raise with stderr on failure."""
    py = ensure_oracle()
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ORACLE_DIR / "stubs")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run(
        [str(py), str(ORACLE_DIR / script), *map(str, args)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout,
    )
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-6000:])
        raise RuntimeError(f"oracle script {script} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path
