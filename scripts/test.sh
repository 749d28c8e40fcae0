#!/usr/bin/env bash
# Set up, then run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
# Everything here is built locally: never wait on the (unreachable) Hugging Face Hub.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
