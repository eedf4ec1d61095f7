"""Reranking prompts for the teacher (and later the student), and the strict answer contract.

The prompt follows the five principles of SPEC section 4: (1) role and task; (2) the full
collaborative context: the most recent history items and all candidates, each as
`SID Title (year) | genres`; (3) a domain-knowledge priming block (KP) that can be switched off:
movie-domain heuristics plus, per candidate, what the training split's co-watching statistics say;
(4) guidelines: cite items by SID, rank every candidate once; (5) three structured steps
(pattern recognition, complementary items, final selection), then one JSON object
`{"explanation": ..., "recommendations": [SID, ...]}`.

Two variants: targeted (the held-out item is revealed and must be explained and ranked first)
and rejection (nothing revealed; an answer is kept only if its top-1 is the target).

`check_answer` is the rejection filter: strict JSON and nothing around it, the schema, every
recommended SID a candidate, each exactly once, every SID cited in the explanation a known item,
(optionally) an explanation of at least a minimum length, and (optionally) the target first. It
returns the first failed rule as the rejection reason.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl
from pydantic import BaseModel, ConfigDict, ValidationError

from data_contracts.config import PromptConfig
from gr2_core.catalogue import Catalogue
from gr2_core.semantic_ids.sidmap import SID_BEGIN, SID_END
from gr2_core.split import train_items

SID_PATTERN = re.compile(re.escape(SID_BEGIN) + r".*?" + re.escape(SID_END))

ROLE = (
    "You are a recommendation expert for a movie streaming service. A retrieval model has "
    "proposed {n} candidate movies for a user. Rerank them so that the movie the user is most "
    "likely to watch next comes first."
)
KNOWLEDGE = (
    "Domain knowledge for movies:\n"
    "- Franchises and sequels: a user who watched one part of a series often watches the next.\n"
    "- Genre continuity: recent genres predict the next choice better than old ones.\n"
    "- Era continuity: users tend to stay within the release decades they have been watching.\n"
    "- Co-watching: movies often watched together by other users are likely next; the counts "
    "below come from the training interactions."
)
GUIDELINES = (
    "Guidelines:\n"
    "- Refer to every movie by its SID, exactly as written above.\n"
    "- Rank all {n} candidates, each exactly once, and no other movie."
)
STEPS = (
    "Think in three steps:\n"
    "1. Pattern recognition: what do the user's recent movies have in common?\n"
    "2. Complementary items: which candidates continue or complement those patterns?\n"
    "3. Final selection: order the candidates from most to least likely."
)
OUTPUT = (
    'Answer with one JSON object and nothing else: {"explanation": "<your reasoning, citing '
    'movies by SID>", "recommendations": ["<SID>", ...]} listing all candidates in your order.'
)
TARGET = (
    "The user actually watched {target} next. Explain, from the history and the candidates, why "
    "this movie fits, and rank it first."
)


class RerankAnswer(BaseModel):
    """The answer contract: an explanation and the candidates' SIDs, best first."""

    model_config = ConfigDict(extra="forbid", strict=True)

    explanation: str
    recommendations: list[str]


def answer_schema() -> dict:
    """JSON schema of the answer, for servers with structured output (vLLM's `json_schema`)."""
    return RerankAnswer.model_json_schema()


def item_line(item: str, cat: Catalogue) -> str:
    return f"{cat.sid[item]} {cat.caption[item]}"


def build_messages(
    history: Sequence[str],
    candidates: Sequence[str],
    cat: Catalogue,
    knowledge: bool = True,
    notes: Mapping[str, str] | None = None,
    target: str | None = None,
) -> list[dict[str, str]]:
    """Chat messages (system, user) for one slate; `target` given -> the targeted variant.

    `notes`: per-candidate KP notes (e.g. co-watching counts), shown only with `knowledge`.
    """
    n = len(candidates)
    parts = [
        "Watch history, oldest first:\n" + "\n".join(item_line(i, cat) for i in history),
        "Candidates (in the retrieval model's order):\n"
        + "\n".join(item_line(i, cat) for i in candidates),
    ]
    if knowledge:
        block = KNOWLEDGE
        if notes:
            block += "\n" + "\n".join(
                f"- {cat.sid[i]}: {notes[i]}" for i in candidates if i in notes
            )
        parts.append(block)
    parts += [GUIDELINES.format(n=n), STEPS]
    if target is not None:
        parts.append(TARGET.format(target=cat.sid[target]))
    parts.append(OUTPUT)
    return [
        {"role": "system", "content": ROLE.format(n=n)},
        {"role": "user", "content": "\n\n".join(parts)},
    ]


