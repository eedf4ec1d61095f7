"""Stage `split`: per-user sequences, leave-one-out reranker samples, pre-ranker prefixes."""

from __future__ import annotations

from pathlib import Path

import polars as pl
from prefect import task

from data_contracts.config import PipelineConfig
from data_contracts.manifest import Manifest
from gr2_core.split import build_samples, build_sequences, preranker_sequences
from tasks.inputs import read
from tasks.stage import Stage, StageResult
from tasks.tracking import StageRun, Tracking

# max_history (data config) reaches this stage through the data stage's key.
STAGE = Stage("split", lambda c: c.split, __name__)


@task(name="split", cache_key_fn=STAGE.cache_key_fn, persist_result=True)
def split_sequences(config: PipelineConfig, data: Manifest, tracking: Tracking) -> Manifest:
    """Sequences, train/valid/test samples, and the pre-ranker's training prefixes."""

    def body(work: Path, run: StageRun) -> StageResult:
        seqs = build_sequences(read(data, "interactions"))
        samples = build_samples(seqs, config.split.holdout, config.data.max_history)
        prefixes = preranker_sequences(seqs, config.split.holdout)
        seqs.write_parquet(work / "sequences.parquet")
        samples.write_parquet(work / "samples.parquet")
        prefixes.write_parquet(work / "preranker_train.parquet")
        counts = dict(samples.group_by("split").len().iter_rows())
        metrics = {f"samples_{k}": float(v) for k, v in counts.items()}
        metrics["preranker_train_users"] = prefixes.height
        metrics["preranker_train_interactions"] = float(
            prefixes.select(pl.col("items").list.len().sum()).item()
        )
        files = {
            "sequences": "sequences.parquet",
            "samples": "samples.parquet",
            "preranker_train": "preranker_train.parquet",
        }
        return StageResult(files, metrics)

    return STAGE.run(config, [data], tracking, body)
