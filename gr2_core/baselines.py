"""Reference orderings of a slate, evaluated like any reranker.

- `preranker`: the slate as the pre-ranker ranked it (the bar GR2 must beat);
- `popularity`: candidates by interaction count in the pre-ranker's training data, ties kept in
  pre-ranker order (a stable sort);
- `random`: a seeded uniform shuffle per slate (the floor).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from data_contracts.config import EvalConfig
from data_contracts.tables import METRICS, validate
from gr2_core.metrics import metrics_table, rank_of
from gr2_core.output import Log, StageOutput
from gr2_core.report import to_markdown

LOG = logging.getLogger(__name__)

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


@dataclass(frozen=True)
class BaselinesInputs:
    slates: Path  # the candidates stage's slates
    preranker_train: Path  # the split stage's pre-ranker prefixes (popularity counts)
    title: str  # the report's heading


def run(
    inputs: BaselinesInputs,
    cfg: EvalConfig,
    out: Path,
    log: Log = LOG,
) -> StageOutput:
    """Stage `baselines`: the pre-ranker, popularity and random orders on valid and test, both
    modes, with bootstrap intervals; a long table and its markdown report."""
    orderings = {
        "preranker": preranker_order(),
        "popularity": popularity_order(item_counts(pl.read_parquet(inputs.preranker_train))),
        "random": random_order(cfg.seed),
    }
    metrics = evaluate_orderings(pl.read_parquet(inputs.slates), orderings, cfg, ("valid", "test"))
    metrics.write_parquet(out / "metrics.parquet")
    table = format_table(metrics)
    markdown = f"# {inputs.title}\n\nvalue [95% bootstrap CI]\n\n{to_markdown(table)}\n"
    (out / "metrics.md").write_text(markdown)
    flat = {
        f"{r['split']}/{r['method']}.{r['mode']}.{r['metric']}": r["value"]
        for r in metrics.iter_rows(named=True)
    }
    log.info("baselines:\n%s", to_markdown(table))
    return StageOutput(
        {"metrics": "metrics.parquet", "report": "metrics.md"},
        flat,
        texts={"metrics.md": markdown},
        tables={"metrics.csv": metrics},
    )
