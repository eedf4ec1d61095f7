"""Pandera-polars contracts of the CTC summarization flow's tables.

Kept apart from `data_contracts.tables`, whose source is part of the reranker pipeline's `data`
stage key: a change here never invalidates the reranker caches.
"""

from __future__ import annotations

import pandera.polars as pa
import polars as pl

from data_contracts.tables import SPLITS

SUMMARY_PAIRS = pa.DataFrameSchema(
    {
        "id": pa.Column(pl.Utf8, nullable=False, unique=True),
        "doc_id": pa.Column(pl.Utf8, nullable=False),
        "split": pa.Column(pl.Utf8, nullable=False, checks=pa.Check.isin(SPLITS)),
        "aspect": pa.Column(pl.Utf8, nullable=False),
        "document": pa.Column(pl.Utf8, nullable=False, checks=pa.Check.str_length(min_value=1)),
        "summary": pa.Column(pl.Utf8, nullable=False, checks=pa.Check.str_length(min_value=1)),
    },
    strict=True,
    name="summary_pairs",
)

SUMMARY_SCORES = pa.DataFrameSchema(
    {
        "condition": pa.Column(pl.Utf8, nullable=False),
        "system": pa.Column(pl.Utf8, nullable=False),
        "id": pa.Column(pl.Utf8, nullable=False),
        "doc_id": pa.Column(pl.Utf8, nullable=False),  # the unit the bootstrap resamples
        "prediction": pa.Column(pl.Utf8, nullable=False),
        "rouge1": pa.Column(pl.Float64, nullable=False, checks=pa.Check.in_range(0, 1)),
        "rouge2": pa.Column(pl.Float64, nullable=False, checks=pa.Check.in_range(0, 1)),
        "rougeL": pa.Column(pl.Float64, nullable=False, checks=pa.Check.in_range(0, 1)),
        "order": pa.Column(pl.Float64, nullable=True),
        "seconds": pa.Column(pl.Float64, nullable=False, checks=pa.Check.ge(0)),
    },
    strict=True,
    name="summary_scores",
)
