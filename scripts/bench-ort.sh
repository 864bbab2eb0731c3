#!/usr/bin/env bash
# ONNX Runtime throughput, recfuse (Rust, ort) against Python onnxruntime 1.31.1 on the same
# exported feature MLP, inputs, batch sizes and threads, alternating ROUNDS times so both see the
# same machine load. Writes docs/results/ort-throughput.json and prints a table of medians and
# ratios. The model comes from a short run of configs/ort.toml (the pair model is the same shape
# whatever the number of users or epochs).
# Usage: scripts/bench-ort.sh [ROUNDS] (default 5)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-5}
THREADS=${THREADS:-2}
BATCHES=${BATCHES:-1000,16384}
scripts/fetch-data.sh ml-100k onnxruntime minilm > /dev/null
venv=.cache/venv-ort
if ! "$venv/bin/python" -c "import onnxruntime, safetensors, numpy" 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet onnxruntime==1.31.1 numpy==2.4.6 safetensors==0.7.0
fi
cargo build --release --quiet -p recfuse
cargo bench --quiet -p recfuse-plugin-ort-ranker --bench throughput --no-run 2>/dev/null
runs=.cache/bench-ort
target/release/recfuse run configs/ort.toml --quiet --set run.dir="$runs" --set run.sample_users=150 \
    --set 'rankers[2].train.epochs=3' --set eval.max_users=50 > "$runs.log" 2>&1 || { cat "$runs.log" >&2; exit 1; }
model="$runs/ort/rankers/ort"
out=$(mktemp)
for r in $(seq 1 "$ROUNDS"); do
    echo "round $r/$ROUNDS" >&2
    RECFUSE_BENCH_MODEL_DIR="$PWD/$model" RECFUSE_BENCH_THREADS=$THREADS RECFUSE_BENCH_BATCHES=$BATCHES \
        RECFUSE_BENCH_ROUNDS=3 RECFUSE_BENCH_SECONDS=1 \
        cargo bench --quiet -p recfuse-plugin-ort-ranker --bench throughput 2>/dev/null >> "$out"
    "$venv/bin/python" scripts/bench_ort.py "$model" "$THREADS" 1 3 "$BATCHES" >> "$out"
done
python3 - "$out" "$ROUNDS" "$THREADS" <<'PY'
import json, statistics, sys, os
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
rounds, threads = int(sys.argv[2]), int(sys.argv[3])
result = {"command": f"scripts/bench-ort.sh {rounds}", "threads": threads, "load": os.getloadavg(), "batches": []}
print(f"| pairs per call | recfuse (ort) pairs/s | Python onnxruntime pairs/s | ratio |")
print(f"|---:|---:|---:|---:|")
for batch in sorted({r["batch"] for r in rows}):
    rust = [r["pairs_per_s"] for r in rows if r["batch"] == batch and r["impl"] == "rust-ort"]
    py = [r["pairs_per_s"] for r in rows if r["batch"] == batch and r["impl"] == "python-onnxruntime"]
    ratios = [a / b for a, b in zip(rust, py)]
    entry = {"batch": batch, "rust_median": statistics.median(rust), "python_median": statistics.median(py),
             "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
             "rust": rust, "python": py}
    result["batches"].append(entry)
    print(f"| {batch} | {entry['rust_median']:.0f} | {entry['python_median']:.0f} | {entry['ratio_median']:.2f}× ({entry['ratio_min']:.2f}–{entry['ratio_max']:.2f}) |")
os.makedirs("docs/results", exist_ok=True)
json.dump(result, open("docs/results/ort-throughput.json", "w"), indent=2)
PY
rm -f "$out"
