"""Ranking metrics with one relevant item, and bootstrap confidence intervals.

A sample is summarised by the 1-based rank of its target in the reranked slate, or `None`/0 when
the target is not in the slate (a miss). With one relevant item:

- Recall@K = 1[rank <= K]
- NDCG@K = 1 / log2(1 + rank) if rank <= K else 0 (the ideal DCG is 1)
- MRR = 1 / rank (0 for a miss)

"conditional" metrics average over slates that contain the target (the paper's table);
"end-to-end" metrics average over all samples, a miss counting 0; coverage is the share of
slates that contain the target.

>>> recall_at_k(np.array([1, 3, 0]), 1).tolist()
[1.0, 0.0, 0.0]
>>> round(float(ndcg_at_k(np.array([3]), 5)[0]), 4)
0.5
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

import numpy as np
import polars as pl


def _ranks(ranks: Sequence[int | None] | np.ndarray) -> np.ndarray:
    """Ranks as int64 with 0 for a miss."""
    arr = np.array([0 if r is None else r for r in ranks], dtype=np.int64)
    if (arr < 0).any():
        raise ValueError("ranks are 1-based; use 0 or None for a miss")
    return arr


def recall_at_k(ranks: Sequence[int | None] | np.ndarray, k: int) -> np.ndarray:
    """Per-sample Recall@k (hit rate with one relevant item)."""
    r = _ranks(ranks)
    return ((r >= 1) & (r <= k)).astype(np.float64)


def ndcg_at_k(ranks: Sequence[int | None] | np.ndarray, k: int) -> np.ndarray:
    """Per-sample NDCG@k with one relevant item."""
    r = _ranks(ranks)
    hit = (r >= 1) & (r <= k)
    out = np.zeros(len(r), dtype=np.float64)
    out[hit] = 1.0 / np.log2(1.0 + r[hit])
    return out


def mrr(ranks: Sequence[int | None] | np.ndarray) -> np.ndarray:
    """Per-sample reciprocal rank (0 for a miss)."""
    r = _ranks(ranks)
    out = np.zeros(len(r), dtype=np.float64)
    out[r >= 1] = 1.0 / r[r >= 1]
    return out


def coverage(ranks: Sequence[int | None] | np.ndarray) -> float:
    """Share of slates that contain the target."""
    r = _ranks(ranks)
    return float((r >= 1).mean()) if len(r) else 0.0


def per_sample_metrics(
    ranks: Sequence[int | None] | np.ndarray, ks: Sequence[int], ndcg_ks: Sequence[int]
) -> dict[str, np.ndarray]:
    """Every metric's per-sample values, keyed like `recall@5`, `ndcg@10`, `mrr`."""
    out = {f"recall@{k}": recall_at_k(ranks, k) for k in ks}
    out |= {f"ndcg@{k}": ndcg_at_k(ranks, k) for k in ndcg_ks}
    out["mrr"] = mrr(ranks)
    return out


def bootstrap_ci(
    values: dict[str, np.ndarray],
    samples: int,
    confidence: float,
    seed: int,
    clusters: Sequence[Hashable] | None = None,
) -> dict[str, tuple[float, float, float]]:
    """(mean, low, high) per metric: percentile bootstrap over samples, shared resamples.

    All metrics use the same resampled index sets, so their intervals are consistent.
    `clusters` (one label per sample) makes it a cluster bootstrap: each resample draws as many
    clusters as there are, with replacement, and averages every sample of the drawn clusters, so
    correlated samples (the aspect summaries of one paper) count as one unit of evidence.
    """
    n = len(next(iter(values.values()))) if values else 0
    if n == 0:
        return {name: (float("nan"),) * 3 for name in values}
    rng = np.random.default_rng(seed)
    alpha = (1 - confidence) / 2
    resample = (
        _iid_means(n, samples, rng)
        if clusters is None
        else _cluster_means(clusters, n, samples, rng)
    )
    out = {}
    for name, vals in values.items():
        lo, hi = np.quantile(resample(vals), [alpha, 1 - alpha])
        out[name] = (float(vals.mean()), float(lo), float(hi))
    return out


def _iid_means(
    n: int, samples: int, rng: np.random.Generator
) -> Callable[[np.ndarray], np.ndarray]:
    """values (n,) -> (samples,) means of i.i.d. resamples of the n samples."""
    idx = rng.integers(0, n, size=(samples, n))
    return lambda vals: vals[idx].mean(axis=1)


def _cluster_means(
    clusters: Sequence[Hashable], n: int, samples: int, rng: np.random.Generator
) -> Callable[[np.ndarray], np.ndarray]:
    """values (n,) -> (samples,) means over resamples of whole clusters (numbered in order of
    first appearance), weighted by cluster size."""
    if len(clusters) != n:
        raise ValueError(f"{len(clusters)} cluster labels for {n} samples")
    number = {c: i for i, c in enumerate(dict.fromkeys(clusters))}
    member = np.array([number[c] for c in clusters])  # (n,) cluster index of each sample
    idx = rng.integers(0, len(number), size=(samples, len(number)))  # drawn clusters
    drawn = np.bincount(member)[idx].sum(axis=1)  # (samples,) samples per resample
    return lambda vals: np.bincount(member, weights=vals)[idx].sum(axis=1) / drawn


def rank_of(target: str, ordered: Sequence[str]) -> int | None:
    """1-based rank of `target` in `ordered`, or None if absent."""
    try:
        return list(ordered).index(target) + 1
    except ValueError:
        return None


def metrics_table(
    method: str,
    split: str,
    ranks: Sequence[int | None] | np.ndarray,
    ks: Sequence[int],
    ndcg_ks: Sequence[int],
    samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> pl.DataFrame:
    """Long table (method, split, mode, metric, value, ci_low, ci_high, n) for both modes.

    A split where no slate holds its target (a weak pre-ranker on a small sample) has no
    conditional rows: a mean over no slates is not a number."""
    r = _ranks(ranks)
    rows = []
    for mode, sel in (("conditional", r >= 1), ("end_to_end", np.ones(len(r), dtype=bool))):
        if not sel.any():
            continue
        stats = bootstrap_ci(per_sample_metrics(r[sel], ks, ndcg_ks), samples, confidence, seed)
        rows += [(method, split, mode, m, *v, int(sel.sum())) for m, v in stats.items()]
    cov = coverage(r)
    cov_ci = bootstrap_ci({"c": (r >= 1).astype(float)}, samples, confidence, seed)["c"]
    rows.append((method, split, "end_to_end", "coverage", cov, cov_ci[1], cov_ci[2], len(r)))
    return pl.DataFrame(
        rows,
        schema=["method", "split", "mode", "metric", "value", "ci_low", "ci_high", "n"],
        orient="row",
    )
