#!/usr/bin/env bash
# One-command demo: Label Studio 1.23.2 (own venv .ls-venv), redis-server, the ML backend and an
# rq worker on 127.0.0.1, with a digits project of imbalanced, noisy labels.  Ctrl-C stops it all.
#   bash scripts/demo.sh [--ls-port 8080] [--backend-port 9090] [--n-images 400] [--workdir runs/demo]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq redis-server
  else
    echo "redis-server is missing: sudo apt-get install -y redis-server" >&2; exit 1
  fi
fi
bash "$ROOT/scripts/setup_label_studio.sh"
cd "$ROOT"
exec "$PY" -m ml_backend.demo "$@"
