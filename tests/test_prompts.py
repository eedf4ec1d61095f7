"""Reranking prompts, the strict answer filter, and the decoupled-weight SFT loss."""

from __future__ import annotations

import json
import math

import polars as pl
import pytest
import torch

from data_contracts.config import TeacherConfig
from gr2_core.catalogue import Catalogue
from gr2_core.decoding import answer_text
from gr2_core.prompts import REASONS, build_messages, check_answer, label, parse_answer
from gr2_core.rewards import judge
from gr2_core.semantic_ids.sidmap import encode_sid
from gr2_core.sft import token_weights, weighted_lm_loss


def _catalogue(n: int = 12) -> Catalogue:
    items = pl.DataFrame(
        {
            "item_id": [f"m{i}" for i in range(n)],
            "title": [f"Film {i}" for i in range(n)],
            "year": [1990 + i for i in range(n)],
            "categories": [["Drama"]] * n,
        }
    )
    sid_map = pl.DataFrame(
        {"item_id": items["item_id"], "sid": [encode_sid([i, 0]) for i in range(n)]}
    )
    return Catalogue.build(items, sid_map)


CAT = _catalogue()
SLATE = [CAT.sid[f"m{i}"] for i in (3, 4, 5)]
VALID = frozenset(CAT.sid.values())


def _answer(recs, explanation="History suggests " + SLATE[1] + ".") -> str:
    return json.dumps({"explanation": explanation, "recommendations": recs})


@pytest.mark.parametrize(
    ("text", "target", "reason"),
    [
        (_answer([SLATE[1], SLATE[0], SLATE[2]]), SLATE[1], "accepted"),
        (_answer([SLATE[1], SLATE[0], SLATE[2]]), None, "accepted"),  # targeted: no top-1 rule
        (_answer([SLATE[0], SLATE[1], SLATE[2]]), SLATE[1], "wrong_top1"),
        (_answer([SLATE[1], SLATE[1], SLATE[2]]), SLATE[1], "duplicate"),
        (_answer([SLATE[1], SLATE[0]]), SLATE[1], "missing"),
        (_answer([SLATE[1], SLATE[0], CAT.sid["m9"]]), SLATE[1], "not_in_slate"),
        (_answer([SLATE[1], SLATE[0], encode_sid([99, 0])]), SLATE[1], "unknown_sid"),
        (_answer(SLATE, "Because of " + encode_sid([77, 1])), SLATE[0], "unknown_cited_sid"),
        ('{"explanation": "x", "recommendations": [', None, "broken_json"),
        ("I think: " + _answer(SLATE), None, "extra_text"),
        (_answer(SLATE) + "\nHope this helps", None, "extra_text"),
        ("```json\n" + _answer(SLATE) + "\n```", None, "extra_text"),
        (json.dumps({"explanation": "x"}), None, "schema"),
        (json.dumps({"explanation": 3, "recommendations": SLATE}), None, "schema"),
        (json.dumps({"explanation": "x", "recommendations": SLATE, "extra": 1}), None, "schema"),
        ("", None, "broken_json"),
    ],
)
def test_filter_catalogue(text, target, reason):
    verdict = check_answer(text, SLATE, VALID, target)
    assert verdict.reason == reason
    assert verdict.accepted == (reason == "accepted")


@pytest.mark.parametrize("explanation", ["", "   ", "Good pick."])
def test_short_explanation_fails_the_teacher_filter_only(explanation):
    minimum = TeacherConfig().min_explanation_chars
    assert minimum > len(explanation.strip()) and "short_explanation" in REASONS
    text = _answer([SLATE[1], SLATE[0], SLATE[2]], explanation)
    verdict = check_answer(text, SLATE, VALID, SLATE[1], min_explanation_chars=minimum)
    assert (verdict.accepted, verdict.reason) == (False, "short_explanation")
    assert check_answer(text, SLATE, VALID, SLATE[1]).accepted  # the default leaves it off
    assert judge(text, SLATE, SLATE[1], known_sids=VALID).reason == "ok"  # the RL reward too
    long = _answer([SLATE[1], SLATE[0], SLATE[2]], "x" * minimum)
    assert check_answer(long, SLATE, VALID, SLATE[1], min_explanation_chars=minimum).accepted


def test_prompt_has_the_five_parts_and_switches():
    history, cands = ["m0", "m1"], ["m3", "m4", "m5"]
    notes = {"m4": "12"}
    msgs = build_messages(history, cands, CAT, knowledge=True, notes=notes)
    system, user = msgs[0]["content"], msgs[1]["content"]
    assert "Rerank the 3 candidate" in system
    for item in history + cands:  # SID + title + year + genres
        assert f"{CAT.sid[item]} {label(CAT.name[item], CAT.caption[item])}" in user
    assert "Hints:" in user and f"{CAT.sid['m4']} Film 4 '94 | Drama [12]" in user
    assert "Steps: history patterns" in user and '"recommendations"' in user
    assert "next:" not in user  # rejection variant reveals nothing
    plain = build_messages(history, cands, CAT, knowledge=False, notes=notes)[1]["content"]
    assert "Hints" not in plain and "[12]" not in plain
    targeted = build_messages(history, cands, CAT, target="m4")[1]["content"]
    assert f"The user watched {CAT.sid['m4']} next" in targeted
    short = build_messages(history, cands, CAT, max_explanation_tokens=20)[1]["content"]
    assert "<max 10 words>" in short


