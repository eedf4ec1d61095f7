"""Reference orderings of a slate, evaluated like any reranker.

- `preranker`: the slate as the pre-ranker ranked it (the bar GR2 must beat);
- `popularity`: candidates by interaction count in the pre-ranker's training data, ties kept in
  pre-ranker order (a stable sort);
- `random`: a seeded uniform shuffle per slate (the floor).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import polars as pl

from data_contracts.config import EvalConfig
from data_contracts.tables import METRICS, validate
from gr2_core.metrics import metrics_table, rank_of

Reorder = Callable[[Sequence[str]], list[str]]


def preranker_order() -> Reorder:
    return list


def popularity_order(counts: dict[str, int]) -> Reorder:
    def reorder(slate: Sequence[str]) -> list[str]:
        return sorted(slate, key=lambda item: -counts.get(item, 0))

    return reorder


def random_order(seed: int) -> Reorder:
    rng = np.random.default_rng(seed)

    def reorder(slate: Sequence[str]) -> list[str]:
        return [slate[i] for i in rng.permutation(len(slate))]

    return reorder


def item_counts(train_sequences: pl.DataFrame) -> dict[str, int]:
    """Interactions per item in the pre-ranker's training prefixes."""
    counts = (
        train_sequences.select(pl.col("items").explode().alias("item_id")).group_by("item_id").len()
    )
    return dict(counts.iter_rows())


def evaluate_orderings(
    slates: pl.DataFrame, orderings: dict[str, Reorder], cfg: EvalConfig, splits: Sequence[str]
) -> pl.DataFrame:
    """Metrics (both modes, with CIs) of every ordering on every split."""
    tables = []
    for split in splits:
        part = slates.filter(pl.col("split") == split)
        for name, reorder in orderings.items():
            ranks = [
                rank_of(t, reorder(c))
                for t, c in zip(part["target"].to_list(), part["candidates"].to_list(), strict=True)
            ]
            tables.append(
                metrics_table(
                    name,
                    split,
                    ranks,
                    cfg.ks,
                    cfg.ndcg_ks,
                    cfg.bootstrap_samples,
                    cfg.confidence,
                    cfg.seed,
                )
            )
    return validate(METRICS, pl.concat(tables), "metrics")


def format_table(metrics: pl.DataFrame, metric_names: Sequence[str] | None = None) -> pl.DataFrame:
    """Wide view: one row per (split, mode, method), one 'value [low, high]' column per metric."""
    names = metric_names or ["recall@1", "recall@5", "recall@10", "ndcg@5", "ndcg@10", "coverage"]
    cell = pl.format(
        "{} [{}, {}]",
        pl.col("value").round(4),
        pl.col("ci_low").round(4),
        pl.col("ci_high").round(4),
    )
    wide = (
        metrics.filter(pl.col("metric").is_in(names))
        .with_columns(cell.alias("cell"))
        .pivot(
            on="metric",
            index=["split", "mode", "method", "n"],
            values="cell",
            aggregate_function="first",
        )
    )
    order = [c for c in names if c in wide.columns]
    return wide.select(["split", "mode", "method", "n", *order])
