#!/usr/bin/env bash
# Data-path benchmark on ML-1M, recfuse and its Python peers in one session (docs/benchmarks.md).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-data.sh ml-1m
if [[ ! -x .cache/venv-peers/bin/python ]]; then
    python3 -m venv .cache/venv-peers
    .cache/venv-peers/bin/pip install --quiet numpy pandas
fi
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
cargo bench --quiet -p recfuse --bench data
.cache/venv-peers/bin/python scripts/bench-data.py .cache/data/ml-1m/ml-1m.inter
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
