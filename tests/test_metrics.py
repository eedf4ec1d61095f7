"""Exact ranking metrics and bootstrap intervals on hand-computed cases."""

import math

import numpy as np
import pytest

from gr2_core.metrics import (
    bootstrap_ci,
    coverage,
    metrics_table,
    mrr,
    ndcg_at_k,
    rank_of,
    recall_at_k,
)

RANKS = [1, 2, 5, None, 10, 11]


def test_recall_hand_computed():
    assert recall_at_k(RANKS, 1).tolist() == [1, 0, 0, 0, 0, 0]
    assert recall_at_k(RANKS, 5).tolist() == [1, 1, 1, 0, 0, 0]
    assert recall_at_k(RANKS, 10).mean() == pytest.approx(4 / 6)


def test_ndcg_hand_computed():
    got = ndcg_at_k(RANKS, 5)
    assert got[0] == 1.0
    assert got[1] == pytest.approx(1 / math.log2(3))  # 0.6309
    assert got[2] == pytest.approx(1 / math.log2(6))  # 0.3869
    assert got[3:].tolist() == [0, 0, 0]
    assert ndcg_at_k([10], 10)[0] == pytest.approx(1 / math.log2(11))
    assert ndcg_at_k([11], 10)[0] == 0


def test_mrr_and_coverage():
    assert mrr([1, 4, None]).tolist() == [1.0, 0.25, 0.0]
    assert coverage(RANKS) == pytest.approx(5 / 6)
    assert coverage([]) == 0.0


def test_rejects_zero_based_ranks():
    with pytest.raises(ValueError):
        recall_at_k([-1], 1)


def test_rank_of():
    assert rank_of("b", ["a", "b", "c"]) == 2
    assert rank_of("z", ["a"]) is None


def test_bootstrap_ci_contains_mean_and_degenerates():
    vals = {"x": np.array([0.0, 1.0] * 50)}
    mean, lo, hi = bootstrap_ci(vals, 500, 0.95, seed=1)["x"]
    assert mean == 0.5 and lo < 0.5 < hi and hi - lo < 0.3
    const = bootstrap_ci({"c": np.ones(10)}, 100, 0.95, 0)["c"]
    assert const == (1.0, 1.0, 1.0)


def test_metrics_table_modes():
    table = metrics_table("m", "test", [1, None, 3, None], ks=[1, 5], ndcg_ks=[5], samples=50)
    row = {(r["mode"], r["metric"]): r for r in table.iter_rows(named=True)}
    assert row[("conditional", "recall@1")]["value"] == 0.5
    assert row[("conditional", "recall@1")]["n"] == 2
    assert row[("end_to_end", "recall@1")]["value"] == 0.25
    assert row[("end_to_end", "recall@5")]["value"] == 0.5
    assert row[("end_to_end", "coverage")]["value"] == 0.5
    expected = (1 + 1 / math.log2(4)) / 2
    assert row[("conditional", "ndcg@5")]["value"] == pytest.approx(expected)


def test_metrics_table_without_any_covered_slate_has_no_conditional_rows():
    """A split where no slate holds its target (seen with the tiny CI pre-ranker) gives
    end-to-end zeros and no conditional rows, never NaN (which the metrics contract refuses)."""
    table = metrics_table("m", "valid", [None, None, None], ks=[1, 5], ndcg_ks=[5], samples=50)
    assert set(table["mode"]) == {"end_to_end"}
    assert not table["value"].is_nan().any()
    row = {r["metric"]: r for r in table.iter_rows(named=True)}
    assert row["recall@5"]["value"] == 0.0 and row["coverage"]["value"] == 0.0


def test_replace_section_keeps_other_sections(tmp_path):
    from gr2_core.report import replace_section

    doc = tmp_path / "d.md"
    replace_section(doc, "A", "one", "Title")
    replace_section(doc, "B", "two", "Title")
    replace_section(doc, "A", "uno", "Title")
    text = doc.read_text()
    assert text.startswith("# Title\n")
    assert "uno" in text and "one" not in text and "two" in text
    assert text.index("## A") < text.index("## B")