def student_messages(
    history: Sequence[str],
    candidates: Sequence[str],
    cat: Catalogue,
    prompt: PromptConfig,
    cowatch: CoWatch | None = None,
    user_id: str = "",
) -> list[dict]:
    """The reranker's prompt for one slate: the last `prompt.history_items` history items and the
    candidates, with the KP block and co-watch notes as `prompt` says. SFT, RL, evaluation and
    serving all call this, so the served prompt is the trained one; the teacher's is
    `build_messages` on the same settings plus the target."""
    shown, cands = list(history)[-prompt.history_items :], list(candidates)
    notes = None
    if prompt.cowatch_notes:
        if cowatch is None:
            raise ValueError("prompt.cowatch_notes needs the training sequences' co-watch counts")
        notes = cowatch.notes(user_id, shown, cands)
    return build_messages(shown, cands, cat, prompt.knowledge, notes)


class CoWatch:
    """Item co-occurrence counts over the training split (each user's items[:n-2]).

    For a user's slate, a candidate's note says how many training users watched it and how many
    co-watches it has with the history shown, the user's own sequence excluded.
    """

    def __init__(self, sequences: pl.DataFrame):
        from scipy import sparse

        train = train_items(sequences)
        self.index = {}
        rows, cols = [], []
        self.user_items: dict[str, set[str]] = {}
        for u, (user, items) in enumerate(train.items()):
            self.user_items[user] = set(items)
            for item in set(items):
                rows.append(u)
                cols.append(self.index.setdefault(item, len(self.index)))
        x = sparse.csr_matrix(
            (np.ones(len(rows), dtype=np.float32), (rows, cols)),
            shape=(len(train), len(self.index)),
        )
        self.counts = (x.T @ x).tocsr()

    def notes(self, user: str, history: Sequence[str], candidates: Sequence[str]) -> dict[str, str]:
        own = self.user_items.get(user, set())
        shown = [self.index[h] for h in history if h in self.index]
        out = {}
        for c in candidates:
            j = self.index.get(c)
            if j is None:
                out[c] = "no training user watched it"
                continue
            row = self.counts.getrow(j)
            watched = int(row[0, j]) - (c in own)
            co = int(row[0, shown].sum()) if shown else 0
            if c in own:  # remove the user's own co-watches
                co -= sum(1 for h in history if h in own and h in self.index)
            out[c] = f"watched by {watched} training users; {co} co-watches with the history shown"
        return out


@dataclass(frozen=True)
class Verdict:
    """The filter's decision on one output: accepted, else the first failed rule."""

    accepted: bool
    reason: str  # "accepted" or a rejection reason
    answer: RerankAnswer | None = None


REASONS = (
    "broken_json",
    "extra_text",
    "schema",
    "unknown_sid",
    "not_in_slate",
    "duplicate",
    "missing",
    "unknown_cited_sid",
    "short_explanation",
    "wrong_top1",
)


def parse_answer(text: str) -> tuple[RerankAnswer | None, str]:
    """Strictly parse one JSON answer: (answer, "ok") or (None, reason)."""
    stripped = text.strip()
    try:
        obj, end = json.JSONDecoder().raw_decode(stripped)
    except json.JSONDecodeError:
        start = stripped.find("{")
        if start > 0:  # JSON after some text
            try:
                json.JSONDecoder().raw_decode(stripped[start:])
                return None, "extra_text"
            except json.JSONDecodeError:
                pass
        return None, "broken_json"
    if stripped[end:].strip():
        return None, "extra_text"
    try:
        return RerankAnswer.model_validate(obj), "ok"
    except ValidationError:
        return None, "schema"


def check_answer(
    text: str,
    slate_sids: Sequence[str],
    valid_sids: set[str] | frozenset[str] | None,
    target_sid: str | None = None,
    min_explanation_chars: int = 0,
) -> Verdict:
    """Apply the filter rules in order; `target_sid` given -> the top-1 must be it.

    `valid_sids`: the catalogue's SIDs; None skips the two catalogue rules (unknown SID in the
    list, unknown SID cited in the explanation) and keeps the slate rules.
    `min_explanation_chars`: the explanation, stripped, must have at least this many characters
    (the teacher filter sets it; 0, the default, turns the rule off)."""
    answer, reason = parse_answer(text)
    if answer is None:
        return Verdict(False, reason)
    recs = answer.recommendations
    slate = set(slate_sids)
    if valid_sids is not None and any(s not in valid_sids for s in recs):
        return Verdict(False, "unknown_sid", answer)
    if any(s not in slate for s in recs):
        return Verdict(False, "not_in_slate", answer)
    if len(set(recs)) != len(recs):
        return Verdict(False, "duplicate", answer)
    if set(recs) != slate:
        return Verdict(False, "missing", answer)
    cited = SID_PATTERN.findall(answer.explanation)
    if valid_sids is not None and any(s not in valid_sids for s in cited):
        return Verdict(False, "unknown_cited_sid", answer)
    if len(answer.explanation.strip()) < min_explanation_chars:
        return Verdict(False, "short_explanation", answer)
    if target_sid is not None and recs[0] != target_sid:
        return Verdict(False, "wrong_top1", answer)
    return Verdict(True, "accepted", answer)
