#!/usr/bin/env bash
# `recfuse serve-llm` under load against llama.cpp's own llama-server on the same GGUF
# (SmolLM2-135M-Instruct Q4_1), same machine, one run: oha (installed into .cache/tools) sends
# OpenAI chat completions (a prompt that makes the model write, max_tokens 32, greedy) with 1,
# 8 and 32 concurrent clients, SECONDS each, alternating the servers level by level: recfuse
# (defaults: int8 kernel where the CPU has it, prefix cache), recfuse with its prefix cache off
# (`recfuse-no-prefix-cache`), and llama-server (which caches prompts per slot by default).
# All get 2 threads and room for 32 parallel requests. Writes docs/results/serve-llm-load.json
# and prints a table.
# Usage: scripts/bench-serve-llm.sh [SECONDS] (default 20). Builds llama-server with
# scripts/build-llama-cpp.sh (10-15 min the first time).
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-20}
scripts/fetch-data.sh smollm2 > /dev/null
scripts/build-llama-cpp.sh
[ -x .cache/tools/bin/oha ] || cargo install oha --version 1.16.0 --locked --root .cache/tools
cargo build --release --quiet -p recfuse
MODEL=.cache/data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
p1=$(free_port); p2=$(free_port); p3=$(free_port)
logs=$(mktemp -d)
target/release/recfuse serve-llm --model "$MODEL" --addr "127.0.0.1:$p1" --batch 32 > "$logs/recfuse.log" 2>&1 &
s1=$!
target/release/recfuse serve-llm --model "$MODEL" --addr "127.0.0.1:$p3" --batch 32 --prefix-cache-mb 0 > "$logs/recfuse-no-prefix-cache.log" 2>&1 &
s3=$!
.cache/llama.cpp/build/bin/llama-server -m "$MODEL" --host 127.0.0.1 --port "$p2" -t 2 -tb 2 -np 32 -c 8192 \
    --no-webui > "$logs/llama.log" 2>&1 &
s2=$!
trap 'kill $s1 $s2 $s3 2>/dev/null; wait $s1 $s2 $s3 2>/dev/null || true; rm -rf "$logs"' EXIT
for pair in "$p1 $s1 recfuse" "$p3 $s3 recfuse-no-prefix-cache" "$p2 $s2 llama"; do
    read -r port pid name <<< "$pair"
    for _ in $(seq 1 240); do
        curl -sf "http://127.0.0.1:$port/health" > /dev/null && break
        kill -0 "$pid" 2>/dev/null || { echo "$name server died:" >&2; tail -5 "$logs/$name.log" >&2; exit 1; }
        sleep 0.5
    done
    curl -sf "http://127.0.0.1:$port/health" > /dev/null || { echo "$name server never became healthy" >&2; exit 1; }
done
body='{"model": "SmolLM2-135M-Instruct.Q4_1", "max_tokens": 32, "temperature": 0,
  "messages": [{"role": "system", "content": "You are a helpful assistant who answers at length."},
               {"role": "user", "content": "Write a detailed paragraph about the history of cinema, from the first silent films to today."}]}'
out=$(mktemp)
for c in 1 8 32; do
    for server in recfuse recfuse-no-prefix-cache llama-server; do
        port=$p1; [ $server = llama-server ] && port=$p2; [ $server = recfuse-no-prefix-cache ] && port=$p3
        echo "$server, $c clients" >&2
        .cache/tools/bin/oha -z "${SECS}s" -c "$c" -m POST -H "Content-Type: application/json" -d "$body" \
            --no-tui --output-format json "http://127.0.0.1:$port/v1/chat/completions" \
            | python3 -c "import json,sys; v=json.load(sys.stdin); print(json.dumps({'server': '$server', 'clients': $c, 'seconds': $SECS, 'codes': v['statusCodeDistribution'], 'requests_per_s': v['summary']['requestsPerSec'], 'p50_s': v['latencyPercentiles']['p50'], 'p99_s': v['latencyPercentiles']['p99']}))" >> "$out"
    done
done
curl -s "http://127.0.0.1:$p1/metrics" > "$logs/metrics.json"
curl -s "http://127.0.0.1:$p3/metrics" > "$logs/metrics-no-prefix-cache.json"
python3 - "$out" "$SECS" "$logs/metrics.json" "$logs/metrics-no-prefix-cache.json" <<'PY'
import json, os, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
failed = [r for r in rows if not r["codes"].get("200")]
print("| server | clients | requests/s | tokens/s (32 per answer) | p50 s | p99 s | non-200 |")
print("|---|---:|---:|---:|---:|---:|---:|")
for r in rows:
    bad = sum(n for code, n in r["codes"].items() if code != "200")
    print(f"| {r['server']} | {r['clients']} | {r['requests_per_s']:.2f} | {32 * r['requests_per_s']:.0f} | {r['p50_s']:.2f} | {r['p99_s']:.2f} | {bad} |")
result = {"command": f"scripts/bench-serve-llm.sh {sys.argv[2]}", "load": os.getloadavg(), "rows": rows,
          "recfuse_metrics": json.load(open(sys.argv[3])), "recfuse_no_prefix_cache_metrics": json.load(open(sys.argv[4]))}
# Written even when a level failed (its row says so), then reported as a failure.
os.makedirs("docs/results", exist_ok=True)
json.dump(result, open("docs/results/serve-llm-load.json", "w"), indent=2)
if failed:
    sys.exit(f"no successful answers: {failed}")
PY
rm -f "$out"
