"""Stage `split`: per-user sequences, leave-one-out reranker samples, pre-ranker prefixes."""

from __future__ import annotations

from prefect import task

from data_contracts.config import PipelineConfig
from data_contracts.manifest import Manifest
from gr2_core import split as core
from tasks.stage import Stage
from tasks.tracking import Tracking

# max_history (data config) reaches this stage through the data stage's key.
STAGE = Stage("split", lambda c: c.split, __name__)


@task(name="split", cache_key_fn=STAGE.cache_key_fn, persist_result=True)
def split(config: PipelineConfig, data: Manifest, tracking: Tracking) -> Manifest:
    """Sequences, train/valid/test samples, and the pre-ranker's training prefixes."""
    inputs = core.SplitInputs(data.path("interactions"), config.data.max_history)
    return STAGE.run(config, [data], tracking, lambda out, run: core.run(inputs, config.split, out))
