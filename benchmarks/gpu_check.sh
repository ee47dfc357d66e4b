#!/usr/bin/env bash
# One-shot validation of the engine on a lent GPU (H100/H200: Python 3.12, torch 2.11, no network, nothing to
# install). Run from anywhere:   bash benchmarks/gpu_check.sh            (at most ~8 minutes)
#                                bash benchmarks/gpu_check.sh --device cpu   (dry run: tiny models, graph stand-in)
# Each stage of benchmarks/gpu_bench.py runs in its own python3 process under its own timeout (a stage that hangs or
# crashes costs only its own slot) and appends one JSON line to $OUT/gpu_check.jsonl as soon as it ends; the last
# line printed (also $OUT/gpu_check.json) is one JSON object with pass/fail per goal. OUT defaults to
# output/gpu_check. GPU_CHECK_BUDGET_S (default 480) caps the whole run; GPU_CHECK_STAGES picks stages
# ("name:seconds ...", e.g. "versions:20 build:50 e2e:110"; stages: see benchmarks/gpu_bench.py --help).
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="${2:?--device needs a value}"; shift 2 ;;
    --device=*) DEVICE="${1#*=}"; shift ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (use --device cuda|cpu)" >&2; exit 2 ;;
  esac
done
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 \
  TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
OUT="${OUT:-$PWD/output/gpu_check}"
mkdir -p "$OUT"
RES="$OUT/gpu_check.jsonl"
: > "$RES"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/qtts-gpu-check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
START=$(date +%s)
BUDGET="${GPU_CHECK_BUDGET_S:-480}"
if [ "$DEVICE" != cpu ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/nvidia-smi.txt" 2>&1 || true
fi

stage() {  # stage NAME SECONDS: run it, bounded by its own limit and by what is left of the budget
  local name="$1" limit="$2" left rc
  left=$(( BUDGET - ($(date +%s) - START) - 8 ))
  [ "$left" -lt "$limit" ] && limit="$left"
  if [ "$limit" -lt 5 ]; then
    echo "{\"stage\": \"$name\", \"ok\": false, \"error\": \"skipped: no time left in the budget\"}" >> "$RES"
    return
  fi
  echo "== $name (up to ${limit}s)" >&2
  timeout -k 5 "$limit" python3 benchmarks/gpu_bench.py --stage "$name" --device "$DEVICE" --out "$RES" \
    --work "$WORK" >&2
  rc=$?
  if ! tail -n 1 "$RES" | grep -q "\"stage\": \"$name\""; then
    echo "{\"stage\": \"$name\", \"ok\": false, \"error\": \"exit code $rc (124: killed after ${limit}s)\"}" >> "$RES"
  fi
}

if [ "$DEVICE" = cpu ]; then
  DEFAULT_STAGES="versions:30 tiny:80 build:90 parity:60 timings:90 e2e:100"
else  # 8 minutes: the compiled path first (plain e2e: add e2e:110, or pick with GPU_CHECK_STAGES)
  DEFAULT_STAGES="versions:20 tiny:60 build:60 parity:40 compile:90 e2e_compiled:140 timings:70"
fi
for s in ${GPU_CHECK_STAGES:-$DEFAULT_STAGES}; do
  stage "${s%%:*}" "$( [ "${s#*:}" != "$s" ] && echo "${s#*:}" || echo 60 )"
done
python3 benchmarks/gpu_bench.py --summary "$RES" | tee "$OUT/gpu_check.json"
