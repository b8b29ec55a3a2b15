#!/usr/bin/env bash
# Stop the local Ray head started by ray-head-start.sh: `ray stop` ends every Ray process of
# this machine that the user may signal (other local Ray clusters too). A head started with
# --block stops with its foreground process instead (Ctrl-C / SIGTERM).
set -euo pipefail
exec "${VENV:-.venv}/bin/ray" stop "$@"
