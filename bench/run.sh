#!/usr/bin/env bash
# The one benchmark command: Fermion (JSON, binary) vs a bare Starlette + ONNX Runtime
# endpoint at concurrency 1 and 64, plus raw in-process ONNX Runtime throughput.
#
#   bash bench/run.sh [--quick] [--only bare|fermion] [...]     (see --help)
#   env: STORE (default model_store), DURATION (seconds per cell, default 10), VENV (.venv)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! command -v wrk >/dev/null 2>&1; then
    echo "bench: wrk not found, installing it with apt-get" >&2
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq wrk >/dev/null
fi

exec "${VENV:-.venv}/bin/python" -m bench.http_bench \
    --store "${STORE:-model_store}" --duration "${DURATION:-10}" "$@"
