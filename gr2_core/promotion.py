"""Challenger vs champion on one frozen evaluation set: the promotion rule.

Both models are scored slate by slate on the same slates (the set's digest must match; a
champion scored on another set is re-scored first). The challenger is promoted when

- its invalid rate and identity rate are at most the configured limits, and
- the comparison rests on at least `min_slates` slates (a smaller set refuses: its intervals
  are too wide to tell a better model from a worse one), and
- on every gated metric (default R@5 and NDCG@5) it is non-inferior to the champion: the lower
  end of the paired bootstrap interval of (challenger - champion), over slates, is at least
  `-margin`. With `non_inferiority` off the rule is permissive: the interval's upper end must be
  at least `-margin`, so a set too small to show anything promotes by lack of evidence.

The first model (no champion yet) is promoted when its rates are within the limits. The frozen
set is made of validation slates; test results are reported, never decided on.

`paired_differences` reports the same paired comparison for any two rerankers of an evaluation
(RL vs the pre-ranker order, RL vs SFT) without deciding anything.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from gr2_core.metrics import bootstrap_ci, ndcg_at_k, recall_at_k


def frozen_set_digest(rows: pl.DataFrame) -> str:
    """Content digest of an evaluation set: its slates' users, positions, histories,
    candidates and targets, in a canonical order."""
    cols = ["user_id", "position", "history", "candidates", "target"]
    ordered = rows.select(cols).sort("user_id", "position")
    payload = json.dumps(ordered.to_dicts(), sort_keys=True, default=str).encode()
    return hashlib.sha256(payload).hexdigest()[:16]


def job_ids(rows: pl.DataFrame) -> list[str]:
    return [f"{u}:{p}" for u, p in zip(rows["user_id"], rows["position"], strict=True)]


def slate_results(
    jobs: list[str], ranks: np.ndarray, invalid: np.ndarray, identity: np.ndarray
) -> pl.DataFrame:
    """Per slate of the frozen set: target rank (0 = miss or invalid), invalid and identity."""
    return pl.DataFrame(
        {
            "job": jobs,
            "rank": np.asarray(ranks, dtype=np.int64),
            "invalid": np.asarray(invalid, dtype=np.float64),
            "identity": np.asarray(identity, dtype=np.float64),
        }
    )


def metric_values(ranks: np.ndarray, metric: str) -> np.ndarray:
    """Per-slate values of `recall@K` or `ndcg@K`."""
    name, _, k = metric.partition("@")
    if name == "recall" and k.isdigit():
        return recall_at_k(ranks, int(k))
    if name == "ndcg" and k.isdigit():
        return ndcg_at_k(ranks, int(k))
    raise ValueError(f"unknown gated metric {metric!r}; use recall@K or ndcg@K")


SUMMARY_METRICS = ("recall@1", "recall@5", "recall@10", "ndcg@5", "ndcg@10")


def summarize(results: pl.DataFrame) -> dict[str, float]:
    """Mean ranking metrics and answer rates of per-slate results (`slate_results`)."""
    ranks = results["rank"].to_numpy()
    out = {m: float(metric_values(ranks, m).mean()) for m in SUMMARY_METRICS}
    out["invalid_rate"] = float(results["invalid"].mean())
    out["identity_rate"] = float(results["identity"].mean())
    return out


@dataclass(frozen=True)
class Gate:
    """The promotion rule's settings (see the module docstring)."""

    max_invalid_rate: float = 0.2
    max_identity_rate: float = 0.5
    metrics: tuple[str, ...] = ("recall@5", "ndcg@5")
    margin: float = 0.02
    non_inferiority: bool = True
    min_slates: int = 200
    samples: int = 1000
    confidence: float = 0.95
    seed: int = 0


@dataclass
class Decision:
    """The outcome, its reasons, and one row per check (for tags and the markdown report)."""

    promote: bool
    reasons: list[str]
    checks: list[dict] = field(default_factory=list)

    def markdown(self, title: str) -> str:
        verdict = "**promoted**" if self.promote else "**refused**"
        lines = [f"# {title}", "", f"Decision: {verdict}", ""]
        lines += [f"- {r}" for r in self.reasons]
        lines += ["", "| check | challenger | champion | difference [CI] | limit | pass |"]
        lines += ["| --- | --- | --- | --- | --- | --- |"]
        for c in self.checks:
            champ = "" if c["champion"] is None else f"{c['champion']:.4f}"
            diff = ""
            if c.get("diff") is not None:
                diff = f"{c['diff']:+.4f} [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}]"
            mark = "yes" if c["pass"] else "no"
            ours = f"{c['challenger']:.4f}"
            lines.append(f"| {c['check']} | {ours} | {champ} | {diff} | {c['limit']} | {mark} |")
        return "\n".join(lines) + "\n"


