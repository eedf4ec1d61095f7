"""CTC confidence intervals are cluster bootstraps over documents (issue 18, item 9).

ACLSum's test split is 100 papers x 3 aspects, and Lead-N's output is the same for the three
aspects of a paper; pairs of one document must enter a resample together. With pairs that are
exact copies within a document, the clustered interval is exactly the one over one pair per
document, and wider than the i.i.d. interval over the copies.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from data_contracts.summaries import SUMMARY_SCORES
from data_contracts.tables import validate
from gr2_core.metrics import bootstrap_ci
from gr2_core.summarization.evaluate import paired_differences, summary_table, to_markdown_rows

DOCS, ASPECTS, SAMPLES = 12, 3, 400


def _per_doc(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random(DOCS)


def _scores(ctc: np.ndarray, lead: np.ndarray) -> pl.DataFrame:
    """A scores table where every aspect of document d scores ctc[d] (resp. lead[d])."""
    rows = []
    for system, per_doc in (("ctc", ctc), ("lead-3", lead)):
        for d, value in enumerate(per_doc):
            for a in range(ASPECTS):
                rows.append(
                    {
                        "condition": "clean",
                        "system": system,
                        "id": f"p{d:02d}:{a}",
                        "doc_id": f"p{d:02d}",
                        "prediction": "w",
                        "rouge1": value,
                        "rouge2": value,
                        "rougeL": value,
                        "order": value,
                        "seconds": 0.01,
                    }
                )
    return validate(SUMMARY_SCORES, pl.DataFrame(rows), "test scores")


def test_cluster_bootstrap_of_copies_equals_one_pair_per_document():
    one = _per_doc(0)
    copies = np.repeat(one, ASPECTS)
    docs = [f"p{d:02d}" for d in range(DOCS) for _ in range(ASPECTS)]
    per_doc = bootstrap_ci({"x": one}, SAMPLES, 0.95, 7)["x"]
    clustered = bootstrap_ci({"x": copies}, SAMPLES, 0.95, 7, docs)["x"]
    naive = bootstrap_ci({"x": copies}, SAMPLES, 0.95, 7)["x"]
    assert clustered == pytest.approx(per_doc, rel=1e-12)
    assert clustered[2] - clustered[1] > 1.3 * (naive[2] - naive[1])


def test_singleton_clusters_reproduce_the_iid_bootstrap():
    vals = _per_doc(1)
    iid = bootstrap_ci({"x": vals}, SAMPLES, 0.9, 3)["x"]
    assert bootstrap_ci({"x": vals}, SAMPLES, 0.9, 3, list(range(DOCS)))["x"] == pytest.approx(iid)


def test_cluster_resamples_average_pairs_not_documents():
    # documents a = [1, 1, 1], b = [0]: a resample of {a, b} averages to 3/4 (not 1/2), and
    # half of all resamples are {a, b}, so the central 20% interval is exactly 0.75
    out = bootstrap_ci({"x": np.array([1.0, 1.0, 1.0, 0.0])}, 4000, 0.2, 0, list("aaab"))
    assert out["x"] == (0.75, 0.75, 0.75)
    with pytest.raises(ValueError, match="3 cluster labels for 4 samples"):
        bootstrap_ci({"x": np.zeros(4)}, 10, 0.95, 0, list("aab"))


def test_ctc_tables_resample_documents():
    ctc, lead = _per_doc(2), _per_doc(3)
    scores = _scores(ctc, lead)
    table = summary_table(scores, SAMPLES, seed=5)
    row = table.filter(pl.col("system") == "ctc").row(0, named=True)
    expected = bootstrap_ci({"x": ctc}, SAMPLES, 0.95, 5)["x"]
    assert (row["rougeL"], row["rougeL_low"], row["rougeL_high"]) == pytest.approx(expected)
    assert (row["order"], row["order_low"], row["order_high"]) == pytest.approx(expected)
    assert (row["n"], row["documents"]) == (DOCS * ASPECTS, DOCS)
    assert to_markdown_rows(table).columns[2:4] == ["pairs", "documents"]

    diff = paired_differences(scores, "lead-3", "rougeL", SAMPLES, seed=5).row(0, named=True)
    mean, lo, hi = bootstrap_ci({"d": ctc - lead}, SAMPLES, 0.95, 5)["d"]
    assert diff["rougeL_difference"] == f"{mean:.3f} [{lo:.3f}, {hi:.3f}]"
    assert (diff["pairs"], diff["documents"]) == (DOCS * ASPECTS, DOCS)
