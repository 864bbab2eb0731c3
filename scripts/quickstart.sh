#!/usr/bin/env bash
# Sets up a fresh machine and runs the embedded default pipeline (configs/quickstart.toml),
# HKFR end to end: MovieLens-100K → knowledge fused by SmolLM2 in-process → CTR instructions →
# LoRA tuning of SmolLM2 → the tuned model reranks popularity's top 20, evaluated against
# popularity and BPR.
# No API key, no GPU. Extra arguments go to `recfuse run` (e.g. --set 'rankers[0].half_life_days=30').
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-data.sh ml-100k smollm2 onnxruntime minilm
cargo run --release --locked -p recfuse -- run configs/quickstart.toml "$@"
