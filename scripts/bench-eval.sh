#!/usr/bin/env bash
# Full-ranking evaluation speed on ML-1M, recfuse against RecBole 1.2.1, side by side in one
# session (docs/benchmarks.md): recfuse's `cargo bench --bench eval`, then RecBole's evaluation
# of the same models at the same batching (512 users per batch) and at RecBole's default
# (eval_batch_size 4096 pairs: one ML-1M user per batch). Sets up .cache/venv-recbole
# (PyTorch 2.5.1, ~5.8 GB) on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-data.sh ml-1m
if [[ ! -x .cache/venv-recbole/bin/python ]]; then
    python3 -m venv .cache/venv-recbole
    .cache/venv-recbole/bin/pip install --quiet "torch==2.5.1" "recbole==1.2.1" "numpy<2" "scipy==1.11.4" \
        pandas tqdm "colorlog==4.7.2" "colorama==0.4.4" scikit-learn pyyaml tensorboard thop tabulate plotly texttable
fi
echo "load: $(cut -d' ' -f1-3 /proc/loadavg)"
cargo bench -q -p recfuse --bench eval 2>/dev/null | grep '^{'
for model in BPR SASRec; do
    .cache/venv-recbole/bin/python scripts/bench-recbole.py eval "$model" ml-1m 512 0 2>/dev/null | grep ' eval '
done
.cache/venv-recbole/bin/python scripts/bench-recbole.py eval BPR ml-1m 1 0 2>/dev/null | grep ' eval '
echo "load: $(cut -d' ' -f1-3 /proc/loadavg)"
