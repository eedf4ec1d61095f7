"""Stages `sft_eval_<mode>` and `rl_eval_<variant>`: a generative reranker on valid/test slates.

One task for every trained reranker (SFT per trace mode, RL per variant): its answers by each of
`sft.eval_methods` (free, constrained, scored), and the pre-ranker's order on the same slates
(`sft.eval_slates` per split, conditional: target in the slate), with bootstrap CIs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from data_contracts.config import PipelineConfig
from data_contracts.manifest import Manifest
from data_contracts.rerankers import EVAL_STAGES
from gr2_core import rerank_eval as core
from gr2_core.report import method_label
from tasks.inputs import prompt_identity
from tasks.runners import StageRunner, shard_count
from tasks.stage import Stage
from tasks.tracking import Tracking

if TYPE_CHECKING:  # the engine module loads transformers' Trainer: imported where it runs
    from gr2_core.generation import AnswerShard

EVAL = {
    name: Stage(
        name,
        lambda c: c.sft,  # the evaluation settings (slates, decoding) live in the sft section
        __name__,
        lambda c: prompt_identity(c) | {"evaluation": c.evaluation.digest()},
    )
    for name in EVAL_STAGES
}


@task(name="eval-shard", cache_policy=NONE, task_run_name="eval-{shard.method}-shard-{shard.index}")
def eval_shard(shard: AnswerShard) -> list:
    """One shard of an evaluation's answers, from a transformers engine of its own."""
    from gr2_core.generation import answer_shard

    return answer_shard(shard)


@task(
    name="reranker_eval",
    task_run_name="{stage}",
    cache_key_fn=lambda ctx, p: EVAL[p["stage"]].cache_key_fn(ctx, p),
    persist_result=True,
)
def reranker_eval(
    config: PipelineConfig,
    stage: str,
    data: Manifest,
    split: Manifest,
    semantic_ids: Manifest,
    candidates: Manifest,
    model: Manifest,
    tracking: Tracking,
) -> Manifest:
    """R@1, R@5, NDCG@5, invalid and identity rates, latency of the reranker trained by the
    `model` stage vs the pre-ranker order. `stage`: `sft_eval_<mode>`, `rl_eval_<variant>` or
    `midtrain_rerank_eval`."""
    if stage not in EVAL:
        raise ValueError(f"unknown evaluation stage {stage!r}; known: {sorted(EVAL)}")
    label = method_label(model.stage, config.prompt.knowledge)
    title = f"{label} reranker vs the pre-ranker, {config.data.dataset} ({config.profile})"
    inputs = core.RerankEvalInputs(
        model=model.path("model"),
        items=data.path("items"),
        sid_map=semantic_ids.path("sid_map"),
        sequences=split.path("sequences"),
        slates=candidates.path("slates"),
        label=label,
        title=title,
        prompt=config.prompt,
        bootstrap=config.evaluation,
    )

    shards = shard_count(config.runner)

    def body(out: Path, run):
        log = get_run_logger()
        with StageRunner(config.runner, shards) as runner:  # one Ray instance for every method

            def on_runner(parts: list[AnswerShard]) -> list:
                return runner.map(eval_shard, [{"shard": p} for p in parts])

            return core.run(inputs, config.sft, out, log, config.engine, on_runner, shards)

    upstream = [data, split, semantic_ids, candidates, model]
    return EVAL[stage].run(config, upstream, tracking, body)
