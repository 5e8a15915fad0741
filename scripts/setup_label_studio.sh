#!/usr/bin/env bash
# Install Label Studio 1.23.2 into its own virtual environment (.ls-venv by default).
# Label Studio pins its own Django stack, so it must not share the project's venv.
# Idempotent: does nothing when the venv already has label-studio 1.23.2.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LS_VENV="${LS_VENV:-$ROOT/.ls-venv}"
LS_VERSION="${LS_VERSION:-1.23.2}"
PYTHON="${PYTHON:-python3}"

if [ -x "$LS_VENV/bin/label-studio" ] && \
   "$LS_VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('label-studio') != '$LS_VERSION')" 2>/dev/null; then
  echo "label-studio $LS_VERSION already installed in $LS_VENV"
  exit 0
fi
"$PYTHON" -m venv "$LS_VENV"
# pip's stderr without the warning it prints per package for index folders missing on some machines
quiet_pip() { "$LS_VENV/bin/pip" "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
quiet_pip install --quiet --upgrade pip
quiet_pip install --quiet "label-studio==$LS_VERSION"
echo "label-studio $LS_VERSION installed in $LS_VENV"
