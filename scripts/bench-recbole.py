"""RecBole 1.2.1 (PyTorch, CPU) peer for BPR and SASRec seconds per epoch on ML-1M, with the
same data and settings recfuse uses (ratings >= 3, leave-one-out by time, dim 64; SASRec: 2
layers, 1 head, inner 256, max length 50, dropout 0.2, cross-entropy over all items).
Usage: .cache/venv-recbole/bin/python scripts/bench-recbole.py MODEL EPOCHS
Prints RecBole's per-epoch training times and test metrics; run it under /usr/bin/time -v for
peak memory. scripts/bench-train.sh runs it next to recfuse."""
import logging, os, sys, time
import torch
from recbole.config import Config
from recbole.data import create_dataset, data_preparation
from recbole.utils import init_seed, get_model, get_trainer

model, epochs = sys.argv[1], int(sys.argv[2])
# RecBole writes log/, log_tensorboard/ and saved/ into the working directory: keep them in .cache.
data_path = os.path.abspath(".cache/data")
os.makedirs(".cache/recbole-work", exist_ok=True)
os.chdir(".cache/recbole-work")
torch.set_num_threads(2)
common = {
    "data_path": data_path, "dataset": "ml-1m", "epochs": epochs, "seed": 42,
    "load_col": {"inter": ["user_id", "item_id", "rating", "timestamp"]},
    "val_interval": {"rating": "[3,inf)"},
    "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full", "group_by": "user"},
    "metrics": ["Hit", "NDCG", "MRR"], "topk": [10], "valid_metric": "NDCG@10",
    "eval_step": epochs, "stopping_step": 1000, "show_progress": False, "worker": 0,
    "embedding_size": 64, "hidden_size": 64, "learning_rate": 1e-3,
}
if model == "SASRec":
    common.update({"n_layers": 2, "n_heads": 1, "inner_size": 256, "hidden_dropout_prob": 0.2,
                   "attn_dropout_prob": 0.2, "hidden_act": "relu", "MAX_ITEM_LIST_LENGTH": 50,
                   "loss_type": "CE", "train_neg_sample_args": None, "train_batch_size": 2048})
else:
    common.update({"train_batch_size": 2048})
config = Config(model=model, config_dict=common)
init_seed(config["seed"], config["reproducibility"])
logging.getLogger().setLevel(logging.WARNING)
dataset = create_dataset(config)
train, valid, test = data_preparation(config, dataset)
net = get_model(config["model"])(config, train.dataset).to(config["device"])
trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, net)
times = []
for epoch in range(epochs):
    t = time.perf_counter()
    loss = trainer._train_epoch(train, epoch, show_progress=False)
    times.append(time.perf_counter() - t)
    print(f"{model} epoch {epoch + 1}: {times[-1]:.2f} s, loss {float(loss if not isinstance(loss, tuple) else sum(loss)):.4f}", flush=True)
result = trainer.evaluate(test, load_best_model=False, show_progress=False)
print(f"{model} after {epochs} epochs, test: {dict(result)}")
print(f"{model} median seconds per epoch: {sorted(times)[len(times) // 2]:.2f}")
