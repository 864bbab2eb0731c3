#!/usr/bin/env bash
# Sets up a fresh machine and runs every test: fetches the data the tests use, then
# `cargo test --workspace` (which also builds the example and fixture plugins as third parties
# would, outside the workspace, and loads them).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-data.sh ml-100k smollm2
cargo test --workspace --locked --no-fail-fast "$@"