def _aligned(challenger: pl.DataFrame, champion: pl.DataFrame) -> pl.DataFrame:
    a, b = set(challenger["job"]), set(champion["job"])
    if a != b:
        raise ValueError(
            f"challenger and champion were scored on different slates ({len(a - b)} only in the "
            f"challenger's, {len(b - a)} only in the champion's); score both on one frozen set"
        )
    return challenger.join(champion, on="job", suffix="_champion")


def decide(challenger: pl.DataFrame, champion: pl.DataFrame | None, gate: Gate) -> Decision:
    """Apply the rule to per-slate results (`slate_results` tables) of the frozen set."""
    if challenger.is_empty():
        raise ValueError("the challenger has no evaluated slates; nothing to decide on")
    checks, reasons = [], []
    for rate, limit in (("invalid", gate.max_invalid_rate), ("identity", gate.max_identity_rate)):
        value = float(challenger[rate].mean())
        champ = None if champion is None else float(champion[rate].mean())
        ok = value <= limit
        row = {"check": f"{rate}_rate", "challenger": value, "champion": champ}
        checks.append(row | {"limit": f"<= {limit}", "pass": ok})
        if not ok:
            reasons.append(f"{rate} rate {value:.3f} is above the limit {limit}")
    if champion is None:
        reasons.insert(0, "no champion yet: the rate limits alone decide")
        for metric in gate.metrics:
            value = float(metric_values(challenger["rank"].to_numpy(), metric).mean())
            checks.append(
                {"check": metric, "challenger": value, "champion": None, "limit": ""}
                | {"pass": True}
            )
    else:
        both = _aligned(challenger, champion)
        n = both.height
        enough = n >= gate.min_slates
        checks.append(
            {"check": "slates", "challenger": float(n), "champion": float(n), "limit": ""}
            | {"limit": f">= {gate.min_slates}", "pass": enough}
        )
        if not enough:
            reasons.append(
                f"only {n} frozen-set slates; a comparison needs at least {gate.min_slates} "
                "(registry.min_slates; raise sft.scored_slates or sft.eval_slates, whichever the "
                "served method answers)"
            )
        for metric in gate.metrics:
            ours = metric_values(both["rank"].to_numpy(), metric)
            theirs = metric_values(both["rank_champion"].to_numpy(), metric)
            diff = ours - theirs  # paired: one resample of slates for both models
            _, lo, hi = bootstrap_ci({metric: diff}, gate.samples, gate.confidence, gate.seed)[
                metric
            ]
            if gate.non_inferiority:
                ok, limit = bool(lo >= -gate.margin), f"CI low >= -{gate.margin:g}"
            else:
                ok, limit = bool(hi >= -gate.margin), f"CI high >= -{gate.margin:g}"
            checks.append(
                {
                    "check": metric,
                    "challenger": float(ours.mean()),
                    "champion": float(theirs.mean()),
                    "diff": float(diff.mean()),
                    "ci_low": float(lo),
                    "ci_high": float(hi),
                    "limit": limit,
                    "pass": ok,
                }
            )
            if not ok:
                reasons.append(
                    f"{metric} is worse than the champion's: difference {diff.mean():+.4f} "
                    f"[{lo:+.4f}, {hi:+.4f}] over {n} slates"
                )
    promote = all(c["pass"] for c in checks)
    if promote:
        reasons.append("every check passed")
    return Decision(promote, reasons, checks)


def paired_differences(
    answers: pl.DataFrame,
    split: str,
    pairs: Sequence[tuple[str, str]],
    metrics: Sequence[str],
    samples: int,
    confidence: float,
    seed: int,
) -> pl.DataFrame:
    """Per (method, baseline) pair: mean per-slate difference of each metric on `split`'s slates
    that both were scored on, with a paired bootstrap CI (one resample of slates for both).

    `answers`: per-slate rows (split, method, job, rank), rank 0 = miss or invalid."""
    rows = []
    for ours, theirs in pairs:
        a = answers.filter((pl.col("split") == split) & (pl.col("method") == ours))
        b = answers.filter((pl.col("split") == split) & (pl.col("method") == theirs))
        both = a.select("job", "rank").join(
            b.select("job", pl.col("rank").alias("base_rank")), on="job"
        )
        if both.is_empty():
            continue
        mine, base = both["rank"].to_numpy(), both["base_rank"].to_numpy()
        diffs = {m: metric_values(mine, m) - metric_values(base, m) for m in metrics}
        for m, (mean, lo, hi) in bootstrap_ci(diffs, samples, confidence, seed).items():
            rows.append((ours, theirs, split, m, mean, lo, hi, both.height))
    return pl.DataFrame(
        rows,
        schema=["method", "baseline", "split", "metric", "diff", "ci_low", "ci_high", "n"],
        orient="row",
    )
