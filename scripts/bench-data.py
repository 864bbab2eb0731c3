"""Python peers for `cargo bench -p recfuse --bench data`: what a user would otherwise write.

* loading: pandas.read_csv of the same atomic file (what RecBole does internally);
* evaluation: numpy full ranking of a given score matrix, masking train items, HR@10/NDCG@10.
Prints one JSON line per measurement (median of 5 runs)."""
import json, statistics, sys, time
import numpy as np
import pandas as pd

path = sys.argv[1]

def median(f, runs=5):
    times, out = [], None
    for _ in range(runs):
        t = time.perf_counter()
        out = f()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out

load_s, df = median(lambda: pd.read_csv(path, sep="\t", header=0, names=["user", "item", "rating", "ts"]))
print(json.dumps({"what": "load ml-1m (pandas.read_csv)", "seconds": round(load_s, 4), "events": len(df)}))

def split():
    d = df.assign(pos=np.arange(len(df))).sort_values(["user", "ts", "pos"], kind="stable")
    d["rank_from_end"] = d.groupby("user").cumcount(ascending=False)
    return d

split_s, d = median(split)
print(json.dumps({"what": "leave-one-out split (pandas)", "seconds": round(split_s, 4)}))

users = d["user"].astype("category")
items = d["item"].astype("category")
u = users.cat.codes.to_numpy()
i = items.cat.codes.to_numpy()
r = d["rank_from_end"].to_numpy()
n_users, n_items = len(users.cat.categories), len(items.cat.categories)
train = r >= 2
test_item = np.full(n_users, -1)
test_item[u[r == 0]] = i[r == 0]
pop = np.bincount(i[train], minlength=n_items).astype(np.float32)
scores = np.tile(pop, (n_users, 1))  # the given scores: popularity, as on the Rust side

def evaluate():
    hr = ndcg = 0.0
    for start in range(0, n_users, 512):
        s = scores[start:start + 512].copy()
        rows = np.arange(s.shape[0])
        sel = (u >= start) & (u < start + 512) & (r >= 1)  # mask train and validation items
        s[u[sel] - start, i[sel]] = -np.inf
        target = s[rows, test_item[start:start + 512]]
        rank = (s > target[:, None]).sum(axis=1)
        hit = rank < 10
        hr += hit.sum()
        ndcg += (hit / np.log2(rank + 2)).sum()
    return hr / n_users, ndcg / n_users

eval_s, (hr, ndcg) = median(evaluate)
print(json.dumps({"what": f"full-ranking evaluation numpy ({n_users} x {n_items})", "seconds": round(eval_s, 4), "hr10": round(float(hr), 4)}))
