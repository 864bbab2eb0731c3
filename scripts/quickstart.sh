#!/usr/bin/env bash
# Sets up a fresh machine and runs the embedded default pipeline (configs/quickstart.toml):
# MovieLens-100K → knowledge fused by SmolLM2 in-process → CTR instructions → popularity
# ranking, evaluated.
# No API key, no GPU. Extra arguments go to `recfuse run` (e.g. --set ranker.half_life_days=30).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-data.sh ml-100k smollm2
cargo run --release --locked -p recfuse -- run configs/quickstart.toml "$@"
