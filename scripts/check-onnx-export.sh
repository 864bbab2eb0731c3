#!/usr/bin/env bash
# The `ort` ranker's exported ONNX model checked in Python onnxruntime (the same 1.31.1, pinned,
# from PyPI, in .cache/venv-ort): a short run of configs/ort.toml (150 users, 3 epochs) trains
# and exports the feature MLP, then scripts/onnx_export_check.py scores the training side's check
# pairs with the saved model and compares. Run by scripts/test.sh.
# Usage: scripts/check-onnx-export.sh [path/to/recfuse] [--json OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
RECFUSE=$(realpath "${1:-target/debug/recfuse}")
shift || true
scripts/fetch-data.sh ml-100k onnxruntime minilm > /dev/null
venv=.cache/venv-ort
if ! "$venv/bin/python" -c "import onnxruntime, safetensors, numpy" 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet onnxruntime==1.31.1 numpy==2.4.6 safetensors==0.7.0
fi
runs=$(mktemp -d)
trap 'rm -rf "$runs"' EXIT
"$RECFUSE" run configs/ort.toml --quiet --set run.dir="$runs" --set run.sample_users=150 \
    --set 'rankers[2].train.epochs=3' --set eval.max_users=50 > "$runs/log" 2>&1 || { cat "$runs/log" >&2; exit 1; }
"$venv/bin/python" scripts/onnx_export_check.py "$runs/ort/rankers/ort" "$@"
