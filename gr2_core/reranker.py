"""A trained GR2 reranker as one self-contained folder, and the request path that serves it.

The bundle holds everything a request needs, so serving never reads the pipeline's artifacts:

| file | what |
| --- | --- |
| `model/` | the causal LM and its tokenizer (a Hugging Face folder) |
| `catalogue.json` | per item id: its SID, inline name and caption (the prompt's item lines) |
| `settings.json` | prompt and decoding settings the model was trained and evaluated with |
| `train_sequences.parquet` | training interactions, only when the prompt carries co-watch notes |

A request is a user's history and the retriever's candidates (item ids). The prompt is the one of
SFT, RL and evaluation (`gr2_core.prompts.student_messages` with the bundled `prompt` settings);
the answer comes from the bundled `method` (`gr2_core.generation`, explanations budget-forced):
`scored` (the default) orders the candidates by the model's probability of each as the first
list item in one forward pass, `scored_explained` does so after a greedy explanation,
`constrained` decodes the list as a permutation of the candidates' SIDs, `free` lets the model
write it. An answer that fails the filter (`gr2_core.prompts.check_answer`) is reported as
`valid = False` with its reason, and its list falls back to the input order.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import polars as pl
from pydantic import BaseModel, ConfigDict, model_validator

from data_contracts.config import AnswerMethod, PromptConfig
from gr2_core.catalogue import Catalogue
from gr2_core.prompts import CoWatch, check_answer, student_messages


class RerankRequestError(ValueError):
    """A request the reranker cannot answer; the message names the row, the field and the value."""


class RerankSettings(BaseModel):
    """What the bundled model expects: its prompt settings (the run's `prompt` section) and
    decoding."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    variant: str
    prompt: PromptConfig = PromptConfig()
    method: AnswerMethod = "scored"
    batch_size: int = 8
    # request limits: a request past one is refused (HTTP 400 from the scoring server) with
    # the limit named, before any work; the prompt shows the last `prompt.history_items` only
    max_rows: int = 64
    max_candidates: int = 100
    max_history: int = 5000

    @model_validator(mode="before")
    @classmethod
    def _flat_prompt(cls, data: object) -> object:
        """Bundles registered before the `prompt` section kept its fields at the top level;
        before budget forcing they also had `max_new_tokens` (the reasoning budget, in the
        prompt settings, now bounds an answer), and before scoring mode `constrained`."""
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if k != "max_new_tokens"}
            if "constrained" in data:  # before scoring mode: constrained list or free answer
                data["method"] = "constrained" if data.pop("constrained") else "free"
            flat = {k: data[k] for k in PromptConfig.model_fields if k in data}
            if flat:
                data = {k: v for k, v in data.items() if k not in flat}
                data["prompt"] = {**dict(data.get("prompt") or {}), **flat}
        return data


def save_bundle(
    folder: Path,
    model_dir: Path,
    cat: Catalogue,
    settings: RerankSettings,
    sequences: pl.DataFrame | None = None,
) -> Path:
    """Write a reranker bundle to `folder` (created; must not exist)."""
    folder.mkdir(parents=True)
    shutil.copytree(model_dir, folder / "model")
    catalogue = {"sid": cat.sid, "name": cat.name, "caption": cat.caption}
    (folder / "catalogue.json").write_text(json.dumps(catalogue, ensure_ascii=False))
    (folder / "settings.json").write_text(settings.model_dump_json(indent=2))
    if settings.prompt.cowatch_notes:
        if sequences is None:
            raise ValueError("settings.prompt.cowatch_notes needs the training sequences")
        sequences.select("user_id", "items", "n").write_parquet(folder / "train_sequences.parquet")
    return folder


def check_request(
    row: int,
    history: object,
    candidates: object,
    known: Mapping[str, str],
    limits: RerankSettings | None = None,
) -> tuple[list[str], list[str]]:
    """Validate one request; returns (history, candidates) as lists of item ids. `limits`: the
    bundle's `max_history` and `max_candidates` (None: no limits)."""
    most = {}
    if limits is not None:
        most = {"history": limits.max_history, "candidates": limits.max_candidates}

    def items(field: str, value: object) -> list[str]:
        if value is None:
            return []
        if isinstance(value, str) or not isinstance(value, Sequence | np.ndarray):
            raise RerankRequestError(
                f"row {row}: field '{field}' must be a list of item ids, got "
                f"{type(value).__name__} {str(value)[:80]!r}"
            )
        if field in most and len(value) > most[field]:
            raise RerankRequestError(
                f"row {row}: field '{field}' has {len(value)} items; this model takes at most "
                f"{most[field]} (max_{field} in its settings)"
            )
        out = [str(v) for v in value]
        unknown = [v for v in out if v not in known]
        if unknown:
            raise RerankRequestError(
                f"row {row}: unknown item id(s) in '{field}': {unknown[:5]}"
                + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else "")
                + " (not in the model's catalogue)"
            )
        return out

    hist, cands = items("history", history), items("candidates", candidates)
    if not cands:
        raise RerankRequestError(f"row {row}: field 'candidates' is empty; nothing to rerank")
    dupes = sorted({c for c in cands if cands.count(c) > 1})
    if dupes:
        raise RerankRequestError(f"row {row}: duplicate item id(s) in 'candidates': {dupes[:5]}")
    return hist, cands


