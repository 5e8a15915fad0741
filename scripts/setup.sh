#!/usr/bin/env bash
# Set up everything this project needs on a fresh Debian/Ubuntu machine with Python >= 3.10:
#   - .venv with the project (torch 2.14.1, torchvision 0.29.1, label-studio-ml 1.0.9, redis, rq, ...);
#   - redis-server (Debian package) for the training queue, when it is missing;
#   - with --label-studio: Label Studio 1.23.2 in its own environment (.ls-venv), for the demo and e2e tests,
#     moto's S3 server (.s3-venv) for the cloud-storage e2e test, chromium (browser tests) and postgresql
#     (Label Studio on the compose stack's database).
# Idempotent: a second run only checks.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
WITH_LS=0
EXTRAS="test"
for arg in "$@"; do
  case "$arg" in
    --label-studio) WITH_LS=1 ;;
    --bench) EXTRAS="test,bench" ;;
    *) echo "usage: $0 [--label-studio] [--bench]" >&2; exit 2 ;;
  esac
done

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# pip prints a warning per package for index folders that do not exist on some machines: keep the log readable.
.venv/bin/pip install --quiet --disable-pip-version-check -e ".[$EXTRAS]" 2> >(grep -v "is ignored: it is neither" >&2)
.venv/bin/python -c "import torch, torchvision, label_studio_ml, rq, redis" \
  || { echo "setup: the project environment is incomplete (see pip's output above)" >&2; exit 1; }

# Debian packages: redis-server for the training queue; with --label-studio also chromium and its
# driver, for the browser tests of the review loop (Selenium is pointed at /usr/bin/chromedriver),
# and postgresql
APT_PACKAGES=()
command -v redis-server >/dev/null 2>&1 || APT_PACKAGES+=(redis-server)
if [ "$WITH_LS" = 1 ]; then
  command -v chromium >/dev/null 2>&1 || APT_PACKAGES+=(chromium)
  command -v chromedriver >/dev/null 2>&1 || APT_PACKAGES+=(chromium-driver)
  # PostgreSQL, for the e2e test of Label Studio on the database the compose stack gives it
  compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || APT_PACKAGES+=(postgresql)
fi
if [ "${#APT_PACKAGES[@]}" -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq "${APT_PACKAGES[@]}" >/dev/null
fi

if [ "$WITH_LS" = 1 ]; then
  bash scripts/setup_label_studio.sh
  # moto's S3 server, for the e2e test of projects whose images are in S3; its Flask 3 cannot
  # share .venv (label-studio-ml pins Flask 1.1.2)
  if [ ! -x .s3-venv/bin/moto_server ]; then
    "$PYTHON" -m venv .s3-venv
    .s3-venv/bin/pip install --quiet --disable-pip-version-check "moto[server]>=5.1,<6" \
      2> >(grep -v "is ignored: it is neither" >&2)
  fi
fi
echo "setup: done (.venv ready; redis-server: $(command -v redis-server))"
