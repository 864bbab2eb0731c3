"""Do our adapters leave the framework? Loads the GGUF base in transformers, applies a LoRA
adapter directory written by the `lora` tuner with PEFT, checks that PEFT used every tensor of
the adapter (PEFT loads non-strictly: a wrong key name only warns), and compares logits with
ours (the `adapter_logits` example) on a prompt: base alone and with the adapter.

  .cache/venv-peft/bin/python scripts/peft-check.py --gguf <file.gguf> --adapter <dir> [--adapter <dir2>]

With two adapters (Multi-LoRA: shared + task) both are active together, as in our forward.
Prints one JSON line; exits 1 when a tensor was not used or logits differ beyond --tol.
"""
import argparse, json, os, subprocess, sys, tempfile

import numpy as np
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoTokenizer


from gguf_transformers import load_gguf

p = argparse.ArgumentParser()
p.add_argument("--gguf", required=True)
p.add_argument("--adapter", action="append", required=True)
p.add_argument("--tol", type=float, default=2e-3, help="max |logit difference| allowed")
p.add_argument("--text", default="<|im_start|>user\nWill the user who liked Heat and Fargo enjoy Speed? Answer Yes or No.<|im_end|>\n<|im_start|>assistant\n")
a = p.parse_args()

d, f = os.path.dirname(os.path.abspath(a.gguf)), os.path.basename(a.gguf)
tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
ids = tok(a.text, return_tensors="pt").input_ids
base = load_gguf(a.gguf).eval()
names = [f"a{i}" for i in range(len(a.adapter))]
model = PeftModel.from_pretrained(base, a.adapter[0], adapter_name=names[0])
for path, name in zip(a.adapter[1:], names[1:]):
    model.load_adapter(path, adapter_name=name)
model.base_model.set_adapter(names)  # every adapter active: outputs add up
model.eval()

# Every tensor of each adapter file must have landed in the model, value for value.
state = dict(model.named_parameters())
unused = []
for path, name in zip(a.adapter, names):
    for key, t in load_file(os.path.join(path, "adapter_model.safetensors")).items():
        target = key.replace(".lora_A.weight", f".lora_A.{name}.weight").replace(".lora_B.weight", f".lora_B.{name}.weight")
        if target not in state or not torch.equal(state[target].detach(), t):
            unused.append(key)

def ours(adapters):
    with tempfile.NamedTemporaryFile(suffix=".f32") as out:
        cmd = ["cargo", "run", "--quiet", "--release", "-p", "recfuse-plugin-lora-tuner", "--example", "adapter_logits", "--",
               "--model", a.gguf, "--ids", ",".join(map(str, ids[0].tolist())), "--out", out.name]
        for ad in adapters:
            cmd += ["--adapter", ad]
        subprocess.run(cmd, check=True)
        return np.fromfile(out.name, dtype=np.float32).reshape(ids.shape[1], -1)

with torch.no_grad():
    theirs_adapted = model(ids).logits[0].numpy()
    with model.disable_adapter():
        theirs_base = model(ids).logits[0].numpy()
diff_base = float(np.abs(ours([]) - theirs_base).max())
mine = ours(a.adapter)
diff_adapted = float(np.abs(mine - theirs_adapted).max())
effect = float(np.abs(theirs_adapted - theirs_base).max())
result = {
    "tokens": int(ids.shape[1]), "adapters": a.adapter, "tensors_unused_by_peft": unused,
    "max_abs_logit_diff_base": diff_base, "max_abs_logit_diff_adapted": diff_adapted,
    "adapter_effect_max_abs": effect, "same_argmax": bool((mine.argmax(-1) == theirs_adapted.argmax(-1)).all()),
}
print(json.dumps(result))
sys.exit(0 if not unused and diff_adapted <= a.tol and diff_base <= a.tol else 1)
