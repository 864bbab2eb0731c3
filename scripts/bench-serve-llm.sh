#!/usr/bin/env bash
# `recfuse serve-llm` under load against llama.cpp's own llama-server on the same GGUF
# (framework/benches/serve_llm.rs says what is measured): fetches SmolLM2, builds llama-server
# with scripts/build-llama-cpp.sh (10-15 min the first time), installs oha into .cache/tools,
# runs the bench and copies its JSON and chart to docs/results/.
# Usage: scripts/bench-serve-llm.sh [SECONDS per level] (default 20).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-data.sh smollm2 > /dev/null
scripts/build-llama-cpp.sh
[ -x .cache/tools/bin/oha ] || cargo install oha --version 1.16.0 --locked --root .cache/tools
rm -f target/bench-results/serve-llm-load.json target/bench-results/serve-llm-load.png
status=0
cargo bench -p recfuse --bench serve_llm -- --seconds "${1:-20}" || status=$?
mkdir -p docs/results
cp target/bench-results/serve-llm-load.json docs/results/
[ -f target/bench-results/serve-llm-load.png ] && cp target/bench-results/serve-llm-load.png docs/results/
exit $status
