#!/usr/bin/env bash
# Set up the environment and run the whole test suite (CPU only, no downloads).
set -euo pipefail
cd "$(dirname "$0")/.."
source test/setup_env.sh
export CUDA_VISIBLE_DEVICES=""
python -m pytest -q test "$@"
