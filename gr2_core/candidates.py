"""Stage `candidates`: the pre-ranker's top-|D| slate for every reranker sample."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from data_contracts.config import PrerankerConfig
from gr2_core import preranker
from gr2_core.output import Log, StageOutput

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class CandidatesInputs:
    model: Path  # the preranker stage's folder (self-describing checkpoint)
    samples: Path  # the split stage's reranker samples
    sequences: Path  # the split stage's sequences (each sample's prefix is excluded)


def run(
    inputs: CandidatesInputs,
    cfg: PrerankerConfig,
    out: Path,
    log: Log = LOG,
) -> StageOutput:
    """Top-`slate_size` slates by inner product, the user's earlier items excluded."""
    model, vocab = preranker.load(inputs.model)
    slates = preranker.generate_slates(
        model,
        vocab,
        pl.read_parquet(inputs.samples),
        pl.read_parquet(inputs.sequences),
        cfg.slate_size,
    )
    slates.write_parquet(out / "slates.parquet")
    cov = slates.group_by("split").agg(pl.col("target_rank").is_not_null().mean())
    metrics = {f"{s}/coverage": float(v) for s, v in cov.iter_rows()}
    log.info("candidates: coverage %s", metrics)
    return StageOutput({"slates": "slates.parquet"}, metrics)
