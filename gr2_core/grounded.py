"""The grounded teacher: rationales composed from the facts the prompt already shows.

A third trace source beside the LLM teacher's `targeted` and `rejection` modes, for the ablation
of issue 21 (what the student learns from grounded reasons against what a weak teacher writes)
and for format signal at volume: it costs no model call, so a run can have thousands of traces.
It knows the target, as the targeted mode does, and says so in its label; it is never used in
place of the LLM teacher unless `teacher.modes` names `grounded`.

For one slate it writes, within the reasoning budget, the history's dominant genres and era, then
why the target fits, each reason a fact the student's prompt holds: it continues a title of the
history (a sequel or a franchise), the genres it shares with the history, its era, and its
co-watch note (the share of the history's viewers who saw it, and its rank among the
candidates'). The list is the target, then the other candidates in their retrieval order: with
one relevant item per slate, only the target's place is evidence, so the rest keeps the
pre-ranker's order, which is also the easiest list for a small student to copy.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping, Sequence

from gr2_core.catalogue import Catalogue
from gr2_core.prompts import CoWatch, shown_genres, title_and_year
from gr2_core.teacher import TeacherReply, TeacherRequest

ARTICLE = re.compile(r",\s*(The|A|An|La|Le|Les|Il|El|Das|Der|Die)$")
SEQUEL = re.compile(r"(\s*[:\-].*|\s+(\d+|II|III|IV|V|VI|Part\s+\w+))$")


def title_year_genres(item: str, cat: Catalogue) -> tuple[str, int | None, list[str]]:
    """An item's title, year and genres as its prompt line shows them (`prompts.label`)."""
    title, year = title_and_year(cat.name[item]) or (cat.name[item], "n/a")
    genres = [g for g in shown_genres(cat.caption[item]) if g != "unknown"]
    return title, (int(year) if year.isdigit() else None), genres


def franchise(title: str) -> str:
    """A title's franchise key: the article moved back and the sequel mark or subtitle dropped
    ("Godfather: Part II, The" -> "godfather"); short keys are too generic to match."""
    base = ARTICLE.sub("", title).strip()
    base = SEQUEL.sub("", base).strip()
    return base.lower() if len(base) >= 4 else ""


def era(year: int | None) -> str | None:
    return None if year is None else f"the '{year // 10 % 10}0s"


def ordinal(k: int) -> str:
    return {1: "first", 2: "second", 3: "third"}.get(k, f"#{k}")


def rationale(
    history: Sequence[str],
    candidates: Sequence[str],
    target: str,
    cat: Catalogue,
    notes: Mapping[str, str] | None = None,
) -> str:
    """The grounded explanation of why `target` comes first (see the module docstring)."""
    facts = [title_year_genres(i, cat) for i in history]
    genre_counts = Counter(g for _, _, gs in facts for g in gs)
    top = [g for g, _ in genre_counts.most_common(2)]
    eras = Counter(era(y) for _, y, _ in facts if y is not None)
    main_era = eras.most_common(1)[0][0] if eras else None
    head = "History: mostly " + " and ".join(top) if top else "History: mixed genres"
    head += f", {main_era}." if main_era else "."

    title, year, genres = title_year_genres(target, cat)
    sid = cat.sid[target]
    # one sentence per reason, the most telling first, so that a budget cut at a sentence end
    # (`gr2_core.decoding.fit_explanation`) drops the weakest
    said = []
    key = franchise(title)
    follows = [t for t, _, _ in facts if key and franchise(t) == key and t != title]
    if follows:
        said.append(f"{sid} continues {follows[-1]}.")
    shared = sorted((g for g in genres if g in genre_counts), key=lambda g: -genre_counts[g])
    same_era = main_era is not None and era(year) == main_era
    if shared or same_era:
        traits = [" and ".join(shared[:2])] if shared else []
        traits += [f"from {main_era}"] if same_era else []
        said.append(f"{'It' if said else sid} is {', '.join(traits)}.")
    if notes and target in notes:
        share = int(notes[target])
        rank = 1 + sum(int(notes[c]) > share for c in candidates if c in notes)
        whose = "" if said else f"{sid}: "
        said.append(f"{whose}{share}% of these viewers saw it, the slate's {ordinal(rank)}.")
    if not said:
        said.append(f"{sid} is the closest match to the history.")
    return " ".join([head, *said])


def grounded_answer(
    history: Sequence[str],
    candidates: Sequence[str],
    target: str,
    cat: Catalogue,
    notes: Mapping[str, str] | None = None,
) -> str:
    """The whole answer JSON: the rationale, then the target and the rest in retrieval order."""
    order = [target] + [c for c in candidates if c != target]
    return json.dumps(
        {
            "explanation": rationale(history, candidates, target, cat, notes),
            "recommendations": [cat.sid[c] for c in order],
        },
        ensure_ascii=False,
    )


class GroundedTeacher:
    """The `Teacher` of mode `grounded`: one answer per request, composed from the request's
    slate (`TeacherRequest.slate_facts`: history, candidates, target and the user, as the
    traces stage's job holds them) instead of a model call. Deterministic: `n` and the seed
    change nothing, so a slate is decided at its first attempt."""

    name = "grounded"

    def __init__(self, cat: Catalogue, cowatch: CoWatch | None = None, knowledge: bool = True):
        self.cat = cat
        self.cowatch = cowatch if knowledge else None

    def answer(self, job) -> str:
        notes = None
        if self.cowatch is not None:
            notes = self.cowatch.notes(job.user_id, job.history, job.candidates)
        return grounded_answer(job.history, job.candidates, job.target, self.cat, notes)

    def sample_many(self, requests: Sequence[TeacherRequest], on_reply) -> None:
        for i, req in enumerate(requests):
            if req.slate_facts is None:
                raise ValueError("the grounded teacher needs each request's slate_facts")
            on_reply(i, TeacherReply([self.answer(req.slate_facts)], ["stop"]))
