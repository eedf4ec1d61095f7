"""SID codec, the assigned last level, and stable re-encoding (property tests)."""

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gr2_core.semantic_ids.sidmap import (
    PrefixOverflowError,
    assign_last_level,
    build_sid_map,
    code_stats,
    decode_sid,
    encode_sid,
    extend_sid_map,
    sid_tokens,
)


def test_token_format_round_trip():
    sid = encode_sid([97, 168, 137, 135])
    assert sid == "<|sid_begin|><s_a_97><s_b_168><s_c_137><s_d_135><|sid_end|>"
    assert decode_sid(sid) == [97, 168, 137, 135]


@pytest.mark.parametrize(
    "bad",
    [
        "<s_a_1><s_b_2>",
        "<|sid_begin|><|sid_end|>",
        "<|sid_begin|><s_b_1><s_a_2><|sid_end|>",
        "<|sid_begin|><s_a_1>x<s_b_2><|sid_end|>",
        "<|sid_begin|><s_a_-1><|sid_end|>",
    ],
)
def test_decode_rejects_malformed(bad):
    with pytest.raises(ValueError):
        decode_sid(bad)


def test_vocabulary_tokens():
    toks = sid_tokens(4, [256, 256, 256, 256])
    assert len(toks) == 2 + 4 * 256 and len(set(toks)) == len(toks)
    assert "<s_d_255>" in toks


def test_assigned_level_makes_every_sid_unique_and_fails_clearly():
    prefixes = np.array([[1, 2], [1, 2], [3, 4], [1, 2]])
    codes = assign_last_level(["b", "a", "c", "d"], prefixes, last_size=3)
    assert codes.tolist() == [[1, 2, 1], [1, 2, 0], [3, 4, 0], [1, 2, 2]]  # item-id order
    with pytest.raises(PrefixOverflowError, match=r"3 items share the learned prefix \[1, 2\]"):
        assign_last_level(["b", "a", "c", "d"], prefixes, last_size=2)


prefix_arrays = st.integers(1, 60).flatmap(
    lambda n: st.lists(st.lists(st.integers(0, 3), min_size=2, max_size=2), min_size=n, max_size=n)
)


@settings(max_examples=60, deadline=None)
@given(prefix_arrays, st.integers(0, 40), st.data())
def test_bijection_and_stability_under_extension(prefixes, n_new, data):
    prefixes = np.array(prefixes)
    ids = [f"item{i}" for i in range(len(prefixes))]
    last = 64
    sid_map = build_sid_map(ids, assign_last_level(ids, prefixes, last), "v1")
    # bijection: distinct items <-> distinct SIDs, and decode(sid) gives back the codes
    assert sid_map["sid"].n_unique() == sid_map.height == len(ids)
    for codes, sid in sid_map.select("codes", "sid").iter_rows():
        assert decode_sid(sid) == list(codes)
    # extend with new items (and some old ones again): nothing existing changes, no collision
    new_ids = [f"new{i}" for i in range(n_new)] + ids[: n_new // 3]
    new_prefixes = np.array(
        data.draw(
            st.lists(
                st.lists(st.integers(0, 3), min_size=2, max_size=2),
                min_size=len(new_ids),
                max_size=len(new_ids),
            )
        )
    ).reshape(len(new_ids), 2)
    bigger = extend_sid_map(sid_map, new_ids, new_prefixes, last)
    before = dict(sid_map.select("item_id", "sid").iter_rows())
    after = dict(bigger.select("item_id", "sid").iter_rows())
    assert all(after[k] == v for k, v in before.items())
    assert bigger["sid"].n_unique() == bigger.height == len(ids) + n_new
    assert bigger["item_id"].n_unique() == bigger.height


def test_extension_overflow_names_prefix():
    sid_map = build_sid_map(["a", "b"], np.array([[0, 0], [0, 1]]), "v1")
    with pytest.raises(PrefixOverflowError, match=r"prefix \[0\]"):
        extend_sid_map(sid_map, ["c"], np.array([[0]]), last_size=2)


def test_code_stats():
    codes = np.array([[0, 1], [0, 1], [1, 0], [2, 0]])
    stats = code_stats(codes, [4, 2])
    assert stats["level0/utilisation"] == 0.75
    assert stats["level1/utilisation"] == 1.0
    assert stats["level1/perplexity"] == pytest.approx(2.0)
    assert stats["prefix_uniqueness"] == 0.75
    assert isinstance(build_sid_map([], np.zeros((0, 2)), "v1"), pl.DataFrame)
