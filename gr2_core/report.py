"""Markdown helpers for the tables the pipeline and the benchmarks write into docs/."""

from __future__ import annotations

import re
from pathlib import Path

import polars as pl


def method_label(stage: str, knowledge: bool = True, answer: str = "free") -> str:
    """The results tables' name for a reranker stage: sft_targeted -> sft-targeted, with
    ` kp-off` when its prompts had no domain-knowledge block (`prompt.knowledge` false), and the
    answer method after it unless free (`sft-targeted constrained`, `sft-targeted scored`)."""
    name = stage.replace("_", "-", 1) + ("" if knowledge else " kp-off")
    return name if answer == "free" else f"{name} {answer}"


def to_markdown(df: pl.DataFrame) -> str:
    """A GitHub-flavoured markdown table of `df`."""
    head = "| " + " | ".join(df.columns) + " |"
    sep = "|" + "|".join("---" for _ in df.columns) + "|"
    body = [
        "| " + " | ".join("" if v is None else str(v) for v in row) + " |" for row in df.iter_rows()
    ]
    return "\n".join([head, sep, *body])


def replace_section(path: Path, heading: str, body: str, title: str) -> str:
    """Put `## heading` + body into the markdown file at `path`, replacing an older copy.

    Other sections are kept, so several commands can each own a section of one page.
    """
    section = f"## {heading}\n\n{body.strip()}\n"
    text = path.read_text() if path.exists() else f"# {title}\n"
    pattern = re.compile(rf"^## {re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text).rstrip("\n") + "\n"
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return section


KEPT = "monitor/kept_rate"  # derived: rankable answers that left the target where it was

RL_SUMMARY = (
    ("rewards/rerank/mean", "reward"),
    ("rewards/rank/mean", "rank reward"),
    ("monitor/identity_rate", "identity rate"),
    (KEPT, "target kept"),
    ("monitor/improved_rate", "target up"),
    ("monitor/ndcg_at_5", "rollout NDCG@5"),
    ("monitor/invalid_rate", "invalid rate"),
    ("monitor/top1_demoted_rate", "top-1 demoted"),
    ("completions/mean_length", "completion tokens"),
)


def rl_steps(history: list[dict]) -> list[dict]:
    """The per-step rows of a DAPO log history, each with `monitor/kept_rate`: the share of
    rollouts that are rankable and leave the target at its input rank (copies of the input
    order among them), i.e. 1 - invalid - improved - worsened."""
    parts = ("monitor/invalid_rate", "monitor/improved_rate", "monitor/worsened_rate")
    rows = []
    for r in history:
        if "monitor/identity_rate" not in r:
            continue
        if all(k in r for k in parts):
            r = r | {KEPT: max(0.0, 1.0 - sum(r[k] for k in parts))}
        rows.append(r)
    return rows


def rl_training_table(histories: dict[str, list[dict]], window: int = 3) -> pl.DataFrame:
    """Per RL run: rollout batches ("steps") and each monitor's mean over the first and the last
    `window` of them ("first -> last"), from TRL log histories; the mean share of zero-variance
    groups before dynamic sampling and its extra generation rounds per batch; and the mean share
    of tokens the DAPO clip acted on over all optimizer steps."""
    rows = []
    for name, history in histories.items():
        steps = rl_steps(history)
        row: dict = {"run": name, "steps": len(steps)}
        for key, label in RL_SUMMARY:
            vals = [r[key] for r in steps if key in r]
            if vals:
                head = sum(vals[:window]) / len(vals[:window])
                tail = sum(vals[-window:]) / len(vals[-window:])
                row[label] = f"{head:.3g} -> {tail:.3g}"
            else:
                row[label] = "-"
        for key, label in (
            ("dynamic/zero_std_before", "zero-variance groups"),
            ("dynamic/extra_rounds", "extra rounds / step"),
        ):
            vals = [r[key] for r in steps if key in r]
            row[label] = f"{sum(vals) / len(vals):.3g}" if vals else "-"
        clipped = [r["clip_ratio/region_mean"] for r in history if "clip_ratio/region_mean" in r]
        row["clipped tokens"] = f"{sum(clipped) / len(clipped):.3g}" if clipped else "-"
        rows.append(row)
    return pl.DataFrame(rows)
