"""Score summarizers on one test condition: ROUGE-1/2/L F1, order preservation, speed.

A system is a callable (document, aspect) -> summary, run one document at a time so the
seconds per summary are its latency; summaries/s is the count over the summed seconds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import polars as pl

from gr2_core.metrics import bootstrap_ci
from gr2_core.summarization.baselines import timed
from gr2_core.summarization.data import SummaryPair
from gr2_core.summarization.metrics import order_score, rouge_scores

System = Callable[[str, str], str]
SCORES = ("rouge1", "rouge2", "rougeL", "order")


def score_system(
    name: str,
    system: System,
    pairs: Sequence[SummaryPair],
    sources: Sequence[str],
    condition: str,
    level: str = "word",
) -> pl.DataFrame:
    """One row per pair: prediction, ROUGE F1s, order score (NaN: < 2 matched tokens), seconds.
    `sources` are the documents exactly as the system read them (truncated, noised)."""
    run = timed(lambda i: system(sources[i], pairs[i].aspect), range(len(pairs)), name)
    rouge = rouge_scores([p.summary for p in pairs], run.outputs, level)
    order = [order_score(out, src, level) for out, src in zip(run.outputs, sources, strict=True)]
    return pl.DataFrame(
        {
            "condition": [condition] * len(pairs),
            "system": [name] * len(pairs),
            "id": [p.id for p in pairs],
            "prediction": run.outputs,
            "rouge1": rouge["rouge1"],
            "rouge2": rouge["rouge2"],
            "rougeL": rouge["rougeL"],
            "order": [None if np.isnan(o) else o for o in order],
            "seconds": run.seconds,
        },
        schema_overrides={"order": pl.Float64},
    )


def summary_table(scores: pl.DataFrame, samples: int, seed: int = 0) -> pl.DataFrame:
    """Per (condition, system): mean and 95% bootstrap CI of each score, pairs, summaries/s,
    mean latency. The order score averages over pairs with at least two matched tokens."""
    rows = []
    for (condition, system), part in scores.group_by(["condition", "system"], maintain_order=True):
        values = {k: part[k].to_numpy().astype(float) for k in ("rouge1", "rouge2", "rougeL")}
        ci = bootstrap_ci(values, samples, 0.95, seed)
        order = part["order"].drop_nulls().to_numpy().astype(float)
        order_ci = bootstrap_ci({"order": order}, samples, 0.95, seed)["order"]
        secs = float(part["seconds"].sum())
        row = {"condition": condition, "system": system, "n": part.height}
        for k in ("rouge1", "rouge2", "rougeL"):
            row[k], row[f"{k}_low"], row[f"{k}_high"] = ci[k]
        row["order"], row["order_low"], row["order_high"] = order_ci
        row["order_n"] = len(order)
        row["summaries_per_s"] = part.height / secs if secs > 0 else float("nan")
        row["latency_ms"] = 1000 * secs / max(part.height, 1)
        rows.append(row)
    return pl.DataFrame(rows)


def to_markdown_rows(table: pl.DataFrame) -> pl.DataFrame:
    """Display form: 'mean [low, high]' cells."""

    def cell(k: str) -> pl.Expr:
        return pl.format(
            "{} [{}, {}]",
            pl.col(k).round(3),
            pl.col(f"{k}_low").round(3),
            pl.col(f"{k}_high").round(3),
        ).alias(k)

    return table.select(
        "condition",
        "system",
        "n",
        *(cell(k) for k in ("rouge1", "rouge2", "rougeL", "order")),
        pl.col("summaries_per_s").round(2),
        pl.col("latency_ms").round(1),
    )


def pick_by_rouge_l(
    candidates: Sequence[int],
    make_system: Callable[[int], System],
    pairs: Sequence[SummaryPair],
    sources: Sequence[str],
    level: str = "word",
) -> tuple[int, dict[int, float]]:
    """The candidate (e.g. an output length) whose system scores the best mean ROUGE-L on
    `pairs` (the validation split), with every candidate's score; the first candidate when there
    are no pairs."""
    scores: dict[int, float] = {}
    if not pairs:
        return candidates[0], scores
    refs = [p.summary for p in pairs]
    for c in dict.fromkeys(candidates):
        system = make_system(c)
        preds = [system(src, p.aspect) for p, src in zip(pairs, sources, strict=True)]
        scores[c] = float(rouge_scores(refs, preds, level)["rougeL"].mean())
    return max(scores, key=scores.get), scores
