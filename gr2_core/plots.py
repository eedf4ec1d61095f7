"""Figures the stages log to MLflow (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def preranker_curve(history: list[dict[str, float]], path: Path) -> plt.Figure:
    """Training loss and held-out NDCG@10 per epoch."""
    fig, ax1 = plt.subplots(figsize=(6, 3.5))
    epochs = [r["epoch"] for r in history]
    ax1.plot(epochs, [r["train_loss"] for r in history], "o-", label="train loss")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("cross-entropy")
    if "monitor_ndcg@10" in history[0]:
        ax2 = ax1.twinx()
        ax2.plot(
            epochs, [r["monitor_ndcg@10"] for r in history], "s--", color="C1", label="NDCG@10"
        )
        ax2.set_ylabel("held-out NDCG@10 (full ranking)")
    ax1.set_title("SASRec pre-ranker")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return fig


def codebook_usage(codes: np.ndarray, levels: int, path: Path) -> plt.Figure:
    """Items per code at each level, codes sorted by usage."""
    fig, axes = plt.subplots(1, levels + 1, figsize=(3 * (levels + 1), 2.8), sharey=False)
    for lvl, ax in enumerate(np.atleast_1d(axes)):
        counts = np.sort(np.bincount(codes[:, lvl]))[::-1]
        ax.bar(np.arange(len(counts)), counts, width=1.0)
        ax.set_title(f"level {lvl}" + (" (assigned)" if lvl == levels else ""))
        ax.set_xlabel("code (by usage)")
    np.atleast_1d(axes)[0].set_ylabel("items")
    fig.suptitle("Codebook usage")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return fig


def midtrain_curves(log_history: list[dict], warmup_steps: int, path: Path) -> plt.Figure:
    """Training loss and per-task held-out loss by optimizer step; the warm-up phase shaded."""
    fig, ax = plt.subplots(figsize=(7, 4))
    train = [(r["step"], r["loss"]) for r in log_history if "loss" in r]
    if train:
        ax.plot(*zip(*train, strict=True), "-", color="k", label="train loss")
    evals = sorted(
        {k for r in log_history for k in r if k.startswith("eval_") and k.endswith("_loss")}
    )
    for i, key in enumerate(evals):
        pts = [(r["step"], r[key]) for r in log_history if key in r]
        label = key.removeprefix("eval_").removesuffix("_loss") + " (held out)"
        ax.plot(*zip(*pts, strict=True), "o--", color=f"C{i}", label=label)
    if warmup_steps:
        ax.axvspan(0, warmup_steps, color="0.9", label="token warm-up")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy on trained tokens")
    ax.set_title("SID mid-training")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return fig


RL_PANELS = (
    ("rewards/rerank/mean", "reward R (the run's own)"),
    ("rewards/rank/mean", "rank reward R_rank (0: unrankable)"),
    ("monitor/identity_rate", "identity-permutation rate"),
    ("monitor/kept_rate", "target kept at its input rank"),
    ("monitor/improved_rate", "target moved up"),
    ("monitor/ndcg_at_5", "rollout NDCG@5"),
    ("monitor/invalid_rate", "invalid-output rate"),
    ("monitor/truncated_rate", "truncated-output rate"),
    ("monitor/top1_demoted_rate", "target demoted from first"),
    ("clip_ratio/region_mean", "clipped token share"),
)


def rl_curves(runs: dict[str, list[dict]], path: Path) -> plt.Figure:
    """Per training step, one line per run (TRL log histories): the reward, the rank reward
    (the same scale for every variant), the identity-permutation rate (the reward-hacking
    monitor), the shares of rollouts that keep the target at its input rank (copies among
    them) and that move it up, rollout NDCG@5, the invalid- and the truncated-output rates, the
    rate of demoted first-place targets, and the share of tokens the DAPO clip acted on (logged
    on every optimizer step; the rollout monitors once per rollout batch)."""
    from gr2_core.report import rl_steps

    cols = 4
    rows_ = -(-len(RL_PANELS) // cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(3.6 * cols, 3.0 * rows_), squeeze=False)
    axes = axes.flatten()
    for ax, (key, title) in zip(axes, RL_PANELS, strict=False):
        for name, history in runs.items():
            source = history if key.startswith("clip_ratio/") else rl_steps(history)
            rows = [r for r in source if key in r and "step" in r]
            ax.plot([r["step"] for r in rows], [r[key] for r in rows], marker=".", label=name)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
    for ax in axes[len(RL_PANELS) :]:
        ax.axis("off")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return fig


def ctc_curves(history: list[dict[str, float]], path: Path) -> plt.Figure:
    """CTC summarizer: train and validation loss per epoch."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train")
    ax.plot(epochs, [h["valid_loss"] for h in history], marker="o", label="validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("CTC loss per summary token")
    ax.set_title("CTC summarizer training")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return fig


def summarizer_bars(table, path: Path) -> plt.Figure:
    """ROUGE-L and order score (95% CI) per system, one group per test condition."""
    metrics = [("rougeL", "ROUGE-L F1"), ("order", "order (Kendall tau)")]
    conditions = list(dict.fromkeys(table["condition"].to_list()))
    systems = list(dict.fromkeys(table["system"].to_list()))
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.5))
    width = 0.8 / max(len(systems), 1)
    for ax, (key, label) in zip(axes, metrics, strict=True):
        for j, system in enumerate(systems):
            xs, ys, lo, hi = [], [], [], []
            for i, cond in enumerate(conditions):
                row = table.filter((table["condition"] == cond) & (table["system"] == system))
                if row.height:
                    xs.append(i + j * width)
                    ys.append(row[key][0])
                    lo.append(row[key][0] - row[f"{key}_low"][0])
                    hi.append(row[f"{key}_high"][0] - row[key][0])
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=system)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(conditions))], conditions)
        ax.set_ylabel(label)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return fig


def reranker_bars(table, path: Path, split: str = "test") -> plt.Figure:
    """R@5, NDCG@5 (95% CI, conditional and end to end) and invalid/identity rates per reranker
    on one split, from the long evaluation table (method, split, mode, metric, value, ci_*)."""
    rows = table.filter(table["split"] == split)
    methods = list(dict.fromkeys(rows["method"].to_list()))
    panels = [
        ("conditional", ["recall@5", "ndcg@5"], "conditional (target in slate)"),
        ("end_to_end", ["recall@5", "ndcg@5"], "end to end (all slates)"),
        ("conditional", ["invalid_rate", "identity_rate"], "answer rates"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 0.45 * len(methods) + 2))
    height = 0.8 / 2
    for ax, (mode, metrics, title) in zip(axes, panels, strict=True):
        for j, metric in enumerate(metrics):
            ys, xs, lo, hi = [], [], [], []
            for i, method in enumerate(methods):
                hit = rows.filter(
                    (rows["method"] == method) & (rows["mode"] == mode) & (rows["metric"] == metric)
                )
                if hit.height:
                    ys.append(i + j * height)
                    xs.append(hit["value"][0])
                    lo.append(hit["value"][0] - hit["ci_low"][0])
                    hi.append(hit["ci_high"][0] - hit["value"][0])
            ax.barh(ys, xs, height, xerr=[lo, hi], capsize=2, label=metric)
        ax.set_yticks([i + height / 2 for i in range(len(methods))], methods, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(f"{title}, {split}", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return fig


def close(fig: plt.Figure) -> None:
    """Free a figure once its PNG is written (a stage attaches the file, not the object)."""
    plt.close(fig)
