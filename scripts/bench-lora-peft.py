"""LoRA training throughput of PyTorch + PEFT on the same CPU and the same GGUF, the peer of
`cargo bench -p recfuse-plugin-lora-tuner --bench training` (scripts/bench-lora.sh runs both).

The GGUF is loaded through transformers (dequantized to float32, as ours), LoRA rank r on the
same target modules, random token sequences, labels = inputs (causal-LM loss on every token),
AdamW, gradient clipping at 1.0. Prints one JSON line: median step time, tokens/s, peak RSS.
"""
import argparse, json, os, resource, time

import torch
from peft import LoraConfig, get_peft_model


from gguf_transformers import load_gguf

p = argparse.ArgumentParser()
p.add_argument("--gguf", required=True)
p.add_argument("--steps", type=int, default=5)
p.add_argument("--seq", type=int, default=256)
p.add_argument("--batch", type=int, default=8)
p.add_argument("--micro", type=int, default=8)
p.add_argument("--rank", type=int, default=8)
p.add_argument("--dropout", type=float, default=0.05)
p.add_argument("--targets", default="q_proj,v_proj")
a = p.parse_args()

torch.manual_seed(1)
torch.set_num_threads(os.cpu_count())
model = load_gguf(a.gguf)
cfg = LoraConfig(r=a.rank, lora_alpha=2 * a.rank, lora_dropout=a.dropout, target_modules=a.targets.split(","), task_type="CAUSAL_LM")
model = get_peft_model(model, cfg)
model.train()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, weight_decay=0.0)
times = []
for step in range(a.steps + 1):
    ids = torch.randint(100, 40100, (a.batch, a.seq))
    t = time.perf_counter()
    loss_sum = 0.0
    for chunk in ids.split(a.micro):
        out = model(input_ids=chunk, labels=chunk)
        (out.loss * len(chunk) / a.batch).backward()
        loss_sum += out.loss.item() * len(chunk) / a.batch
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    secs = time.perf_counter() - t
    print(f"step {step}: loss {loss_sum:.3f}, {secs:.2f} s, {a.batch * a.seq / secs:.0f} tokens/s", file=__import__("sys").stderr)
    if step > 0:
        times.append(secs)
times.sort()
median = times[len(times) // 2]
print(json.dumps({
    "impl": f"PyTorch {torch.__version__} + PEFT", "seq": a.seq, "batch": a.batch, "micro_batch": a.micro, "rank": a.rank,
    "targets": a.targets.split(","), "median_step_s": median, "tokens_per_s": a.batch * a.seq / median,
    "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "threads": torch.get_num_threads(),
}))
