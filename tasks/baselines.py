"""Stage `baselines`: pre-ranker, popularity and random orderings, both modes, with CIs."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from data_contracts.config import PipelineConfig
from data_contracts.manifest import Manifest
from gr2_core import baselines as core
from tasks.stage import Stage
from tasks.tracking import Tracking

STAGE = Stage("baselines", lambda c: c.evaluation, __name__)


@task(name="baselines", cache_key_fn=STAGE.cache_key_fn, persist_result=True)
def baselines(
    config: PipelineConfig, split: Manifest, candidates: Manifest, tracking: Tracking
) -> Manifest:
    """Metrics table of the reference orderings on valid and test."""
    title = f"Baselines on {config.data.dataset} (profile {config.profile})"
    inputs = core.BaselinesInputs(candidates.path("slates"), split.path("preranker_train"), title)

    def body(out: Path, run):
        return core.run(inputs, config.evaluation, out, get_run_logger())

    return STAGE.run(config, [split, candidates], tracking, body)
