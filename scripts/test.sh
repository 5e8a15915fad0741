#!/usr/bin/env bash
# Set up (scripts/setup.sh --label-studio) and run every test: unit and integration tests first,
# then the end-to-end tests against a real Label Studio, redis-server and rq worker on loopback.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh --label-studio
.venv/bin/python -m pytest -q -p no:cacheprovider --timeout 900 --durations=15 tests
.venv/bin/python -m pytest -q -p no:cacheprovider --timeout 1200 --durations=10 -m e2e tests
