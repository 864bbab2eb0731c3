"""Python onnxruntime throughput on a saved `ort` model: the counterpart of
plugins/ort-ranker/benches/throughput.rs (same model, inputs tiled to the same batch sizes, one
session with the same intra-op threads). Prints one JSON line per batch size: the median pairs/s
over ROUNDS timed runs of about SECONDS each.
Usage: python bench_ort.py RANKER_DIR THREADS SECONDS ROUNDS BATCH[,BATCH...]"""
import json
import sys
import time

import numpy as np
import onnxruntime as ort
from safetensors.numpy import load_file


def main():
    ranker_dir, threads, seconds, rounds, batches = sys.argv[1:6]
    threads, seconds, rounds = int(threads), float(seconds), int(rounds)
    saved = load_file(f"{ranker_dir}/export_check.safetensors")
    saved.pop("expected")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(f"{ranker_dir}/model.onnx", opts, providers=["CPUExecutionProvider"])
    for batch in (int(b) for b in batches.split(",")):
        feeds = {}
        for name, t in saved.items():
            reps = -(-batch // t.shape[0])
            feeds[name] = np.ascontiguousarray(np.concatenate([t] * reps)[:batch])
        session.run(["score"], feeds)  # warm-up
        rates = []
        for _ in range(rounds):
            start, calls = time.perf_counter(), 0
            while time.perf_counter() - start < seconds:
                session.run(["score"], feeds)
                calls += 1
            rates.append(calls * batch / (time.perf_counter() - start))
        rates.sort()
        print(json.dumps({"impl": "python-onnxruntime", "batch": batch, "threads": threads, "pairs_per_s": rates[len(rates) // 2]}))


if __name__ == "__main__":
    main()
