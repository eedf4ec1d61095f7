"""Stages `sft_<mode>` (decoupled-weight SFT on one trace set); their evaluations are in
`tasks/reranker_eval.py`.

The student is the mid-trained model; its prompt is the teacher's rejection variant (no target)
with the same KP setting, so SFT teaches it to produce the teacher's accepted answers.
"""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from data_contracts.config import PipelineConfig
from data_contracts.manifest import Manifest
from data_contracts.rerankers import TRACE_MODES, sft_stage
from gr2_core import sft as core
from tasks.inputs import prompt_identity
from tasks.stage import Stage
from tasks.tracking import Tracking, mlflow_env

SFT = {m: Stage(sft_stage(m), lambda c: c.sft, __name__, prompt_identity) for m in TRACE_MODES}


@task(
    name="sft",
    task_run_name="sft_{mode}",
    cache_key_fn=lambda ctx, p: SFT[p["mode"]].cache_key_fn(ctx, p),
    persist_result=True,
)
def sft(
    config: PipelineConfig,
    mode: str,
    data: Manifest,
    split: Manifest,
    semantic_ids: Manifest,
    traces: Manifest,
    midtrain: Manifest,
    tracking: Tracking,
) -> Manifest:
    """Fine-tune the mid-trained student on the accepted `mode` traces."""
    inputs = core.SFTInputs(
        mode=mode,
        traces=traces.path(f"{mode}_traces"),
        attempts=traces.path(f"{mode}_attempts"),
        model=midtrain.path("model"),
        items=data.path("items"),
        sid_map=semantic_ids.path("sid_map"),
        sequences=split.path("sequences"),
        prompt=config.prompt,
    )

    def body(out: Path, run):
        with mlflow_env(tracking, run.run_id):  # the Trainer's curves go to the stage run
            return core.run(inputs, config.sft, out, ("mlflow",), get_run_logger())

    return SFT[mode].run(config, [data, split, semantic_ids, traces, midtrain], tracking, body)
