"""RecBole 1.2.1 (PyTorch, CPU) as the peer of recfuse's baselines, on the same data and split
(leave-one-out by time, full ranking; ML-1M: ratings >= 3), 2 threads.

  python scripts/bench-recbole.py epochs MODEL DATASET EPOCHS
      per-epoch training seconds (no evaluation), then test metrics after EPOCHS;
  python scripts/bench-recbole.py select MODEL DATASET
      Adam, validation NDCG@10 after every epoch, early stopping after 10 epochs without
      improvement (RecBole's stopping_step), best epoch's test metrics;
  python scripts/bench-recbole.py eval MODEL DATASET EVAL_BATCH_USERS EPOCHS
      trains EPOCHS, then times full-ranking evaluation of the test users (median of 5) with
      `eval_batch_size` = EVAL_BATCH_USERS × items (RecBole counts it in user-item pairs; its
      default, 4096, scores one ML-1M user per batch).

Run with `.cache/venv-recbole/bin/python` (scripts/bench-eval.sh sets it up). RecBole writes
log/ and saved/ into the working directory: they go to .cache/recbole-work."""
import logging, os, sys, time
import torch
from recbole.config import Config
from recbole.data import create_dataset, data_preparation
from recbole.utils import init_seed, get_model, get_trainer

mode, model, dataset_name = sys.argv[1], sys.argv[2], sys.argv[3]
data_path = os.path.abspath(".cache/data")
os.makedirs(".cache/recbole-work", exist_ok=True)
os.chdir(".cache/recbole-work")
torch.set_num_threads(2)
cfg = {
    "data_path": data_path, "dataset": dataset_name, "seed": int(os.environ.get("SEED", 42)),
    "load_col": {"inter": ["user_id", "item_id", "rating", "timestamp"]},
    "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full", "group_by": "user"},
    "metrics": ["Hit", "NDCG", "MRR"], "topk": [10], "valid_metric": "NDCG@10",
    "show_progress": False, "worker": 0,
    "embedding_size": 64, "hidden_size": 64, "learning_rate": 1e-3, "train_batch_size": 2048,
}
if dataset_name == "ml-1m":
    cfg["val_interval"] = {"rating": "[3,inf)"}
if model == "SASRec":
    cfg.update({"n_layers": 2, "n_heads": 1, "inner_size": 256, "hidden_dropout_prob": 0.2,
                "attn_dropout_prob": 0.2, "hidden_act": "relu", "MAX_ITEM_LIST_LENGTH": 50,
                "loss_type": "CE", "train_neg_sample_args": None})
if mode == "epochs":
    epochs = int(sys.argv[4])
    cfg.update({"epochs": epochs, "eval_step": epochs, "stopping_step": 1000})
elif mode == "select":
    cfg.update({"epochs": 300, "eval_step": 1, "stopping_step": 10})
elif mode == "eval":
    users_per_batch, epochs = int(sys.argv[4]), int(sys.argv[5])
    cfg.update({"epochs": epochs, "eval_step": epochs, "stopping_step": 1000})
logging.getLogger().setLevel(logging.WARNING)
if mode == "eval":
    # RecBole counts eval_batch_size in user-item pairs: size it from the item count.
    n_items = create_dataset(Config(model=model, config_dict=cfg)).item_num
    cfg["eval_batch_size"] = users_per_batch * n_items
config = Config(model=model, config_dict=cfg)
init_seed(config["seed"], config["reproducibility"])
logging.getLogger().setLevel(logging.WARNING)
dataset = create_dataset(config)
train, valid, test = data_preparation(config, dataset)
net = get_model(config["model"])(config, train.dataset).to(config["device"])
trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, net)

if mode == "select":
    t = time.perf_counter()
    best_valid, _ = trainer.fit(train, valid, saved=True, show_progress=False)
    result = trainer.evaluate(test, load_best_model=True, show_progress=False)
    print(f"{model} {dataset_name} select: best valid NDCG@10 {best_valid:.4f}, "
          f"test {dict(result)}, {time.perf_counter() - t:.1f} s")
    sys.exit(0)

times = []
for epoch in range(epochs):
    t = time.perf_counter()
    loss = trainer._train_epoch(train, epoch, show_progress=False)
    times.append(time.perf_counter() - t)
    if mode == "epochs":
        print(f"{model} epoch {epoch + 1}: {times[-1]:.2f} s, loss {float(loss if not isinstance(loss, tuple) else sum(loss)):.4f}", flush=True)
if mode == "epochs":
    result = trainer.evaluate(test, load_best_model=False, show_progress=False)
    print(f"{model} after {epochs} epochs, test: {dict(result)}")
    print(f"{model} median seconds per epoch: {sorted(times)[len(times) // 2]:.2f}")
else:
    runs = []
    for _ in range(5):
        t = time.perf_counter()
        result = trainer.evaluate(test, load_best_model=False, show_progress=False)
        runs.append(time.perf_counter() - t)
    print(f"{model} {dataset_name} eval ({users_per_batch} users/batch): median {sorted(runs)[2]:.3f} s "
          f"(runs {', '.join(f'{r:.3f}' for r in runs)}), test {dict(result)}")