def test_item_label_is_compact():
    caption = "Shanghai Triad (Yao a yao yao dao waipo qiao) (1995) | Drama"
    name = "Shanghai Triad (Yao a yao yao dao waipo qiao) (1995)"
    assert label(name, caption) == "Shanghai Triad '95 | Drama"
    long = "Dr. Strangelove or: How I Learned to Stop Worrying and Love the Bomb (1963)"
    genres = "Sci-Fi, War, Comedy, Drama"
    assert (
        label(long, f"{long} | {genres}") == "Dr. Strangelove or: How I… '63 | Sci-Fi, War, Comedy"
    )
    assert label("Unknown (n/a)", "Unknown (n/a) | unknown") == "Unknown n/a | unknown"


def test_answer_text_parses_back():
    answer, reason = parse_answer(answer_text('He said "hi"', SLATE))
    assert reason == "ok" and answer.recommendations == SLATE


def test_weighted_loss_equals_hand_computed_cross_entropy():
    # one sequence of 4 tokens over a vocabulary of 3; position t predicts token t+1
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [1.0, 1.0, 1.0]]])
    labels = torch.tensor([[0, 1, 2, 0]])
    kinds = [None, "reasoning", "answer", "answer"]  # the prompt token is not trained
    weights = torch.tensor([token_weights(kinds, 0.5, 2.0)])

    def ce(row: list[float], y: int) -> float:
        return -(row[y] - math.log(sum(math.exp(v) for v in row)))

    expected = (
        0.5 * ce([2.0, 0.0, 0.0], 1) + 2.0 * ce([0.0, 1.0, 0.0], 2) + 2.0 * ce([0.0, 0.0, 3.0], 0)
    ) / 3
    assert weighted_lm_loss(logits, labels, weights).item() == pytest.approx(expected, rel=1e-6)
    # equal weights of 1 give the plain mean cross-entropy over the trained tokens
    ones = torch.tensor([token_weights(kinds, 1.0, 1.0)])
    plain = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:])
    assert weighted_lm_loss(logits, labels, ones).item() == pytest.approx(plain.item(), rel=1e-6)


def test_default_student_prompt_fits_the_token_budget_on_movielens_1m(tokenizer):
    """The default prompt (10 history items, 10 candidates, KP with co-watch notes) stays under
    600 tokens with the student's tokenizer: real ML-1M titles, genres and co-watch counts;
    4-level SIDs; candidates drawn from the 500 most watched items, as a retriever's are."""
    import copy

    import numpy as np

    from data_contracts.config import DataConfig, PromptConfig
    from gr2_core.data import load_tables, preprocess, resolve_sources
    from gr2_core.generation import prompt_ids
    from gr2_core.prompts import CoWatch, student_messages
    from gr2_core.semantic_ids.sidmap import sid_tokens
    from gr2_core.split import build_sequences

    cfg = DataConfig(dataset="ml-1m")
    src = resolve_sources(cfg)
    tables = preprocess(load_tables(src), cfg, str(src.interactions))
    rng = np.random.default_rng(0)
    items = tables.items["item_id"].to_list()
    codes = rng.integers(0, 256, size=(len(items), 3))
    sid_map = pl.DataFrame({"item_id": items, "sid": [encode_sid([*c, 0]) for c in codes.tolist()]})
    cat = Catalogue.build(tables.items, sid_map)
    tok = copy.deepcopy(tokenizer)
    tok.add_tokens(sid_tokens(4, [256, 256, 256, 8]))
    sequences = build_sequences(tables.interactions)
    cowatch = CoWatch(sequences)
    popular = (
        tables.interactions.group_by("item_id").len().sort("len", descending=True)["item_id"]
    )[:500].to_list()
    prompt = PromptConfig()
    lengths = []
    for user, seq in zip(
        sequences["user_id"][:300].to_list(), sequences["items"][:300].to_list(), strict=True
    ):
        history = seq[:-2]
        pool = [i for i in popular if i not in set(seq)]
        cands = [pool[k] for k in rng.choice(len(pool), 10, replace=False)]
        messages = student_messages(history, cands, cat, prompt, cowatch, user)
        lengths.append(len(prompt_ids(tok, messages)))
    summary = (np.mean(lengths), np.percentile(lengths, 95), max(lengths))
    print(f"prompt tokens: mean {summary[0]:.0f}, p95 {summary[1]:.0f}, max {summary[2]}")
    assert np.percentile(lengths, 95) < 600 and max(lengths) < 620, summary  # 551 / 579 / 593
    assert prompt.history_items == 10 and prompt.knowledge and prompt.cowatch_notes
