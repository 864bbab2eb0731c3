#!/usr/bin/env bash
# Load test of `recfuse serve` (docs/serving.md, docs/benchmarks.md): installs oha from
# crates.io into .cache/tools if missing, then runs framework/benches/serve.rs (a run of BPR,
# SASRec and the ort ranker on ML-100K, served on loopback, 1/8/32 connections, top 10 of
# 1000 candidates).
# Usage: scripts/bench-serve.sh [seconds per level, default 15]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-data.sh ml-100k onnxruntime minilm
if [ ! -x .cache/tools/bin/oha ]; then
    cargo install oha --version 1.16.0 --locked --root .cache/tools
fi
cargo bench -p recfuse --bench serve -- --seconds "${1:-15}" --oha .cache/tools/bin/oha
mkdir -p docs/results
cp target/bench-results/serve-load.jsonl target/bench-results/serve-load.png docs/results/
