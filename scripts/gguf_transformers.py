"""Loading a GGUF model in transformers the way our Rust side reads it (shared by
bench-lora-peft.py and peft-check.py)."""
import os

import torch
from transformers import AutoModelForCausalLM


def load_gguf(path):
    """The model in float32, dequantized by transformers' GGUF loader. A GGUF without
    `output.weight` (SmolLM2) ties the output layer to the embeddings, but transformers 4.46's
    loader leaves `lm_head` randomly initialised: it is tied here."""
    from gguf import GGUFReader

    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path), torch_dtype=torch.float32
    )
    if not any(t.name == "output.weight" for t in GGUFReader(path).tensors):
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.get_input_embeddings().weight
    return model
