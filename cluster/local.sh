#!/usr/bin/env bash
# Start or stop a one-machine Ray head on loopback, as the project's services and tests expect.
#   cluster/local.sh start   # head + dashboard (needed by `ray job submit`) on 127.0.0.1
#   cluster/local.sh stop    # stops THIS head only (its process group and the workers under it)
#   cluster/local.sh status
# Ray 2.60 on Linux silently replaces --node-ip-address=127.0.0.1 with the eth0 address unless
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0; token auth must be set identically in every process (head, drivers, CLI),
# so source `cluster/env.sh` in every shell that talks to this head.
# Each head gets its own temp dir (QTTS_RAY_TEMP_DIR) and ports (QTTS_RAY_PORT, QTTS_DASHBOARD_PORT,
# QTTS_RAY_CLIENT_PORT, QTTS_DASHBOARD_AGENT_PORT), so several heads (test sessions) can run side by side; `stop` never touches another
# Ray on the machine (no `ray stop`, which stops every Ray it finds). Keep these ports outside 10002-19999, the
# range Ray keeps for its workers (a client port of 10093 fails the start: "used by other components").
# QTTS_RAY_CPUS (default 4) and QTTS_RAY_OBJECT_STORE (bytes, default 256 MiB) size the head.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=cluster/env.sh
source "$here/env.sh"
# the project's virtualenv first, so the head (and jobs submitted to it) run the project's python
[ -d "$here/../.venv/bin" ] && export PATH="$(cd "$here/../.venv/bin" && pwd):$PATH"
RAY="${RAY:-ray}"
command -v "$RAY" >/dev/null || RAY="$here/../.venv/bin/ray"
temp_dir="${QTTS_RAY_TEMP_DIR:-${TMPDIR:-/tmp}/qtts-ray-$QTTS_RAY_PORT}"
pgid_file="$temp_dir/qtts-head.pgid"

# The head's process group and every process below it (Ray workers start their own sessions under the raylet).
head_tree() {
  ps -eo pid=,ppid=,pgid= | awk -v g="$1" '
    { pid[NR] = $1; ppid[NR] = $2; pg[NR] = $3 }
    END {
      for (i = 1; i <= NR; i++) if (pg[i] == g) keep[pid[i]] = 1
      do { added = 0
        for (i = 1; i <= NR; i++) if (!(pid[i] in keep) && (ppid[i] in keep)) { keep[pid[i]] = 1; added = 1 }
      } while (added)
      for (p in keep) print p
    }'
}

# The processes of the head this script started (per $pgid_file), if it still runs: the group's tree, provided a Ray
# daemon in it was started with this temp dir (after a crash or reboot the file outlives the head, and its id may
# name someone else's process group by now).
our_head() {
  [ -f "$pgid_file" ] || return 0
  local pids
  pids=$(head_tree "$(cat "$pgid_file")")
  [ -n "$pids" ] || return 0
  if ps -ww -o args= -p "$(echo $pids | tr ' ' ',')" | awk -v d="=$temp_dir" '
      { i = index($0, d); c = substr($0, i + length(d), 1)
        if (i && (c == "" || c == "/" || c == " ")) found = 1 }
      END { exit !found }'; then
    echo $pids
  fi
}

case "${1:-}" in
  start)
    # a plain TCP probe: `ray status` against a port nobody serves waits ~40 s for a GCS
    if (exec 3<>"/dev/tcp/127.0.0.1/$QTTS_RAY_PORT") 2>/dev/null; then
      if [ -n "$(our_head)" ]; then
        echo "ray head already running at $RAY_ADDRESS_HOSTPORT"; exit 0
      fi
      echo "127.0.0.1:$QTTS_RAY_PORT is in use by something this script did not start with temp dir $temp_dir" \
        "(another program, or a head of another temp dir); choose another QTTS_RAY_PORT" >&2
      exit 1
    fi
    mkdir -p "$temp_dir"
    # setsid: the head's daemons share one new process group, recorded for `stop`
    setsid "$RAY" start --head \
      --node-ip-address=127.0.0.1 --port="$QTTS_RAY_PORT" \
      --ray-client-server-port="$QTTS_RAY_CLIENT_PORT" \
      --num-cpus="${QTTS_RAY_CPUS:-4}" \
      --object-store-memory="${QTTS_RAY_OBJECT_STORE:-268435456}" \
      --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$QTTS_DASHBOARD_PORT" \
      --dashboard-agent-listen-port="$QTTS_DASHBOARD_AGENT_PORT" \
      --temp-dir="$temp_dir" \
      --disable-usage-stats >/dev/null &
    starter=$!
    wait "$starter"
    echo "$starter" > "$pgid_file"
    echo "ray head on $RAY_ADDRESS_HOSTPORT, dashboard http://127.0.0.1:$QTTS_DASHBOARD_PORT, temp dir $temp_dir"
    echo "drivers join it with: export RAY_ADDRESS=$RAY_ADDRESS_HOSTPORT"
    ;;
  stop)
    if [ ! -f "$pgid_file" ]; then
      echo "no head started by this script at $RAY_ADDRESS_HOSTPORT ($pgid_file missing); nothing stopped"; exit 0
    fi
    pids=$(our_head)
    if [ -z "$pids" ]; then
      rm -f "$pgid_file"
      echo "no head started by this script runs at $RAY_ADDRESS_HOSTPORT (stale $pgid_file removed); nothing stopped"
      exit 0
    fi
    if [ -n "$pids" ]; then kill -TERM $pids 2>/dev/null || true; fi
    for _ in $(seq 25); do
      alive=$(for p in $pids; do if kill -0 "$p" 2>/dev/null; then echo "$p"; fi; done)
      [ -z "$alive" ] && break
      sleep 0.2
    done
    if [ -n "${alive:-}" ]; then kill -KILL $alive 2>/dev/null || true; fi
    rm -f "$pgid_file"
    echo "ray head at $RAY_ADDRESS_HOSTPORT stopped"
    ;;
  status)
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$QTTS_RAY_PORT") 2>/dev/null; then  # else `ray status` waits ~40 s
      echo "no ray head at $RAY_ADDRESS_HOSTPORT" >&2; exit 1
    fi
    "$RAY" status --address "$RAY_ADDRESS_HOSTPORT"
    ;;
  *)
    echo "usage: $0 start|stop|status" >&2; exit 2;;
esac
