"""Mid-training data: the four SID alignment tasks of SPEC section 3, from the training split only.

Every sample is a list of segments `(text, trained)`; each segment is tokenized on its own and the
token ids are concatenated, so the loss mask falls exactly on segment boundaries and a prompt is
tokenized the same way at training and at evaluation time.

| task | text | loss on |
| --- | --- | --- |
| persona | user attributes, then recent items as `SID Title (year)` lines | every token |
| sequential | recent items as SIDs, then `Next:` | the next item's SID and EOS only |
| caption | an item's SID, then `Title (year) | genres` | the caption and EOS only |
| general | a chunk of English text (ACLSum papers, train split) | every token |

Leakage rule: for a user with n items, only items[: n - 2] are used (the valid target is
items[n - 2], the test target items[n - 1]); captions of `caption_holdout` items are kept out to
measure caption accuracy on SIDs the captioning task never showed.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from data_contracts.config import MidtrainConfig
from gr2_core.catalogue import Catalogue
from gr2_core.data import package_dir
from gr2_core.output import Log, StageOutput
from gr2_core.split import train_items

TASKS = ("persona", "sequential", "caption", "general")
IGNORE = -100
SEQ_PROMPT = "A user watched, oldest first:\n"
NEXT = "\nNext:\n"
CAPTION_PROMPT = "\nCaption:\n"
_TITLE = re.compile(r"^(.*) \((\d{4}|n/a)\)")

Segment = tuple[str, bool]  # (text, trained)


def parse_title(caption: str) -> str | None:
    """The title part of a generated caption `Title (year) | genres`, None if malformed."""
    m = _TITLE.match(caption.strip())
    return m.group(1) if m else None


def describe_user(attrs: dict[str, object]) -> str:
    """`age 25, gender F, occupation writer` from a users-table row (user_id and zip left out)."""
    skip = {"user_id", "zip_code", "zip"}
    parts = [f"{k} {v}" for k, v in attrs.items() if k not in skip and v not in (None, "")]
    return ", ".join(parts) or "no attributes"


def persona_sample(attrs: str, history: Sequence[str], cat: Catalogue) -> list[Segment]:
    lines = "\n".join(f"{cat.sid[i]} {cat.name[i]}" for i in history)
    return [(f"User: {attrs}.\nWatched, oldest first:\n{lines}", True)]


def sequential_prompt(history: Sequence[str], cat: Catalogue) -> str:
    return SEQ_PROMPT + "".join(cat.sid[i] for i in history) + NEXT


def sequential_sample(history: Sequence[str], target: str, cat: Catalogue) -> list[Segment]:
    return [(sequential_prompt(history, cat), False), (cat.sid[target], True)]


def caption_prompt(item: str, cat: Catalogue) -> str:
    return cat.sid[item] + CAPTION_PROMPT


def caption_sample(item: str, cat: Catalogue) -> list[Segment]:
    return [(caption_prompt(item, cat), False), (cat.caption[item], True)]


def aclsum_train_texts() -> list[str]:
    """Paragraphs of the ACLSum train-split papers (title, abstract, body), in file order."""
    root = package_dir("aclsum") / "dataset"
    ids = [json.loads(line)["id"] for line in (root / "train.jsonl").read_text().splitlines()]
    texts = []
    for pid in ids:
        path = root / "paper_jsons" / f"{pid}.json"
        if not path.exists():
            continue
        paper = json.loads(path.read_text())
        parse = paper.get("pdf_parse") or {}
        paras = [paper.get("title") or ""]
        paras += [p["text"] for p in parse.get("abstract", []) + parse.get("body_text", [])]
        texts.append("\n".join(p for p in paras if p))
    if not texts:
        raise FileNotFoundError(f"no ACLSum train papers under {root}; reinstall aclsum")
    return texts


def mixture_counts(ratios: dict[str, float], total: int) -> dict[str, int]:
    """Samples per task for `total` samples (largest-remainder rounding, sums to `total`)."""
    weights = np.array([ratios[t] for t in TASKS], dtype=float)
    exact = weights / weights.sum() * total
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts))[: total - counts.sum()]:
        counts[i] += 1
    return dict(zip(TASKS, counts.tolist(), strict=True))


def _draw(pool: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` indices into a pool: without replacement, cycling through reshuffles if short."""
    if pool == 0:
        raise ValueError("a task with a non-zero mixture share has no samples to draw from")
    reps = [rng.permutation(pool) for _ in range(-(-count // pool))]
    return np.concatenate(reps)[:count]


@dataclass
class MidtrainData:
    """The training mixture as segment lists, plus the held-out caption items."""

    samples: list[tuple[str, list[Segment]]]
    heldout_items: list[str]


def build_mixture(
    sequences: pl.DataFrame,
    users: pl.DataFrame | None,
    cat: Catalogue,
    ratios: dict[str, float],
    total: int,
    history_items: int,
    caption_holdout: float,
    general_texts: list[str],
    general_chars: int,
    seed: int,
) -> MidtrainData:
    """Draw `total` samples by the mixture ratios; every source is the training split."""
    rng = np.random.default_rng(seed)
    counts = mixture_counts(ratios, total)
    seen = train_items(sequences)
    positions = [(u, p) for u, items in seen.items() for p in range(1, len(items))]
    attrs = {}
    if users is not None:
        for row in users.iter_rows(named=True):
            attrs[row["user_id"]] = describe_user(row)
    items = sorted(cat.sid)
    n_hold = int(round(caption_holdout * len(items)))
    heldout = sorted(rng.choice(items, size=n_hold, replace=False).tolist()) if n_hold else []
    captioned = sorted(set(items) - set(heldout))
    chunks = [
        text[i : i + general_chars]
        for text in general_texts
        for i in range(0, len(text), general_chars)
    ]
    out: list[tuple[str, list[Segment]]] = []
    for task in TASKS:
        if counts[task] == 0:
            continue
        if task in ("persona", "sequential"):
            for j in _draw(len(positions), counts[task], rng):
                user, p = positions[j]
                seq = seen[user]
                if task == "persona":
                    window = seq[max(0, p + 1 - history_items) : p + 1]
                    out.append(
                        (task, persona_sample(attrs.get(user, "no attributes"), window, cat))
                    )
                else:
                    history = seq[max(0, p - history_items) : p]
                    out.append((task, sequential_sample(history, seq[p], cat)))
        elif task == "caption":
            for j in _draw(len(captioned), counts[task], rng):
                out.append((task, caption_sample(captioned[j], cat)))
        else:
            for j in _draw(len(chunks), counts[task], rng):
                out.append((task, [(chunks[j], True)]))
    order = rng.permutation(len(out))
    return MidtrainData([out[i] for i in order], heldout)


def heldout_loss_sets(
    mixture_args: dict,
    per_task: int,
    seed: int,
    train_table: pl.DataFrame,
    tok,
    max_length: int,
) -> dict[str, pl.DataFrame]:
    """Up to `per_task` tokenized samples per task for held-out loss curves: drawn like the
    mixture (`mixture_args` = `build_mixture`'s other arguments) with another seed, equal shares,
    any text the training table holds removed."""
    if not per_task:
        return {}
    args = mixture_args | {"ratios": {t: 1.0 for t in TASKS}}
    held = to_table(build_mixture(total=per_task * len(TASKS), seed=seed, **args), tok, max_length)
    held = held.filter(~pl.col("text").is_in(train_table["text"].implode()))
    sets = {t: held.filter(pl.col("task") == t) for t in TASKS}
    return {t: v for t, v in sets.items() if v.height}


def tokenize(segments: Sequence[Segment], tok, max_length: int, add_eos: bool = True) -> dict:
    """input_ids and labels (IGNORE where not trained); EOS closes the last (trained) segment.

    Too long samples lose tokens from the left, so the trained tail is always kept.
    """
    ids: list[int] = []
    labels: list[int] = []
    for text, trained in segments:
        part = tok.encode(text, add_special_tokens=False)
        ids += part
        labels += part if trained else [IGNORE] * len(part)
    if add_eos:
        ids.append(tok.eos_token_id)
        labels.append(tok.eos_token_id if segments[-1][1] else IGNORE)
    return {"input_ids": ids[-max_length:], "labels": labels[-max_length:]}


def to_table(data: MidtrainData, tok, max_length: int) -> pl.DataFrame:
    """The tokenized mixture (task, text, input_ids, labels) as one table."""
    rows = {"task": [], "text": [], "input_ids": [], "labels": []}
    for task, segments in data.samples:
        enc = tokenize(segments, tok, max_length)
        rows["task"].append(task)
        rows["text"].append("".join(t for t, _ in segments))
        rows["input_ids"].append(enc["input_ids"])
        rows["labels"].append(enc["labels"])
    return pl.DataFrame(
        rows,
        schema={
            "task": pl.Utf8,
            "text": pl.Utf8,
            "input_ids": pl.List(pl.Int64),
            "labels": pl.List(pl.Int64),
        },
    )


def eval_prompts(
    sequences: pl.DataFrame, split: str, history_items: int, users: int, seed: int
) -> pl.DataFrame:
    """Next-item evaluation rows (user_id, history, target) for a seeded subset of users.

    valid: history items[: n-2] -> target items[n-2]; test: items[: n-1] -> items[n-1]. The
    history is the most recent `history_items`, as in the sequential task.
    """
    offset = {"valid": 2, "test": 1}[split]
    rows = []
    for user, items, n in sequences.select("user_id", "items", "n").iter_rows():
        end = n - offset
        rows.append((user, items[max(0, end - history_items) : end], items[end]))
    df = pl.DataFrame(rows, schema=["user_id", "history", "target"], orient="row")
    if users and users < df.height:
        df = df.sample(users, seed=seed).sort("user_id")
    return df


def save_json(obj: object, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=2))


LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class MidtrainInputs:
    student: Path  # the student stage's model folder
    sid_levels: Path  # the student stage's SID level sizes (the SID tokens are the last rows)
    items: Path  # the data stage's items
    users: Path | None  # the data stage's user attributes (persona task), if the data has them
    sid_map: Path  # the semantic-ID stage's SID map
    sequences: Path  # the split stage's sequences


def run(
    inputs: MidtrainInputs,
    cfg: MidtrainConfig,
    out: Path,
    report_to: Sequence[str] = (),
    log: Log = LOG,
) -> StageOutput:
    """Stage `midtrain`: build the four-task mixture from the training split and mid-train the
    student (token warm-up, then everything); resumes from the newest checkpoint. `report_to`:
    the Trainer's loggers (the task passes "mlflow" with the stage run in the environment)."""
    from transformers import AutoTokenizer

    from gr2_core import plots
    from gr2_core.training import TrainSettings, train

    tok = AutoTokenizer.from_pretrained(inputs.student)
    cat = Catalogue.build(pl.read_parquet(inputs.items), pl.read_parquet(inputs.sid_map))
    users = pl.read_parquet(inputs.users) if inputs.users is not None else None
    common = dict(
        sequences=pl.read_parquet(inputs.sequences),
        users=users,
        cat=cat,
        ratios=cfg.mixture,
        history_items=cfg.history_items,
        caption_holdout=cfg.caption_holdout,
        general_texts=aclsum_train_texts(),
        general_chars=cfg.general_chars,
    )
    mix = build_mixture(total=cfg.total_samples, seed=cfg.seed, **common)
    table = to_table(mix, tok, cfg.max_length)
    eval_sets = heldout_loss_sets(
        common, cfg.eval_samples_per_task, cfg.seed + 1, table, tok, cfg.max_length
    )
    table.write_parquet(out / "train.parquet")
    save_json(mix.heldout_items, out / "heldout_items.json")
    counts = table.group_by("task").len()
    tokens = table.select(pl.col("input_ids").list.len().sum()).item()
    trained = table.select(
        pl.col("labels").list.eval(pl.element() != IGNORE).list.sum().sum()
    ).item()
    log.info(
        "midtrain: %d samples %s, %d tokens (%d trained), %d steps (%d token warm-up)",
        table.height,
        dict(counts.iter_rows()),
        tokens,
        trained,
        cfg.max_steps,
        cfg.warmup_steps,
    )
    samples = "\n\n".join(
        f"[{t}]\n{x}" for t, x in table.head(12).select("task", "text").iter_rows()
    )
    sizes = json.loads(inputs.sid_levels.read_text())["sizes"]
    first_new = len(tok) - (2 + sum(sizes))  # the SID tokens are the last rows
    settings = TrainSettings.from_config(cfg, report_to=tuple(report_to))
    model, history = train(
        inputs.student, table, eval_sets, out, settings, first_new, tok.pad_token_id
    )
    model.save_pretrained(out / "model", safe_serialization=True)
    tok.save_pretrained(out / "model")
    (out / "log_history.json").write_text(json.dumps(history, indent=1))
    plots.close(plots.midtrain_curves(history, cfg.warmup_steps, out / "curves.png"))
    final = [r for r in history if "train_runtime" in r]
    metrics = {"samples": float(table.height), "tokens": float(tokens)}
    metrics["trained_tokens"] = float(trained)
    if final:
        metrics["train_seconds"] = final[-1]["train_runtime"]
        metrics["tokens_per_second"] = tokens / max(final[-1]["train_runtime"], 1e-9)
    for r in reversed(history):
        if "loss" in r:
            metrics["final_train_loss"] = r["loss"]
            break
    files = {
        "model": "model",
        "train": "train.parquet",
        "heldout_items": "heldout_items.json",
        "log_history": "log_history.json",
        "plot": "curves.png",
    }
    return StageOutput(
        files,
        metrics,
        scratch=["checkpoints"],
        texts={"sample_texts.txt": samples},
        attach={"curves.png": "", "model": ""},
    )
