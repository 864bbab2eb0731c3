#!/usr/bin/env bash
# `recfuse serve-llm` checked with the official openai Python client (pinned, from PyPI, in
# .cache/venv-openai): starts the server on a free loopback port with a bearer key, runs
# scripts/openai_client_check.py against it, stops the server. Run by scripts/test.sh.
# Usage: scripts/check-openai-client.sh [path/to/recfuse] (default: target/debug/recfuse)
set -euo pipefail
cd "$(dirname "$0")/.."
RECFUSE=$(realpath "${1:-target/debug/recfuse}")
venv=.cache/venv-openai
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import openai" 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet openai==3.51.0
fi
log=$(mktemp)
export RECFUSE_CHECK_KEY="check-$RANDOM-$RANDOM"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$RECFUSE" serve-llm --addr "127.0.0.1:$port" --batch 4 --api-key-env RECFUSE_CHECK_KEY > "$log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 1 120); do
    curl -sf "http://127.0.0.1:$port/health" > /dev/null && break
    kill -0 $server 2>/dev/null || { cat "$log" >&2; exit 1; }
    sleep 0.5
done
"$venv/bin/python" scripts/openai_client_check.py "http://127.0.0.1:$port/v1" "$RECFUSE_CHECK_KEY"
