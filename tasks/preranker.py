"""Stages `preranker` (train SASRec on training prefixes) and `candidates` (faiss slates)."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from data_contracts.config import PipelineConfig
from data_contracts.manifest import Manifest
from gr2_core import candidates as candidates_core
from gr2_core import preranker as core
from tasks.stage import Stage
from tasks.tracking import Tracking

TRAIN = Stage("preranker", lambda c: c.preranker, __name__, core=core.__name__)
CANDIDATES = Stage("candidates", lambda c: c.preranker, __name__, core=candidates_core.__name__)


@task(name="preranker", cache_key_fn=TRAIN.cache_key_fn, persist_result=True)
def preranker(
    config: PipelineConfig, data: Manifest, split: Manifest, tracking: Tracking
) -> Manifest:
    """Train the SASRec pre-ranker; resumes from its checkpoint after a crash."""
    inputs = core.PrerankerInputs(data.path("items"), split.path("preranker_train"))

    def body(out: Path, run):
        return core.run(inputs, config.preranker, out, run.log_metrics, get_run_logger())

    return TRAIN.run(config, [data, split], tracking, body)


@task(name="candidates", cache_key_fn=CANDIDATES.cache_key_fn, persist_result=True)
def candidates(
    config: PipelineConfig, split: Manifest, preranker: Manifest, tracking: Tracking
) -> Manifest:
    """Top-|D| slates for every reranker sample, history items excluded."""
    inputs = candidates_core.CandidatesInputs(
        Path(preranker.directory), split.path("samples"), split.path("sequences")
    )

    def body(out: Path, run):
        return candidates_core.run(inputs, config.preranker, out, get_run_logger())

    return CANDIDATES.run(config, [split, preranker], tracking, body)
