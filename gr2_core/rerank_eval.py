"""Evaluation of a generative reranker's answers on conditional slates (target in the slate).

For each slate the answer text goes through the strict parser and filter (no target rule): a
valid answer gives the target's rank in the answer's order; an invalid one counts as a miss
(rank 0), so invalid outputs lower R@K/NDCG@K instead of leaving the sample. The identity rate
is the share of valid answers that repeat the input order (the reward-hacking signature).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl

from gr2_core.metrics import bootstrap_ci, per_sample_metrics, rank_of
from gr2_core.midtrain import Catalogue
from gr2_core.prompts import check_answer


def eval_slates(slates: pl.DataFrame, split: str, count: int, seed: int) -> pl.DataFrame:
    """Up to `count` slates of `split` that contain their target, drawn with `seed`."""
    pool = slates.filter((pl.col("split") == split) & pl.col("target_rank").is_not_null())
    if pool.height > count:
        pool = pool.sample(count, seed=seed).sort("user_id", "position")
    return pool


def score_answers(
    texts: Sequence[str], slates: pl.DataFrame, cat: Catalogue
) -> dict[str, np.ndarray]:
    """Per slate: target rank (0 if invalid), invalid flag, identity flag, rejection reason."""
    valid = frozenset(cat.sid.values())
    ranks, invalid, identity, reasons = [], [], [], []
    for text, row in zip(texts, slates.iter_rows(named=True), strict=True):
        slate = [cat.sid[c] for c in row["candidates"]]
        verdict = check_answer(text, slate, valid)
        reasons.append(verdict.reason)
        if verdict.accepted:
            recs = verdict.answer.recommendations
            ranks.append(rank_of(cat.sid[row["target"]], recs) or 0)
            invalid.append(0.0)
            identity.append(float(recs == slate))
        else:
            ranks.append(0)
            invalid.append(1.0)
            identity.append(0.0)
    return {
        "ranks": np.array(ranks, dtype=np.int64),
        "invalid": np.array(invalid),
        "identity": np.array(identity),
        "reasons": np.array(reasons, dtype=object),
    }


def coverage(slates: pl.DataFrame, split: str) -> tuple[float, int]:
    """(share of `split`'s slates that contain their target, number of slates)."""
    pool = slates.filter(pl.col("split") == split)
    if pool.is_empty():
        return 0.0, 0
    return float(pool["target_rank"].is_not_null().mean()), pool.height


def end_to_end_ci(
    values: np.ndarray, share: float, total: int, samples: int, confidence: float, seed: int
) -> tuple[float, float, float]:
    """(value, low, high) of an end-to-end metric: coverage x its conditional mean, where the
    conditional values come from the decoded slates and the coverage from all `total` slates of
    the split. Both are resampled (the decoded slates with replacement, the covered count as a
    binomial draw, i.e. a bootstrap of the covered flags of every slate), so the interval holds
    the uncertainty of both instead of treating the coverage as exact."""
    if len(values) == 0 or total == 0:
        return (float("nan"),) * 3
    rng = np.random.default_rng(seed + 1)
    idx = rng.integers(0, len(values), size=(samples, len(values)))  # (samples, n)
    conditional = values[idx].mean(axis=1)
    covered = rng.binomial(total, share, size=samples) / total
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(conditional * covered, [alpha, 1 - alpha])
    return share * float(values.mean()), float(lo), float(hi)


def reranker_table(
    method: str,
    split: str,
    ranks: np.ndarray,
    extra: dict[str, np.ndarray],
    samples: int,
    confidence: float,
    seed: int,
    cover: tuple[float, int] | None = None,
) -> pl.DataFrame:
    """Long table (method, split, mode, metric, value, ci_low, ci_high, n): R@1/5/10,
    NDCG@5/10 and the per-slate `extra` rates (invalid, identity, latency), with bootstrap CIs,
    on conditional slates; with `cover` = (coverage, slates of the split) also end to end.

    A slate without its target scores 0 whatever the reranker does, so the end-to-end value of
    a ranking metric is coverage x its conditional value (`end_to_end_ci`: both resampled). `n`
    is the number of slates decoded in both modes; the end-to-end rows also carry the coverage
    of the split's slates with its own interval."""
    values = per_sample_metrics(ranks, (1, 5, 10), (5, 10))
    values.pop("mrr")
    ranking = list(values)
    values |= extra
    stats = bootstrap_ci(values, samples, confidence, seed)
    n = len(ranks)
    rows = [(method, split, "conditional", m, *v, n) for m, v in stats.items()]
    if cover is not None:
        share, total = cover
        rows += [
            (
                method,
                split,
                "end_to_end",
                m,
                *end_to_end_ci(values[m], *cover, samples, confidence, seed),
                n,
            )
            for m in ranking
        ]
        alpha = (1 - confidence) / 2
        draws = np.random.default_rng(seed + 1).binomial(total, share, size=samples) / total
        lo, hi = np.quantile(draws, [alpha, 1 - alpha]) if total else (float("nan"),) * 2
        rows.append((method, split, "end_to_end", "coverage", share, float(lo), float(hi), n))
    return pl.DataFrame(
        rows,
        schema=["method", "split", "mode", "metric", "value", "ci_low", "ci_high", "n"],
        orient="row",
    )


METRICS = ["recall@1", "recall@5", "recall@10", "ndcg@5", "ndcg@10"]
METRICS += ["invalid_rate", "identity_rate", "seconds", "coverage"]