class Reranker:
    """A loaded bundle: `rerank` answers requests, `messages` builds their prompts."""

    def __init__(self, folder: Path, device: str | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = Path(folder)
        raw = json.loads((folder / "catalogue.json").read_text())
        self.cat = Catalogue(raw["sid"], raw["name"], raw["caption"])
        self.settings = RerankSettings.model_validate_json((folder / "settings.json").read_text())
        self.tok = AutoTokenizer.from_pretrained(folder / "model")
        self.model = AutoModelForCausalLM.from_pretrained(folder / "model").eval()
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device != "cpu":
            self.model = self.model.to(device, dtype=torch.bfloat16)
        self.valid_sids = frozenset(self.cat.sid.values())
        self.cowatch = None
        if self.settings.prompt.cowatch_notes:
            self.cowatch = CoWatch(pl.read_parquet(folder / "train_sequences.parquet"))

    def messages(self, user_id: str, history: Sequence[str], candidates: Sequence[str]) -> list:
        """The chat prompt of one slate, as SFT, RL and evaluation build it."""
        prompt = self.settings.prompt
        return student_messages(history, candidates, self.cat, prompt, self.cowatch, user_id)

    def rerank(
        self,
        histories: Sequence[object],
        candidates: Sequence[object],
        user_ids: Sequence[str] | None = None,
    ) -> list[dict]:
        """One answer per request: `recommendations` (item ids, best first), `explanation`,
        `valid` and `reason` (the filter's verdict on the model's answer), `seconds`."""
        from gr2_core.generation import HFEngine

        s = self.settings
        if len(histories) > s.max_rows:
            raise RerankRequestError(
                f"{len(histories)} rows in one request; this model takes at most {s.max_rows} "
                "(max_rows in its settings): split the request"
            )
        requests = [
            check_request(i, h, c, self.cat.sid, s)
            for i, (h, c) in enumerate(zip(histories, candidates, strict=True))
        ]
        users = [str(u) if u is not None else "" for u in (user_ids or [""] * len(requests))]
        prompts = [self.messages(u, h, c) for u, (h, c) in zip(users, requests, strict=True)]
        slates = [[self.cat.sid[c] for c in cands] for _, cands in requests]
        start = time.perf_counter()
        engine = HFEngine(self.model, self.tok, s.batch_size)
        n = s.prompt.history_items
        shown = [[self.cat.sid[h] for h in hist[-n:] if h in self.cat.sid] for hist, _ in requests]
        done = engine.run(prompts, slates, s.method, s.prompt.max_explanation_tokens, shown)
        texts = [c.text for c in done]
        took = time.perf_counter() - start
        out = []
        for (_, cands), slate, text in zip(requests, slates, texts, strict=True):
            verdict = check_answer(text, slate, self.valid_sids)
            by_sid = dict(zip(slate, cands, strict=True))
            if verdict.accepted:
                recs = [by_sid[sid] for sid in verdict.answer.recommendations]
            else:
                recs = list(cands)  # the retriever's order: a usable list, flagged invalid
            explanation = verdict.answer.explanation if verdict.answer is not None else ""
            out.append(
                {
                    "recommendations": recs,
                    "explanation": explanation,
                    "valid": verdict.accepted,
                    "reason": verdict.reason,
                    "seconds": took / len(requests),
                }
            )
        return out


def answerable(rows: pl.DataFrame, known: Mapping[str, str], history_items: int) -> list[bool]:
    """Per slate (history, candidates, target): whether a reranker that knows the items in
    `known` can answer it: every candidate, the target and the shown history items known."""
    out = []
    for history, candidates, target in rows.select("history", "candidates", "target").iter_rows():
        shown = list(history)[-history_items:]
        out.append(all(i in known for i in [*shown, *candidates, target]))
    return out


def score_rows(reranker: Reranker, rows: pl.DataFrame) -> pl.DataFrame:
    """Rerank evaluation slates and score them as the evaluation stage does (an invalid answer
    is a miss): per-slate target rank, invalid and identity flags (`slate_results`)."""
    from gr2_core.metrics import rank_of
    from gr2_core.promotion import job_ids, slate_results

    n = reranker.settings.prompt.history_items
    histories = [list(h)[-n:] for h in rows["history"].to_list()]
    out = reranker.rerank(histories, rows["candidates"].to_list(), rows["user_id"].to_list())
    ranks, invalid, identity = [], [], []
    for answer, row in zip(out, rows.iter_rows(named=True), strict=True):
        ok = answer["valid"]
        ranks.append((rank_of(row["target"], answer["recommendations"]) or 0) if ok else 0)
        invalid.append(0.0 if ok else 1.0)
        identity.append(float(ok and answer["recommendations"] == list(row["candidates"])))
    return slate_results(job_ids(rows), np.array(ranks), np.array(invalid), np.array(identity))
