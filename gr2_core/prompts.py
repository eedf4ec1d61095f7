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

ROLE = "Rerank the {n} candidate movies so the one the user watches next comes first."
# the KP block; `[n]` after a candidate is its co-watch note (`CoWatch.notes`)
KNOWLEDGE = "Hints: sequels, recent genres and eras predict the next movie"
NOTES = "; [n] = % of this history's viewers who saw it"
GUIDELINES = "Rank all {n}, each once, citing SIDs."
STEPS = "Steps: history patterns, candidates that continue them, final order."
OUTPUT = 'JSON only: {{"explanation": "<max {words} words>", "recommendations": ["<SID>", ...]}}'
TARGET = "The user watched {target} next: explain why it fits and rank it first."
ALT_TITLE = re.compile(r"\s*\([^)]*\)")
NAME = re.compile(r"^(?P<title>.*) \((?P<year>\d{4}|n/a)\)$")


def explanation_words(max_explanation_tokens: int) -> int:
    """Words the prompt asks for: a SID costs 6 tokens and a word about 1.3, so half the token
    budget leaves room for a cited SID or two."""
    return max(5, max_explanation_tokens // 2)


class RerankAnswer(BaseModel):
    """The answer contract: an explanation and the candidates' SIDs, best first."""

    model_config = ConfigDict(extra="forbid", strict=True)

    explanation: str
    recommendations: list[str]


def answer_schema() -> dict:
    """JSON schema of the answer, for servers with structured output (vLLM's `json_schema`)."""
    return RerankAnswer.model_json_schema()


def shown_genres(caption: str) -> list[str]:
    """The genres the prompt shows of an item: the first three of its caption's."""
    return caption.rsplit(" | ", 1)[-1].split(", ")[:3]


def title_and_year(name: str) -> tuple[str, str] | None:
    """The title (alternative titles in parentheses dropped) and the year ("n/a" when unknown)
    of a catalogue name `Title (YYYY)`; None for a name of another shape."""
    m = NAME.match(name)
    if m is None:
        return None
    return ALT_TITLE.sub("", m["title"]).strip() or m["title"], m["year"]


def label(name: str, caption: str) -> str:
    """An item as the prompt shows it: `Title 'YY | genres` from the catalogue's `Title (YYYY)`
    name and caption, alternative titles in parentheses dropped, a title of more than six words
    cut to five and an ellipsis, at most three genres; about 3 tokens shorter than the caption
    on average (a digit is a token), much shorter on the long ones."""
    genres = ", ".join(shown_genres(caption))
    parsed = title_and_year(name)
    if parsed is None:
        return caption
    title, year = parsed
    words = title.split()
    if len(words) > 6:
        title = " ".join(words[:5]) + "…"
    year = f"'{year[2:]}" if year != "n/a" else "n/a"
    return f"{title} {year} | {genres}"


def item_line(item: str, cat: Catalogue, note: str | None = None) -> str:
    line = f"{cat.sid[item]} {label(cat.name[item], cat.caption[item])}"
    return f"{line} [{note}]" if note is not None else line


def build_messages(
    history: Sequence[str],
    candidates: Sequence[str],
    cat: Catalogue,
    knowledge: bool = True,
    notes: Mapping[str, str] | None = None,
    target: str | None = None,
    max_explanation_tokens: int = 64,
) -> list[dict[str, str]]:
    """Chat messages (system, user) for one slate; `target` given -> the targeted variant.

    `notes`: per-candidate KP notes (co-watch counts), shown after the candidate only with
    `knowledge`. The wording is kept short: a student prompt with 10 history items, 10
    candidates and notes stays under 600 tokens (`docs/benchmarks.md`, prompt lengths).
    """
    n = len(candidates)
    shown = notes if knowledge and notes else {}
    parts = [
        "History, oldest first:\n" + "\n".join(item_line(i, cat) for i in history),
        "Candidates, in retrieval order:\n"
        + "\n".join(item_line(i, cat, shown.get(i)) for i in candidates),
    ]
    if knowledge:
        parts.append(KNOWLEDGE + (NOTES if shown else "") + ".")
    parts.append(GUIDELINES.format(n=n) + " " + STEPS)
    if target is not None:
        parts.append(TARGET.format(target=cat.sid[target]))
    parts.append(OUTPUT.format(words=explanation_words(max_explanation_tokens)))
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
    return build_messages(
        shown,
        cands,
        cat,
        prompt.knowledge,
        notes,
        max_explanation_tokens=prompt.max_explanation_tokens,
    )


class CoWatch:
    """Item co-occurrence counts over the training split (each user's items[:n-2]).

    For a user's slate, a candidate's note says how many of the shown history's viewers also
    watched it (`notes`).
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
        """Per candidate: the share (in %) of the shown history's viewers who also watched it,
        sum over h of co-watchers(c, h) / sum over h of viewers(h), the user's own sequence
        excluded; two digits at most whatever the dataset's size."""
        own = self.user_items.get(user, set())
        shown = [h for h in history if h in self.index]
        cols = [self.index[h] for h in shown]
        viewers = sum(int(self.counts[j, j]) - (h in own) for h, j in zip(shown, cols, strict=True))
        mine = sum(1 for h in shown if h in own)  # the user's own co-watches of c with h
        out = {}
        for c in candidates:
            j = self.index.get(c)
            co = int(self.counts.getrow(j)[0, cols].sum()) if j is not None and cols else 0
            if c in own:
                co -= mine
            out[c] = str(round(100 * co / viewers)) if viewers > 0 else "0"
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
