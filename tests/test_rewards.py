"""Ranking rewards: exact values on hand-made answers, doctests, and a fuzz test."""

from __future__ import annotations

import doctest
import json
import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gr2_core.rewards as rw
from gr2_core.semantic_ids.sidmap import encode_sid

SLATE = [encode_sid([i, i % 3]) for i in range(10)]  # |D| = 10
KNOWN = frozenset(SLATE) | {encode_sid([50, 1])}


def _answer(recs, explanation="Because of " + SLATE[0]) -> str:
    return json.dumps({"explanation": explanation, "recommendations": recs})


def _moved(src: int, dst: int) -> list[str]:
    """The slate with the item at 1-based rank `src` moved to rank `dst`."""
    order = list(SLATE)
    item = order.pop(src - 1)
    order.insert(dst - 1, item)
    return order


# (case, answer, target index, R_rank, R_fmt, conditional R, unconditional R)
CASES = [
    ("moved up 4->1", _answer(_moved(4, 1)), 3, 0.3, 1.0, 0.5, 0.5),
    ("moved up 7->5", _answer(_moved(7, 5)), 6, 0.2, 1.0, 0.4, 0.4),
    ("moved down 2->6", _answer(_moved(2, 6)), 1, -0.4, 1.0, -0.4, -0.2),
    ("moved down from the top 1->3", _answer(_moved(1, 3)), 0, -0.2, 1.0, 0.0, 0.0),
    ("kept at rank 1, others shuffled", _answer(_moved(5, 9)), 0, 0.0, 1.0, 0.2, 0.2),
    ("unchanged at rank 6, others shuffled", _answer(_moved(2, 4)), 5, 0.0, 1.0, 0.0, 0.2),
    ("identity permutation, target 3rd", _answer(SLATE), 2, 0.0, 1.0, 0.0, 0.2),
    ("identity permutation, target 1st", _answer(SLATE), 0, 0.0, 1.0, 0.2, 0.2),
    ("duplicate ids", _answer([SLATE[3]] + SLATE[:9]), 3, 0.0, 0.0, -1.0, -1.0),
    ("missing id", _answer(_moved(4, 1)[:9]), 3, 0.0, 0.0, -1.0, -1.0),
    ("only the target", _answer([SLATE[3]]), 3, 0.0, 0.0, -1.0, -1.0),
    ("extra id", _answer(_moved(4, 1) + [encode_sid([50, 1])]), 3, 0.0, 0.0, -1.0, -1.0),
    ("unknown id", _answer(_moved(4, 1)[:9] + ["<sid>nope</sid>"]), 3, 0.0, 0.0, -1.0, -1.0),
    ("unknown SID cited", _answer(SLATE, "see " + encode_sid([77, 0])), 0, 0.0, 0.0, -1.0, -1.0),
    ("broken JSON", '{"explanation": "x", "recommendations": ["', 3, 0.0, 0.0, -1.0, -1.0),
    ("text around the JSON", "Sure! " + _answer(_moved(4, 1)), 3, 0.0, 0.0, -1.0, -1.0),
    ("wrong schema", json.dumps({"recommendations": SLATE}), 3, 0.0, 0.0, -1.0, -1.0),
    ("empty", "", 3, 0.0, 0.0, -1.0, -1.0),
]


@pytest.mark.parametrize(("case", "text", "t", "rank", "fmt", "cond", "uncond"), CASES)
def test_reward_values(case, text, t, rank, fmt, cond, uncond):
    args = ([text], [SLATE], [SLATE[t]])
    assert rw.RankReward(KNOWN)(*args) == [pytest.approx(rank, abs=1e-12)], case
    assert rw.FormatReward(KNOWN)(*args) == [fmt], case
    assert rw.RerankReward(KNOWN)(*args) == [pytest.approx(cond, abs=1e-12)], case
    assert rw.RerankReward(KNOWN, conditional=False)(*args) == [pytest.approx(uncond, abs=1e-12)], (
        case
    )


