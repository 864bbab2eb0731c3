#!/usr/bin/env bash
# Sets up a fresh machine and runs every test: fetches the data the tests use, then
# `cargo test --workspace` (which also builds the example and fixture plugins as third parties
# would, outside the workspace, and loads them), then `cargo package -p recfuse-sdk`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-data.sh ml-100k smollm2 onnxruntime minilm
cargo test --workspace --locked --no-fail-fast "$@"
# The deployment files (Kubernetes schemas, the Slurm flow end to end) with the binary just built.
scripts/check-deploy.sh target/debug/recfuse
# The ort ranker's exported model in Python onnxruntime (pinned, from PyPI).
scripts/check-onnx-export.sh target/debug/recfuse
# serve-llm through the official openai Python client (pinned, from PyPI).
scripts/check-openai-client.sh target/debug/recfuse
# The SDK must stay publishable: package it and build the packaged crate on its own, as
# crates.io would (outside the workspace, from its own manifest).
cargo package -p recfuse-sdk --allow-dirty --quiet
