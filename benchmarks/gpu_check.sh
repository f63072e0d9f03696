#!/usr/bin/env bash
# The prepared GPU check (docs/gpu.md): one CUDA GPU, under 8 minutes, one JSON line at the end.
#   bash benchmarks/gpu_check.sh [--dry-run] [--out DIR] [--wheels DIR]
# What it runs, the wheels it installs first and the JSON it prints: benchmarks/gpu_check.py's docstring.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 benchmarks/gpu_check.py "$@"
