"""Our SASRec pre-ranker vs RecBole's SASRec on the same MovieLens split, by full ranking.

Both models see the same 5-core MovieLens sequences (our loader, our tie rule), split
leave-one-out: train on s_0..s_{n-3}, validate on s_{n-2}, test on s_{n-1}; both rank the whole
catalogue with the user's history masked, and both use the same architecture (2 layers,
2 heads, 64-d, max length 50, dropout 0.2, CE loss). Each trains up to its epoch budget with
early stopping on validation NDCG@10, and is tested with its best-validation weights.
RecBole is run offline through its library API (not `quick_start`, which imports ray).

    python benchmarks/preranker.py --dataset ml-1m --ours-epochs 20 --recbole-epochs 1  # ~42 min
    python benchmarks/preranker.py --dataset ml-100k --ours-epochs 40 --recbole-epochs 10

One RecBole epoch on ML-1M takes about 24 minutes on 2 CPU cores (every prefix is a sample, and
only its last position is supervised), which is longer than our whole 20-epoch training: that is
why the default gives RecBole one epoch. Raise --recbole-epochs for a converged comparison.

Needs `pip install -r requirements-bench.txt` for RecBole's trainer. Writes a section of
docs/benchmarks.md (replacing the previous one for the same dataset) and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("OMP_NUM_THREADS", "2")

import polars as pl  # noqa: E402
import torch  # noqa: E402

from data_contracts.config import DataConfig, PrerankerConfig  # noqa: E402
from gr2_core import preranker as core  # noqa: E402
from gr2_core.data import load_tables, preprocess, resolve_sources  # noqa: E402
from gr2_core.report import replace_section  # noqa: E402
from gr2_core.split import build_sequences  # noqa: E402

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def sequences(dataset: str) -> pl.DataFrame:
    cfg = DataConfig(dataset=dataset)
    src = resolve_sources(cfg)
    return build_sequences(preprocess(load_tables(src), cfg, str(src.interactions)).interactions)


def run_ours(seqs: pl.DataFrame, epochs: int, lr: float, batch: int) -> dict:
    items = sorted({i for s in seqs["items"].to_list() for i in s})
    vocab = core.ItemVocab(items)
    ids = [vocab.encode(s) for s in seqs["items"].to_list()]
    cfg = PrerankerConfig(
        epochs=epochs, lr=lr, batch_size=batch, num_threads=torch.get_num_threads()
    )
    valid = ([s[:-2] for s in ids], [s[-2] for s in ids])
    start = time.perf_counter()
    model, history = core.train_sasrec([s[:-2] for s in ids], len(items), cfg, monitor=valid)
    seconds = time.perf_counter() - start
    test = core.full_rank_metrics(model, [s[:-1] for s in ids], [s[-1] for s in ids])
    best = max(history, key=lambda r: r["monitor_ndcg@10"])
    return {
        "hr@10": test["hr@10"],
        "ndcg@10": test["ndcg@10"],
        "seconds": seconds,
        "epochs": len(history),
        "best_epoch": int(best["epoch"]),
    }


def run_recbole(seqs: pl.DataFrame, epochs: int, batch: int, workdir: Path) -> dict:
    # RecBole 1.2.1 aliases NumPy 1 names that NumPy 2 removed; give them back for the benchmark
    import numpy as np
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.model.sequential_recommender import SASRec
    from recbole.trainer import Trainer
    from recbole.utils import init_seed

    for old, new in {"float_": np.float64, "complex_": np.complex128, "unicode_": np.str_}.items():
        if old not in np.__dict__:
            setattr(np, old, new)
    name = "bench"
    folder = workdir / name
    folder.mkdir(parents=True, exist_ok=True)
    # timestamps replaced by the position in our order, so RecBole's sort reproduces it exactly
    inter = (
        seqs.select("user_id", "items")
        .explode("items")
        .with_columns(pl.int_range(pl.len()).over("user_id").cast(pl.Float64).alias("timestamp"))
        .rename({"items": "item_id"})
    )
    inter = inter.with_columns(pl.col("item_id").str.replace_all("\t", " "))
    inter.rename(
        {"user_id": "user_id:token", "item_id": "item_id:token", "timestamp": "timestamp:float"}
    ).write_csv(folder / f"{name}.inter", separator="\t", quote_style="never")
    config = Config(
        model="SASRec",
        dataset=name,
        config_dict={
            "data_path": str(workdir),
            "checkpoint_dir": str(workdir / "saved"),
            "USER_ID_FIELD": "user_id",
            "ITEM_ID_FIELD": "item_id",
            "TIME_FIELD": "timestamp",
            "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
            "user_inter_num_interval": "[0,inf)",
            "item_inter_num_interval": "[0,inf)",
            "MAX_ITEM_LIST_LENGTH": 50,
            "hidden_size": 64,
            "inner_size": 256,
            "n_layers": 2,
            "n_heads": 2,
            "hidden_dropout_prob": 0.2,
            "attn_dropout_prob": 0.2,
            "loss_type": "CE",
            "train_neg_sample_args": None,
            "epochs": epochs,
            "train_batch_size": batch,
            "eval_batch_size": 4096,
            "learning_rate": 0.001,
            "stopping_step": 3,
            "eval_step": 1,
            "eval_args": {
                "split": {"LS": "valid_and_test"},
                "order": "TO",
                "mode": "full",
                "group_by": "user",
            },
            "metrics": ["Hit", "NDCG"],
            "topk": [10],
            "valid_metric": "NDCG@10",
            "device": "cpu",
            "use_gpu": False,
            "show_progress": False,
            "seed": 0,
            "reproducibility": True,
            "log_wandb": False,
            "worker": 0,
        },
    )
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    train, valid, test = data_preparation(config, dataset)
    model = SASRec(config, train.dataset)
    trainer = Trainer(config, model)
    start = time.perf_counter()
    trainer.fit(train, valid, saved=True, show_progress=False)
    seconds = time.perf_counter() - start
    # torch >= 2.6 loads weights_only by default; RecBole's checkpoint holds its config object
    state = torch.load(trainer.saved_model_file, weights_only=False)
    model.load_state_dict(state["state_dict"])
    result = trainer.evaluate(test, load_best_model=False, show_progress=False)
    epochs_run = len(trainer.train_loss_dict)
    return {
        "hr@10": float(result["hit@10"]),
        "ndcg@10": float(result["ndcg@10"]),
        "seconds": seconds,
        "epochs": epochs_run,
        "best_epoch": None,
    }


def write_section(dataset: str, rows: dict[str, dict], command: str) -> str:
    lines = [
        f"Command: `{command}`. Machine: {os.cpu_count()} CPU cores, torch threads "
        f"{torch.get_num_threads()}. Leave-one-out, full ranking of the last item with the "
        "history masked; both models 2 layers x 64-d, CE loss, early stopping on valid NDCG@10.",
        "",
        "| model | HR@10 | NDCG@10 | training wall time (s) | epochs run |",
        "|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['hr@10']:.4f} | {r['ndcg@10']:.4f} | {r['seconds']:.0f} | "
            f"{r['epochs']} |"
        )
    heading = f"Pre-ranker vs RecBole SASRec, {dataset}"
    return replace_section(DOC, heading, "\n".join(lines), "Benchmarks")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="ml-1m", choices=["ml-1m", "ml-100k"])
    parser.add_argument("--ours-epochs", type=int, default=20)
    parser.add_argument("--ours-lr", type=float, default=0.002)
    parser.add_argument("--ours-batch", type=int, default=128)
    parser.add_argument("--recbole-epochs", type=int, default=1)
    parser.add_argument("--recbole-batch", type=int, default=2048)
    parser.add_argument("--skip-recbole", action="store_true")
    args = parser.parse_args()
    seqs = sequences(args.dataset)
    rows = {
        "ours (gr2_core.preranker)": run_ours(seqs, args.ours_epochs, args.ours_lr, args.ours_batch)
    }
    print(json.dumps(rows, indent=1), flush=True)
    if not args.skip_recbole:
        with tempfile.TemporaryDirectory() as tmp:
            rows["RecBole 1.2.1 SASRec"] = run_recbole(
                seqs, args.recbole_epochs, args.recbole_batch, Path(tmp)
            )
    command = "python benchmarks/preranker.py " + " ".join(sys.argv[1:])
    print(write_section(args.dataset, rows, command.strip()))


if __name__ == "__main__":
    main()
