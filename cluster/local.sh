#!/usr/bin/env bash
# Start or stop a one-machine Ray head on loopback, as the project's services and tests expect.
#   cluster/local.sh start   # head + dashboard (needed by `ray job submit`) on 127.0.0.1
#   cluster/local.sh stop
#   cluster/local.sh status
# Ray 2.60 on Linux silently replaces --node-ip-address=127.0.0.1 with the eth0 address unless
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0; token auth must be set identically in every process (head, drivers, CLI),
# so source `cluster/env.sh` in every shell that talks to this head.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=cluster/env.sh
source "$here/env.sh"
# the project's virtualenv first, so the head (and jobs submitted to it) run the project's python
[ -d "$here/../.venv/bin" ] && export PATH="$(cd "$here/../.venv/bin" && pwd):$PATH"
RAY="${RAY:-ray}"
command -v "$RAY" >/dev/null || RAY="$here/../.venv/bin/ray"

case "${1:-}" in
  start)
    if "$RAY" status --address "$RAY_ADDRESS_HOSTPORT" >/dev/null 2>&1; then
      echo "ray head already running at $RAY_ADDRESS_HOSTPORT"; exit 0
    fi
    "$RAY" start --head \
      --node-ip-address=127.0.0.1 --port="$QTTS_RAY_PORT" \
      --num-cpus="${QTTS_RAY_CPUS:-4}" \
      --object-store-memory="${QTTS_RAY_OBJECT_STORE:-268435456}" \
      --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$QTTS_DASHBOARD_PORT" \
      --disable-usage-stats >/dev/null
    echo "ray head on $RAY_ADDRESS_HOSTPORT, dashboard http://127.0.0.1:$QTTS_DASHBOARD_PORT"
    echo "drivers join it with: export RAY_ADDRESS=$RAY_ADDRESS_HOSTPORT"
    ;;
  stop)
    "$RAY" stop --force >/dev/null 2>&1 || true
    echo "ray stopped"
    ;;
  status)
    "$RAY" status --address "$RAY_ADDRESS_HOSTPORT"
    ;;
  *)
    echo "usage: $0 start|stop|status" >&2; exit 2;;
esac
