#!/usr/bin/env bash
# One-shot validation of the engine on a lent GPU (H100/H200: Python 3.12, torch 2.11, no network, nothing to
# install). Run from anywhere:   bash benchmarks/gpu_check.sh            (at most ~8 minutes)
#                                bash benchmarks/gpu_check.sh --device cpu   (dry run of every stage: tiny models,
#                                                                             the graph stand-in; ~2 minutes)
# Each stage of benchmarks/gpu_bench.py runs in its own python3 process under its own timeout (a stage that hangs or
# crashes costs only its own slot) and appends one JSON line to $OUT/gpu_check.jsonl as soon as it ends (a stage
# stopped by its timeout writes what it measured so far); its output is kept in $OUT/<stage>.log. The last line
# printed (also $OUT/gpu_check.json) is one JSON object with pass/fail per goal (a stage that did not end ok marks
# the goals it did not report "missing", counted in "failed"). OUT defaults to output/gpu_check (gitignored).
# GPU_CHECK_BUDGET_S (default 480) caps the whole run; GPU_CHECK_STAGES picks stages ("name:seconds ...", e.g.
# "versions:20 build:50 e2e:110"; stages: see benchmarks/gpu_bench.py --help).
# `build` (the 1.7B random checkpoint: CPU work only) starts with the run, beside the stages listed before it; its
# place in the list is where the run waits for it, and its seconds count from the start.
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="${2:?--device needs a value}"; shift 2 ;;
    --device=*) DEVICE="${1#*=}"; shift ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
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
BUILD_PID=""
trap '[ -n "$BUILD_PID" ] && { pkill -P "$BUILD_PID"; kill "$BUILD_PID"; } 2>/dev/null; rm -rf "$WORK"' EXIT
START=$(date +%s)
BUDGET="${GPU_CHECK_BUDGET_S:-480}"
if [ "$DEVICE" != cpu ]; then
  timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/nvidia-smi.txt" \
    2>&1 || true
fi

limit_of() {  # limit_of NAME SECONDS: SECONDS bounded by what is left of the budget (0: none left)
  local left=$(( BUDGET - ($(date +%s) - START) - 8 ))
  [ "$left" -lt "$2" ] && echo $(( left < 0 ? 0 : left )) || echo "$2"
}

record() {  # record NAME OUTFILE RC LIMIT: the stage's JSON line into $RES, or the line saying why there is none
  local name="$1"
  if grep -q "\"stage\": \"$name\"" "$2" 2>/dev/null; then
    grep "\"stage\": \"$name\"" "$2" >> "$RES"
  else
    echo "{\"stage\": \"$name\", \"ok\": false, \"error\": \"exit code $3 (124: killed after ${4}s)\"}" >> "$RES"
  fi
}

run_stage() {  # run_stage NAME LIMIT OUTFILE: one stage in its own process under its own timeout (SIGTERM: the
  # stage writes what it has; SIGKILL 5 s later)
  GPU_CHECK_STAGE_LIMIT_S="$2" timeout -k 5 "$2" python3 benchmarks/gpu_bench.py --stage "$1" --device "$DEVICE" \
    --out "$3" --work "$WORK"
}

stage() {  # stage NAME SECONDS: run it, bounded by its own limit and by what is left of the budget
  local name="$1" limit rc
  if [ "$name" = build ] && [ -n "$BUILD_PID" ]; then   # started at the beginning: wait for it here
    echo "== build (started with the run, up to ${BUILD_LIMIT}s)" >&2
    wait "$BUILD_PID"; BUILD_PID=""
    cat "$OUT/build.log" >&2
    record build "$WORK/build.jsonl" "$(cat "$WORK/build.rc" 2>/dev/null || echo 1)" "$BUILD_LIMIT"
    return
  fi
  limit=$(limit_of "$name" "$2")
  if [ "$limit" -lt 5 ]; then
    echo "{\"stage\": \"$name\", \"ok\": false, \"error\": \"skipped: no time left in the budget\"}" >> "$RES"
    return
  fi
  echo "== $name (up to ${limit}s)" >&2
  run_stage "$name" "$limit" "$WORK/$name.jsonl" 2>&1 | tee "$OUT/$name.log" >&2
  rc=${PIPESTATUS[0]}
  record "$name" "$WORK/$name.jsonl" "$rc" "$limit"
}

if [ "$DEVICE" = cpu ]; then
  DEFAULT_STAGES="versions:30 tiny:80 build:90 parity:60 timings:90 e2e:100 compile:150 e2e_compiled:120"
else  # 8 minutes: the production path (plain ops, graphs) first, compiled ops last (e2e_compiled: GPU_CHECK_STAGES)
  # versions and tiny run beside the build (slots from the start: 150 s); their slots cost nothing unless used
  DEFAULT_STAGES="versions:40 tiny:90 build:150 parity:40 e2e:120 timings:80 compile:90"
fi
STAGES="${GPU_CHECK_STAGES:-$DEFAULT_STAGES}"
seconds() { [ "${1#*:}" != "$1" ] && echo "${1#*:}" || echo 60; }
for s in $STAGES; do
  if [ "${s%%:*}" = build ]; then
    BUILD_LIMIT=$(limit_of build "$(seconds "$s")")
    ( run_stage build "$BUILD_LIMIT" "$WORK/build.jsonl" > "$OUT/build.log" 2>&1; echo $? > "$WORK/build.rc" ) &
    BUILD_PID=$!
    break
  fi
done
for s in $STAGES; do
  stage "${s%%:*}" "$(seconds "$s")"
done
# the summary imports no torch (see gpu_bench.py); should it fail all the same, the last line still says so
python3 benchmarks/gpu_bench.py --summary "$RES" > "$OUT/gpu_check.json" 2> "$OUT/summary.log" \
  || echo '{"benchmark": "gpu_check", "all_ok": false, "error": "the summary failed (summary.log); per stage: gpu_check.jsonl"}' \
  > "$OUT/gpu_check.json"
cat "$OUT/gpu_check.json"
