"""The grounded teacher (mode `grounded`): rationales from the prompt's facts, no model call."""

from __future__ import annotations

import copy
import json

import polars as pl

import gr2_core.traces as tr
from data_contracts.config import PromptConfig, TeacherConfig
from gr2_core.catalogue import Catalogue
from gr2_core.decoding import fit_explanation
from gr2_core.grounded import franchise, rationale
from gr2_core.prompts import check_answer
from gr2_core.semantic_ids.sidmap import encode_sid, sid_tokens

TITLES = [
    ("Toy Story", 1995, ["Animation", "Comedy"]),
    ("Heat", 1995, ["Action", "Crime"]),
    ("Babe", 1995, ["Comedy", "Drama"]),
    ("Casino", 1995, ["Drama", "Crime"]),
    ("Toy Story 2", 1999, ["Animation", "Comedy"]),  # the target: a sequel of the history
    ("Alien", 1979, ["Horror", "Sci-Fi"]),
    ("Psycho", 1960, ["Horror"]),
    ("Godfather: Part II, The", 1974, ["Crime", "Drama"]),
]


def _catalogue() -> Catalogue:
    ids = [f"m{i}" for i in range(len(TITLES))]
    items = pl.DataFrame(
        {
            "item_id": ids,
            "title": [t for t, _, _ in TITLES],
            "year": [y for _, y, _ in TITLES],
            "categories": [g for _, _, g in TITLES],
        }
    )
    sids = pl.DataFrame({"item_id": ids, "sid": [encode_sid([i, 1, 2]) for i in range(len(ids))]})
    return Catalogue.build(items, sids)


def test_franchise_keys_match_sequels_and_ignore_short_titles():
    assert franchise("Toy Story 2") == franchise("Toy Story") == "toy story"
    assert franchise("Godfather: Part II, The") == franchise("Godfather, The") == "godfather"
    assert franchise("Alien") == "alien" and franchise("Heat") == "heat"
    assert franchise("Up") == ""  # too short to tell a franchise


def test_the_rationale_states_only_facts_the_prompt_shows_and_fits_the_budget(tokenizer):
    cat = _catalogue()
    history, candidates, target = ("m0", "m1", "m2", "m3"), ("m5", "m6", "m4", "m7"), "m4"
    notes = {"m5": "12", "m6": "3", "m4": "30", "m7": "30"}
    text = rationale(history, candidates, target, cat, notes)
    assert text.startswith("History: mostly Comedy and Crime, the '90s.")
    assert cat.sid["m4"] in text
    sid = cat.sid["m4"]
    assert f"{sid} continues Toy Story." in text  # the sequel of a history title
    assert "It is Comedy and Animation, from the '90s." in text  # the commoner genre first
    assert "30% of these viewers saw it, the slate's first." in text  # a tie ranks first
    student = copy.deepcopy(tokenizer)  # with the SID tokens, as the student's
    student.add_tokens(sid_tokens(3, [8, 8, 8]))
    assert fit_explanation(student, text, 64) == text  # within the default reasoning budget
    cut = fit_explanation(student, text, 30)  # a smaller budget drops the last reasons
    assert cut is not None and text.startswith(cut) and sid in cut
    # no fact, no claim: no notes, another era, no shared genre, no franchise
    bare = rationale(("m5", "m6"), ("m1", "m2"), "m1", cat)
    assert bare.endswith(f"{cat.sid['m1']} is the closest match to the history.")
    assert "%" not in bare


def test_a_grounded_stage_asks_no_model_and_accepts_every_slate_at_once(tmp_path):
    """Mode `grounded` alone never opens the teacher (no server python here, so opening it
    would fail); every slate is accepted at its first attempt with the target first and the
    other candidates in retrieval order, and a rerun finds every slate decided."""
    cat = _catalogue()
    ids = sorted(cat.sid)
    (tmp_path / "in").mkdir()
    items = pl.DataFrame(
        {
            "item_id": ids,
            "title": [t for t, _, _ in TITLES],
            "year": [y for _, y, _ in TITLES],
            "categories": [g for _, _, g in TITLES],
        }
    )
    items.write_parquet(tmp_path / "in" / "items.parquet")
    pl.DataFrame({"item_id": ids, "sid": [cat.sid[i] for i in ids]}).write_parquet(
        tmp_path / "in" / "sid_map.parquet"
    )
    slates = pl.DataFrame(
        [
            {
                "user_id": f"u{u}",
                "position": 4,
                "split": "train",
                "history": ids[u : u + 3],
                "target": ids[4 + u],
                "candidates": [ids[7 - u], ids[4 + u], ids[0]],
                "scores": [0.9, 0.5, 0.1],
                "target_rank": 2,
            }
            for u in range(3)
        ]
    )
    slates.write_parquet(tmp_path / "in" / "slates.parquet")
    seqs = pl.DataFrame(
        {
            "user_id": [f"u{u}" for u in range(3)],
            "items": [ids[u : u + 6] for u in range(3)],
            "n": [6] * 3,
        }
    )
    seqs.write_parquet(tmp_path / "in" / "sequences.parquet")
    inputs = tr.TracesInputs(
        *(tmp_path / "in" / f"{n}.parquet" for n in ("slates", "sequences", "items", "sid_map")),
        prompt=PromptConfig(history_items=3, cowatch_notes=True),
    )
    cfg = TeacherConfig(
        modes=["grounded"], slates=3, shards=2, server_python=str(tmp_path / "no-python")
    )
    out = tmp_path / "out"
    out.mkdir()
    result = tr.run(inputs, cfg, out)
    assert result.metrics["grounded/slate_acceptance"] == 1.0
    assert result.metrics["grounded/attempts"] == 3
    traces = pl.read_parquet(out / result.files["grounded_traces"])
    valid = frozenset(cat.sid.values())
    for row in traces.iter_rows(named=True):
        sids = [cat.sid[c] for c in row["candidates"]]
        answer = json.dumps(
            {"explanation": row["explanation"], "recommendations": row["recommendations"]}
        )
        assert check_answer(answer, sids, valid, cat.sid[row["target"]], 20).accepted
        rest = [cat.sid[c] for c in row["candidates"] if c != row["target"]]
        assert row["recommendations"] == [cat.sid[row["target"]], *rest]
    assert tr.run(inputs, cfg, out).metrics == result.metrics  # resumed: nothing new
