#!/usr/bin/env bash
# The Python peer of our LLM benchmarks, in .cache/venv-peft: PyTorch, transformers, PEFT and
# gguf from PyPI (a CPU run of the CUDA wheel; ~5.6 GB). Created on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ ! -x .cache/venv-peft/bin/python ]]; then
    python3 -m venv .cache/venv-peft
    .cache/venv-peft/bin/pip install --quiet "torch==2.5.1" "transformers==4.46.3" "peft==0.13.2" "gguf==0.10.0" \
        "sentencepiece==0.2.0" "numpy<2" "accelerate==1.1.1"
fi
