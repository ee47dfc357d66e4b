# Environment every process talking to the local head needs (head, drivers, `ray job` CLI, pytest).
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
export RAY_USAGE_STATS_ENABLED=0
export RAY_SERVE_ENABLE_HA_PROXY=0
export QTTS_RAY_PORT="${QTTS_RAY_PORT:-6390}"
export QTTS_DASHBOARD_PORT="${QTTS_DASHBOARD_PORT:-8265}"
export QTTS_RAY_CLIENT_PORT="${QTTS_RAY_CLIENT_PORT:-10001}"
export QTTS_DASHBOARD_AGENT_PORT="${QTTS_DASHBOARD_AGENT_PORT:-52365}"
export RAY_ADDRESS_HOSTPORT="127.0.0.1:${QTTS_RAY_PORT}"
# RAY_ADDRESS is deliberately not set here: drivers then start an in-process cluster when no head runs. To join the
# head started by cluster/local.sh: export RAY_ADDRESS=$RAY_ADDRESS_HOSTPORT
