"""Stage `traces`: teacher reasoning traces for each mode (targeted, rejection), filtered.

The work is `gr2_core.traces.run`; this adapter resolves the API key (a Prefect Secret block or
the environment) and runs the teacher's shards as Prefect tasks, `teacher.parallel_shards` at
once, on the task runner of `config.runner` (threads here, or Ray tasks: tasks.runners).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NONE

import gr2_core.traces as core
from data_contracts.config import PipelineConfig, TeacherConfig
from data_contracts.manifest import Manifest
from tasks.inputs import prompt_identity
from tasks.runners import map_task
from tasks.stage import Stage
from tasks.tracking import Tracking

STAGE = Stage("traces", lambda c: c.teacher, __name__, prompt_identity)


def api_key(cfg: TeacherConfig) -> str | None:
    """The API key from a Prefect Secret block or the environment; never logged."""
    if cfg.api_key_secret:
        from prefect.blocks.system import Secret

        return Secret.load(cfg.api_key_secret).get()
    return os.environ.get(cfg.api_key_env) or None


@task(name="teacher-shard", cache_policy=NONE, task_run_name="{shard.mode}-shard-{shard.index}")
def teacher_shard(shard: core.Shard, ctx: core.ShardContext) -> core.ShardResult:
    """Sample one shard until every slate is decided (resumes from the shard's file)."""
    return core.sample_shard(shard, ctx, get_run_logger())


@task(name="traces", cache_key_fn=STAGE.cache_key_fn, persist_result=True)
def traces(
    config: PipelineConfig,
    data: Manifest,
    split: Manifest,
    semantic_ids: Manifest,
    candidates: Manifest,
    tracking: Tracking,
) -> Manifest:
    """Teacher traces per mode: every attempt, the accepted traces, the filter's statistics."""

    def body(out: Path, run):  # the key is looked up only when there is work for the teacher
        inputs = core.TracesInputs(
            slates=candidates.path("slates"),
            sequences=split.path("sequences"),
            items=data.path("items"),
            sid_map=semantic_ids.path("sid_map"),
            prompt=config.prompt,
            api_key=api_key(config.teacher),
        )

        def on_runner(shards: list[core.Shard], ctx: core.ShardContext) -> list:
            # absolute shard files: a Ray worker's working folder is not the flow's
            calls = [{"shard": replace(s, path=s.path.resolve()), "ctx": ctx} for s in shards]
            return map_task(teacher_shard, calls, config.runner, len(calls))

        return core.run(inputs, config.teacher, out, on_runner, get_run_logger())

    return STAGE.run(config, [data, split, semantic_ids, candidates], tracking, body)
