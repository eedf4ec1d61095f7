"""Stages `rl_<variant>`: DAPO on an SFT reranker (evaluated by `tasks.reranker_eval`).

Variants (SPEC section 5, declared in `data_contracts.rerankers`): `rejection` (GR2: DAPO from
SFT-rejection, conditional reward), `targeted` (from SFT-targeted, conditional reward),
`unconditional` (the unconditional reward, the reward-hacking ablation; from SFT-rejection, or
SFT-targeted with `rl.unconditional_start`).
The policy sees the student prompt of the SFT stages; training slates are training-split slates
that contain their target.
"""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from data_contracts.config import PipelineConfig
from data_contracts.manifest import Manifest
from data_contracts.rerankers import VARIANTS, rl_stage
from gr2_core import rl as core
from tasks.inputs import prompt_identity
from tasks.stage import Stage
from tasks.tracking import Tracking, mlflow_env

RL = {v: Stage(rl_stage(v), lambda c: c.rl, __name__, prompt_identity) for v in VARIANTS}


@task(
    name="rl",
    task_run_name="rl_{variant}",
    cache_key_fn=lambda ctx, p: RL[p["variant"]].cache_key_fn(ctx, p),
    persist_result=True,
)
def rl(
    config: PipelineConfig,
    variant: str,
    data: Manifest,
    split: Manifest,
    semantic_ids: Manifest,
    candidates: Manifest,
    sft_model: Manifest,
    tracking: Tracking,
) -> Manifest:
    """DAPO with dynamic sampling from an SFT reranker; monitors logged every step."""
    inputs = core.RLInputs(
        variant=variant,
        conditional=VARIANTS[variant].conditional,
        start=sft_model.stage,
        model=sft_model.path("model"),
        items=data.path("items"),
        sid_map=semantic_ids.path("sid_map"),
        sequences=split.path("sequences"),
        slates=candidates.path("slates"),
        prompt=config.prompt,
    )

    def body(out: Path, run):
        with mlflow_env(tracking, run.run_id):  # TRL's metrics go to the stage run
            return core.run(inputs, config.rl, out, ("mlflow",), get_run_logger(), config.engine)

    upstream = [data, split, semantic_ids, candidates, sft_model]
    return RL[variant].run(config, upstream, tracking, body)
