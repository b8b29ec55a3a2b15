#!/usr/bin/env bash
# Start a local Ray head with token auth, dashboard / job API on 127.0.0.1 only.
#
#   infra/scripts/ray-head-start.sh [extra `ray start` options, e.g. --temp-dir /tmp/rh --block]
#
# Env: VENV (default .venv), NUM_CPUS (default: all cores), RAY_PORT (GCS, default 6379),
# DASHBOARD_PORT (default 8265), DASHBOARD_AGENT_PORT (the agent's HTTP port, default 52365:
# give a second head on the same machine its own). The token comes from RAY_AUTH_TOKEN if set, else
# ~/.ray/auth_token (generated there if missing); it is never printed. Submit with the same
# token and RAY_AUTH_MODE=token. The venv's bin/ goes first on PATH so jobs find `mdlora`.
set -euo pipefail
VENV=$(cd "${VENV:-.venv}" && pwd)
RAY="$VENV/bin/ray"
export PATH="$VENV/bin:$PATH" RAY_AUTH_MODE=token
NUM_CPUS=${NUM_CPUS:-$(nproc)}
RAY_PORT=${RAY_PORT:-6379}
DASHBOARD_PORT=${DASHBOARD_PORT:-8265}
DASHBOARD_AGENT_PORT=${DASHBOARD_AGENT_PORT:-52365}

"$RAY" get-auth-token --generate >/dev/null  # the token goes to stdout: keep it out of logs
echo "Ray job API: http://127.0.0.1:$DASHBOARD_PORT  (token auth; submit with RAY_AUTH_MODE=token)"
echo "  e.g. RAY_AUTH_MODE=token mdlora submit --address http://127.0.0.1:$DASHBOARD_PORT --wait -- pretrain --config C"
exec "$RAY" start --head --port "$RAY_PORT" --num-cpus "$NUM_CPUS" \
    --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT" \
    --dashboard-agent-listen-port "$DASHBOARD_AGENT_PORT" --disable-usage-stats "$@"
