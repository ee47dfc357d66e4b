#!/usr/bin/env bash
# One-shot GPU check for a lent H100/H200 machine (no network; python 3.12, torch 2.11, transformers 5.17 there).
# Runs from the repository root with nothing installed: PYTHONPATH=. ; finishes within ~8 minutes.
# Writes the JSON to $OUT/gpu_check.json when $OUT is set; the last stdout line is the JSON.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python - <<'PY'
import importlib
for m in ("torch", "transformers", "safetensors", "tokenizers", "numpy"):
    mod = importlib.import_module(m)
    print(m, getattr(mod, "__version__", "?"))
PY
timeout "${GPU_CHECK_TIMEOUT:-470}" python benchmarks/gpu_bench.py --device cuda --sizes "${SIZES:-0.6b,1.7b}" \
  --frames "${FRAMES:-48}" --concurrency "${CONCURRENCY:-1,8,32,64}" | tee /tmp/gpu_check.out
if [ -n "${OUT:-}" ]; then tail -n 1 /tmp/gpu_check.out > "$OUT/gpu_check.json"; fi
