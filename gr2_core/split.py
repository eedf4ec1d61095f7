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

import polars as pl

from data_contracts.tables import SAMPLES, SEQUENCES, validate


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
