#!/usr/bin/env bash
# LoRA training throughput and peak memory, recfuse (candle) beside PyTorch + PEFT on the same
# CPU and the same SmolLM2 GGUF: sequence 256, batch 8, rank 8 on q_proj,v_proj, AdamW.
# Interleaved rounds (the machine is shared and noisy); each line of the output is one run.
# Sets up .cache/venv-peft (scripts/venv-peft.sh) on first use.
#
#   scripts/bench-lora.sh [rounds] [steps]       (default 3 rounds of 3 timed steps)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
STEPS=${2:-3}
GGUF=.cache/data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
scripts/fetch-data.sh smollm2 >/dev/null
scripts/venv-peft.sh
cargo bench -p recfuse-plugin-lora-tuner --bench training --no-run --quiet 2>/dev/null
for round in $(seq "$ROUNDS"); do
    for micro in 2 8; do
        cargo bench -p recfuse-plugin-lora-tuner --bench training --quiet -- --steps "$STEPS" --micro "$micro" 2>/dev/null
        .cache/venv-peft/bin/python scripts/bench-lora-peft.py --gguf "$GGUF" --steps "$STEPS" --micro "$micro" 2>/dev/null
    done
done
