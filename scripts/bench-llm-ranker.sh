#!/usr/bin/env bash
# The `llm` ranker's speed (docs/benchmarks.md), on ML-100K with SmolLM2-135M-Instruct:
#  1. Reranking the top 50 of BPR for all 943 users through `recfuse run` (the quickstart's
#     pipeline with template knowledge: short LoRA tuning, then the tuned model reranks);
#     the run lands in runs/rerank-943 (a finished run is reused: delete it to rerun).
#  2. Candidate scoring with prefix reuse against full prompts, recfuse beside PyTorch +
#     transformers on the same prompts (cargo bench -p recfuse --bench llm_scoring), rounds
#     interleaved; the chart goes to target/bench-results/llm-scoring.png.
#
#   scripts/bench-llm-ranker.sh [rounds] [users] [candidates]     (default 3 rounds, 4 users × 50)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
USERS=${2:-4}
CANDIDATES=${3:-50}
scripts/fetch-data.sh ml-100k smollm2 >/dev/null
scripts/venv-peft.sh
cargo build --release --locked -p recfuse --quiet
start=$(date +%s)
./target/release/recfuse run configs/quickstart.toml --overlay configs/fusers/template.toml --quiet \
    --set run.name=rerank-943 --set run.sample_users=0 --set 'rankers[2].rerank={"from":"bpr","top":50}'
python3 - "$start" <<'PY'
import json, sys, time
run = "runs/rerank-943"
stages = json.load(open(f"{run}/manifest.json"))["stages"]
llm = next(r for r in json.load(open(f"{run}/report.json")) if r["model"] == "llm")
users = llm["segments"]["all"]["users"]
print(json.dumps({"bench": "rerank-943", "users": users, "reranked": llm["reranked"],
                  "evaluate_llm_seconds": stages["evaluate.llm"]["seconds"], "tune_seconds": stages["tune"]["seconds"],
                  "seconds_per_user": llm["seconds_per_user"], "candidates_per_second": users * llm["reranked"]["top"] / stages["evaluate.llm"]["seconds"],
                  "wall_seconds_this_invocation": time.time() - float(sys.argv[1]),
                  "loadavg": open("/proc/loadavg").read().strip()}))
PY
cargo bench -p recfuse --bench llm_scoring --quiet -- --run runs/rerank-943 --users "$USERS" --candidates "$CANDIDATES" --rounds "$ROUNDS"
