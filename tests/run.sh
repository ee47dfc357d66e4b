#!/usr/bin/env bash
# `make test`: the whole suite in three pytest lanes (tests/lanes.py says which test is in which): "core" and "other"
# side by side, so both cores of a small machine work, then "ray" alone (every test that uses or starts a Ray cluster,
# one at a time as before).
# Each lane writes its own log; all are printed at the end (failed lanes last, so CI's tail shows them), then one
# line per lane. The exit status is the worst lane's. Arguments go to every lane (e.g. -x, -k name); a lane whose
# tests they all deselect counts as passed. Ctrl-C or SIGTERM stops the lanes running (each pytest tears down what
# it started: the Ray head, moto_server) and skips the rest.
set -uo pipefail
set -m  # each lane in its own process group
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
TESTS="${QTTS_TESTS:-tests}"   # the suite's folder (tests/test_run_lanes.py points it at a small one)
LOGS="$(mktemp -d "${TMPDIR:-/tmp}/qtts-test.XXXXXX")"
ALL=(core other ray)  # the lanes of tests/lanes.py (LANES), in the order their logs and summaries print
# SIGINT stops a lane: restored here, since a shell that starts jobs in the background without a terminal hands
# them SIGINT ignored (CI, `make test &`).
LANE='import signal, sys, pytest; signal.signal(signal.SIGINT, signal.default_int_handler); sys.exit(pytest.main())'
declare -A RC
RUNNING=()

start() {  # start LANE: its pytest in the background, output to $LOGS/LANE.log
  # (--durations: each lane's log ends with its slowest tests, to see where the 30 minutes of `make test` go)
  QTTS_LANE="$1" "$PYTHON" -c "$LANE" -q -p tests.lanes --durations=15 --durations-min=5 "$TESTS" "${ARGS[@]}" \
    > "$LOGS/$1.log" 2>&1 &
  RUNNING+=("$!:$1")
}

finish() {  # wait for every running lane; record its exit status
  local entry rc
  for entry in "${RUNNING[@]}"; do
    wait "${entry%%:*}"
    rc=$?
    [ "$rc" -eq 5 ] && rc=0  # pytest's "no tests collected": the arguments deselected every test of this lane
    RC[${entry#*:}]=$rc
  done
  RUNNING=()
}

stop() {
  echo "qtts tests: stopping (logs in $LOGS)" >&2
  local entry
  for entry in "${RUNNING[@]}"; do kill -INT "${entry%%:*}" 2>/dev/null; done
  for entry in "${RUNNING[@]}"; do wait "${entry%%:*}"; done
  exit 130
}
trap stop INT TERM

ARGS=("$@")
echo "qtts tests: lanes core and other side by side, then ray; logs: $LOGS/<lane>.log"
start core
start other
finish
start ray
finish
trap - INT TERM

ORDER=()
for lane in "${ALL[@]}"; do [ "${RC[$lane]}" -eq 0 ] && ORDER+=("$lane"); done
for lane in "${ALL[@]}"; do [ "${RC[$lane]}" -ne 0 ] && ORDER+=("$lane"); done
for lane in "${ORDER[@]}"; do
  echo "==================== lane $lane ===================="
  cat "$LOGS/$lane.log"
done
echo "===================="
status=0
for lane in "${ALL[@]}"; do
  echo "lane $lane (exit ${RC[$lane]}): $(grep -E '(passed|failed|error|no tests ran|deselected)' \
    "$LOGS/$lane.log" | tail -1)"
  [ "${RC[$lane]}" -gt "$status" ] && status="${RC[$lane]}"
done
rm -rf "$LOGS"
exit "$status"
