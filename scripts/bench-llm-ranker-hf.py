"""Candidate scoring with PyTorch + transformers on the same CPU, model and prompts: the peer of
`cargo bench -p recfuse-plugin-llm-ranker --bench scoring` (scripts/bench-llm-ranker.sh runs
both). Reads the prompts (token ids) that bench dumped with `--dump`, scores every candidate's
"Yes" against "No" log-odds at the answer position in two ways, and checks the scores against
ours:

* full prompts: left-padded batches of at most --batch-tokens padded tokens, logits of the last
  position only (`num_logits_to_keep=1`), as a transformers user would batch them;
* prefix reuse: each user's common prefix run once, its KV cache repeated for a batch of
  left-padded suffixes (explicit positions, padding masked).

Prints one JSON line per mode: median seconds, candidates/s, tokens/s, the largest
difference from our log-odds.
"""
import argparse, copy, json, os, statistics, time

import torch
from transformers import DynamicCache

from gguf_transformers import load_gguf

p = argparse.ArgumentParser()
p.add_argument("--gguf", required=True)
p.add_argument("--prompts", required=True)
p.add_argument("--rounds", type=int, default=3)
p.add_argument("--batch-tokens", type=int, default=2048)
a = p.parse_args()

torch.set_num_threads(os.cpu_count())
model = load_gguf(a.gguf).eval()
d = json.load(open(a.prompts))
yes, no = d["yes"], d["no"]


def batches(seqs, budget):
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    chunk = []
    for i in order:
        if chunk and max(len(seqs[j]) for j in chunk + [i]) * (len(chunk) + 1) > budget:
            yield chunk
            chunk = []
        chunk.append(i)
    if chunk:
        yield chunk


def left_pad(rows):
    width = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids, mask


def log_odds(logits):
    last = logits[:, -1, :]
    return (last[:, yes] - last[:, no]).tolist()


@torch.no_grad()
def score_full(prompts):
    out = [None] * len(prompts)
    for chunk in batches(prompts, a.batch_tokens):
        ids, mask = left_pad([prompts[i] for i in chunk])
        logits = model(input_ids=ids, attention_mask=mask, num_logits_to_keep=1).logits
        for i, s in zip(chunk, log_odds(logits)):
            out[i] = s
    return out


@torch.no_grad()
def score_reuse(prompts):
    first = prompts[0]
    n = min(len(q) for q in prompts) - 1
    for q in prompts[1:]:
        n = min(n, next((k for k, (x, y) in enumerate(zip(first, q)) if x != y), len(q)))
    prefix = model(input_ids=torch.tensor([first[:n]]), past_key_values=DynamicCache(), use_cache=True).past_key_values
    suffixes = [q[n:] for q in prompts]
    out = [None] * len(prompts)
    for chunk in batches(suffixes, a.batch_tokens):
        ids, mask = left_pad([suffixes[i] for i in chunk])
        width = ids.shape[1]
        cache = copy.deepcopy(prefix)
        cache.batch_repeat_interleave(len(chunk))
        full_mask = torch.cat([torch.ones((len(chunk), n), dtype=torch.long), mask], dim=1)
        # Real tokens continue the prefix's positions; padding positions are masked anyway.
        pos = (n + (mask.cumsum(1) - 1).clamp(min=0)).long()
        logits = model(input_ids=ids, attention_mask=full_mask, position_ids=pos, past_key_values=cache, num_logits_to_keep=1).logits
        for i, s in zip(chunk, log_odds(logits)):
            out[i] = s
    return out, n


ours = [s for user in d["log_odds"] for s in user]
pairs = len(ours)
times = {"full-prompts": [], "prefix-reuse": []}
tokens = {"full-prompts": sum(len(q) for u in d["prompts"] for q in u)}
diff = {}
for r in range(a.rounds):
    for mode in ("prefix-reuse", "full-prompts"):
        t = time.perf_counter()
        scores, computed = [], 0
        for user in d["prompts"]:
            if mode == "full-prompts":
                scores += score_full(user)
            else:
                s, n = score_reuse(user)
                scores += s
                computed += n + sum(len(q) - n for q in user)
        times[mode].append(time.perf_counter() - t)
        if mode == "prefix-reuse":
            tokens[mode] = computed
        diff[mode] = max(abs(x - y) for x, y in zip(scores, ours))
load = open("/proc/loadavg").read().strip()
for mode, ts in times.items():
    s = statistics.median(ts)
    print(json.dumps({"mode": mode, "engine": "transformers", "median_seconds": s, "candidates_per_second": pairs / s,
                      "tokens": tokens[mode], "tokens_per_second": tokens[mode] / s,
                      "max_abs_diff_from_recfuse": diff[mode], "torch": torch.__version__, "loadavg": load}))
