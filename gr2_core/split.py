"""Per-user sequences and leave-one-out reranker samples with an out-of-sample pre-ranker.

For a user with chronological items s_0..s_{n-1} and holdout m (SPEC section 1):
- the pre-ranker's prefix is s_0..s_{n-m-1} (none when n <= m): it trains on s_0..s_{n-m-2}
  and its early stopping scores s_{n-m-1} (`gr2_core.preranker.hold_out_monitor`);
- reranker samples are the positions p whose item s_p is the target and whose history is the
  (capped) prefix before p: p in n-m..n-3 -> "train", p = n-2 -> "valid", p = n-1 -> "test".
Positions with an empty history (p = 0, only possible when n <= m) are skipped. So every slate
the pre-ranker produces is for a position it never saw in training.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from data_contracts.config import SplitConfig
from data_contracts.tables import SAMPLES, SEQUENCES, validate
from gr2_core.output import StageOutput


def build_sequences(interactions: pl.DataFrame) -> pl.DataFrame:
    """One row per user: items and timestamps in chronological order (input is sorted)."""
    seqs = interactions.group_by("user_id", maintain_order=True).agg(
        pl.col("item_id").alias("items"), pl.col("timestamp").alias("timestamps")
    )
    seqs = seqs.with_columns(pl.col("items").list.len().cast(pl.Int64).alias("n"))
    return validate(SEQUENCES, seqs.sort("user_id"), "sequences")


def split_name(position: int, n: int) -> str:
    """Which reranker split position `position` of an n-item sequence belongs to."""
    if position == n - 1:
        return "test"
    if position == n - 2:
        return "valid"
    return "train"


def build_samples(sequences: pl.DataFrame, holdout: int, max_history: int) -> pl.DataFrame:
    """Reranker samples (user, position, split, capped history, target) for the last m positions."""
    rows: dict[str, list] = {k: [] for k in ("user_id", "position", "split", "history", "target")}
    for user, items, n in sequences.select("user_id", "items", "n").iter_rows():
        for p in range(max(1, n - holdout), n):
            rows["user_id"].append(user)
            rows["position"].append(p)
            rows["split"].append(split_name(p, n))
            rows["history"].append(items[max(0, p - max_history) : p])
            rows["target"].append(items[p])
    df = pl.DataFrame(
        rows,
        schema={
            "user_id": pl.Utf8,
            "position": pl.Int64,
            "split": pl.Utf8,
            "history": pl.List(pl.Utf8),
            "target": pl.Utf8,
        },
    )
    return validate(SAMPLES, df, "samples")


def preranker_sequences(sequences: pl.DataFrame, holdout: int) -> pl.DataFrame:
    """Training prefixes for the pre-ranker: each sequence minus its last `holdout` items.

    A user with n <= holdout items has no prefix (polars' `head` of a negative length would
    return the whole list, targets included); prefixes of fewer than 2 items are left out too."""
    keep = (pl.col("n") - holdout).clip(lower_bound=0)
    return sequences.select("user_id", pl.col("items").list.head(keep).alias("items")).filter(
        pl.col("items").list.len() >= 2
    )


@dataclass(frozen=True)
class SplitInputs:
    interactions: Path  # the data stage's filtered interactions, sorted by user and time
    max_history: int  # `data.max_history`: items kept before a sample's position


def run(inputs: SplitInputs, cfg: SplitConfig, out: Path) -> StageOutput:
    """Stage `split`: sequences, train/valid/test samples, and the pre-ranker's prefixes."""
    seqs = build_sequences(pl.read_parquet(inputs.interactions))
    samples = build_samples(seqs, cfg.holdout, inputs.max_history)
    prefixes = preranker_sequences(seqs, cfg.holdout)
    seqs.write_parquet(out / "sequences.parquet")
    samples.write_parquet(out / "samples.parquet")
    prefixes.write_parquet(out / "preranker_train.parquet")
    counts = dict(samples.group_by("split").len().iter_rows())
    metrics = {f"samples_{k}": float(v) for k, v in counts.items()}
    metrics["preranker_train_users"] = prefixes.height
    metrics["preranker_train_interactions"] = float(
        prefixes.select(pl.col("items").list.len().sum()).item()
    )
    files = {
        "sequences": "sequences.parquet",
        "samples": "samples.parquet",
        "preranker_train": "preranker_train.parquet",
    }
    return StageOutput(files, metrics)


def train_items(sequences: pl.DataFrame) -> dict[str, list[str]]:
    """Per user, the items mid-training may see: all but the valid and test targets."""
    return {
        u: items[: n - 2] for u, items, n in sequences.select("user_id", "items", "n").iter_rows()
    }
