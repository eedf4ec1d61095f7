"""Leave-one-out samples with an out-of-sample pre-ranker (SPEC section 1)."""

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gr2_core.data import k_core
from gr2_core.split import build_samples, build_sequences, preranker_sequences


def _interactions(lengths: dict[str, int]) -> pl.DataFrame:
    rows = [(u, f"{u}-{t}", t) for u, n in lengths.items() for t in range(n)]
    return pl.DataFrame(rows, schema=["user_id", "item_id", "timestamp"], orient="row")


def test_positions_and_splits():
    seqs = build_sequences(_interactions({"a": 8, "b": 5}))
    samples = build_samples(seqs, holdout=5, max_history=3).sort("user_id", "position")
    a = samples.filter(pl.col("user_id") == "a")
    assert a["position"].to_list() == [3, 4, 5, 6, 7]
    assert a["split"].to_list() == ["train", "train", "train", "valid", "test"]
    assert a["target"].to_list() == [f"a-{t}" for t in range(3, 8)]
    assert a.filter(pl.col("position") == 7)["history"].item().to_list() == ["a-4", "a-5", "a-6"]
    # b has n = 5: position 0 has no history and is skipped
    b = samples.filter(pl.col("user_id") == "b")
    assert b["position"].to_list() == [1, 2, 3, 4]


def test_preranker_never_sees_sample_targets():
    seqs = build_sequences(_interactions({"a": 8, "b": 7, "c": 6}))
    prefixes = preranker_sequences(seqs, holdout=5)
    samples = build_samples(seqs, holdout=5, max_history=50)
    seen = {(u, i) for u, items in prefixes.iter_rows() for i in items}
    assert not any((u, t) in seen for u, t in samples.select("user_id", "target").iter_rows())
    # c has 6 items: a 1-item prefix cannot train a next-item model, so it is left out
    assert prefixes["user_id"].to_list() == ["a", "b"]


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 12), st.integers(0, 15)), min_size=1, max_size=150),
    st.integers(1, 4),
    st.integers(1, 4),
)
def test_k_core_property(pairs, ku, ki):
    df = pl.DataFrame(
        {"user_id": [str(u) for u, _ in pairs], "item_id": [str(i) for _, i in pairs]}
    ).unique()
    out = k_core(df, ku, ki)
    if out.height:
        assert out.group_by("user_id").len()["len"].min() >= ku
        assert out.group_by("item_id").len()["len"].min() >= ki
    assert k_core(out, ku, ki).height == out.height  # idempotent (stable)


@settings(max_examples=60, deadline=None)
@given(
    st.dictionaries(st.sampled_from("abcdefgh"), st.integers(3, 12), min_size=1),  # n >= 3
    st.integers(3, 8),
)
def test_preranker_prefix_is_out_of_sample_for_short_users(lengths, holdout):
    """Users with n <= holdout items (n < m included) get no prefix; no prefix holds a target."""
    seqs = build_sequences(_interactions(lengths))
    prefixes = preranker_sequences(seqs, holdout)
    samples = build_samples(seqs, holdout, max_history=50)
    seen = {(u, i) for u, items in prefixes.iter_rows() for i in items}
    assert not any((u, t) in seen for u, t in samples.select("user_id", "target").iter_rows())
    for user, items in prefixes.iter_rows():
        assert len(items) == lengths[user] - holdout >= 2


def test_config_refuses_users_shorter_than_the_holdout():
    from data_contracts.config import load_profile

    with pytest.raises(ValueError, match="min_user_interactions"):
        load_profile("ci", {"data.min_user_interactions": 3, "split.holdout": 5})
    assert load_profile("ci", {"data.min_user_interactions": 5, "split.holdout": 5})
