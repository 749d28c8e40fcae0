#!/usr/bin/env bash
# Sets up a virtual environment in .venv with this project installed (idempotent).
# torch is pinned to 2.13.0 (the CPU wheel) when no torch is importable, so pip never pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
VENV_PY=.venv/bin/python
"$VENV_PY" -m pip install --quiet --disable-pip-version-check --upgrade pip >/dev/null 2>&1 || true
if ! "$VENV_PY" -c "import torch" >/dev/null 2>&1; then
  echo "installing torch==2.13.0 ..."
  "$VENV_PY" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
fi
if ! "$VENV_PY" -c "import modeling_vsm, pytest" >/dev/null 2>&1 || [ setup.cfg -nt .venv/.vsm-installed ]; then
  echo "installing vsm and its dependencies ..."
  "$VENV_PY" -m pip install --quiet --disable-pip-version-check -e ".[dev]"
  touch .venv/.vsm-installed
fi
# The demo's browser test drives Debian's headless Chromium: installed here when missing and this is a root shell
# with apt-get (else that one test skips, saying why).
if ! command -v chromedriver >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing chromium and chromium-driver (the demo's browser test) ..."
  (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver) >/dev/null 2>&1 \
    || echo "could not install chromium / chromium-driver: the demo's browser test will be skipped"
fi
