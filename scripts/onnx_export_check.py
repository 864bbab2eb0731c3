"""The `ort` ranker's exported model in Python onnxruntime: loads RANKER_DIR/model.onnx, feeds
it the inputs saved in RANKER_DIR/export_check.safetensors (the training side's check pairs) and
compares its scores with the training side's (candle). Exit 1 beyond the tolerance.
Usage: python onnx_export_check.py RANKER_DIR [--json OUT]"""
import json
import sys

import numpy as np
import onnxruntime as ort
from safetensors.numpy import load_file

TOLERANCE = 1e-5


def main():
    ranker_dir = sys.argv[1]
    saved = load_file(f"{ranker_dir}/export_check.safetensors")
    expected = saved.pop("expected")
    session = ort.InferenceSession(f"{ranker_dir}/model.onnx", providers=["CPUExecutionProvider"])
    names = sorted(i.name for i in session.get_inputs())
    assert names == sorted(saved), f"model inputs {names} != saved inputs {sorted(saved)}"
    (scores,) = session.run(["score"], saved)
    diff = float(np.max(np.abs(scores.reshape(-1) - expected)))
    result = {
        "onnxruntime": ort.__version__,
        "pairs": int(expected.shape[0]),
        "inputs": {n: [str(saved[n].dtype), list(saved[n].shape)] for n in names},
        "max_abs_diff": diff,
        "tolerance": TOLERANCE,
        "ok": diff <= TOLERANCE,
    }
    print(json.dumps(result, indent=2))
    if "--json" in sys.argv:
        with open(sys.argv[sys.argv.index("--json") + 1], "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