def test_truncated_output_is_minus_one_even_if_it_parses():
    text = _answer(_moved(4, 1))
    reward = rw.RerankReward(KNOWN, eos_token_ids=(2,))
    assert reward([text], [SLATE], [SLATE[3]], completion_ids=[[5, 6, 2]]) == [pytest.approx(0.5)]
    assert reward([text], [SLATE], [SLATE[3]], completion_ids=[[5, 6, 7]]) == [-1.0]
    assert rw.FormatReward(KNOWN, (2,))([text], [SLATE], [SLATE[3]], [[5, 6, 7]]) == [0.0]


def test_chat_completions_and_batches():
    texts = [_answer(_moved(4, 1)), _answer(SLATE)]
    chats = [[{"role": "assistant", "content": t}] for t in texts]
    reward = rw.RerankReward(KNOWN)
    assert reward(chats, [SLATE, SLATE], [SLATE[3], SLATE[3]]) == reward(
        texts, [SLATE, SLATE], [SLATE[3], SLATE[3]]
    )
    assert reward(chats, [SLATE, SLATE], [SLATE[3], SLATE[3]]) == [
        pytest.approx(0.5),
        pytest.approx(0.0),
    ]


def test_rewards_are_picklable_and_named():
    for cls, name in (
        (rw.RankReward, "rank"),
        (rw.FormatReward, "format"),
        (rw.RerankReward, "rerank"),
    ):
        r = pickle.loads(pickle.dumps(cls(KNOWN)))
        assert r.__name__ == name
        assert r([_answer(SLATE)], [SLATE], [SLATE[0]]) == cls(KNOWN)(
            [_answer(SLATE)], [SLATE], [SLATE[0]]
        )


def test_monitor_rates():
    js = [
        rw.judge(_answer(SLATE), SLATE, SLATE[2]),
        rw.judge(_answer(_moved(4, 1)), SLATE, SLATE[3]),
        rw.judge(_answer(_moved(2, 6)), SLATE, SLATE[1]),
        rw.judge("nope", SLATE, SLATE[1]),
    ]
    assert rw.monitor(js) == {
        "identity_rate": 0.25,
        "invalid_rate": 0.25,
        "truncated_rate": 0.0,
        "improved_rate": 0.25,
        "worsened_rate": 0.25,
    }


def test_doctests():
    failures, tried = doctest.testmod(rw, optionflags=doctest.ELLIPSIS)
    assert tried > 10 and failures == 0


sids = st.sampled_from(SLATE + ["<sid>x</sid>", "", "null"])
texts = st.one_of(
    st.text(max_size=200),
    st.builds(lambda r, e: _answer(r, e), st.lists(sids, max_size=12), st.text(max_size=40)),
    st.builds(
        lambda r: json.dumps({"explanation": 1, "recommendations": r}),
        st.lists(st.integers() | st.none() | st.text(max_size=3), max_size=4),
    ),
    st.recursive(st.none() | st.integers() | st.text(max_size=5), lambda c: st.lists(c)).map(
        json.dumps
    ),
)


@settings(max_examples=300, deadline=None)
@given(
    text=texts,
    ids=st.none() | st.lists(st.integers(0, 5), max_size=6),
    target=st.sampled_from(SLATE + ["<sid>absent</sid>"]),
    slate=st.sampled_from([SLATE, [], SLATE[:1]]),
)
def test_fuzz_rewards_never_raise_and_stay_in_range(text, ids, target, slate):
    for reward in (
        rw.RerankReward(KNOWN, eos_token_ids=(2,)),
        rw.RerankReward(conditional=False),
        rw.RankReward(),
        rw.FormatReward(),
    ):
        out = reward([text], [slate], [target], completion_ids=None if ids is None else [ids])
        assert len(out) == 1 and -1.0 <= out[0] <= 1.2
