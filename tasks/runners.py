"""The task runner behind a stage's fan-out (the teacher's shards, the evaluation's answer shards),
chosen by `config.runner`.

`threads`: Prefect's thread pool in the flow's process. `ray`: prefect-ray's `RayTaskRunner`,
each call a Ray task on a local Ray instance (started for the stage and stopped after it) or on
the cluster at `runner.address` (`auto`, `HOST:6379`, `ray://HOST:10001` for KubeRay's head
service). Either way each call is a Prefect task run of the stage's task run, with its logs and
state in the Prefect UI; stage outputs do not depend on the runner (tests/scale/test_ray.py).
On a cluster the workers need the same GR2 install (the image of infra/docker/Dockerfile) and the
artifacts root on shared storage, since shards write their files there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from typing import Any

from prefect import Task
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from data_contracts.config import RunnerConfig

CACHE_NEUTRAL = True  # where work runs never shapes what it produces


def task_runner(cfg: RunnerConfig, max_workers: int) -> TaskRunner:
    """A new (not yet started) task runner for `cfg`; `max_workers` bounds the thread pool."""
    if cfg.kind == "threads":
        return ThreadPoolTaskRunner(max_workers=max_workers)
    try:
        from prefect_ray import RayTaskRunner
    except ImportError as exc:  # the optional extra
        raise RuntimeError(
            "runner.kind is 'ray' but prefect-ray is not installed; install the scale-out "
            "extra: pip install -e '.[scale]'"
        ) from exc
    init: dict[str, Any] = {"log_to_driver": True}
    if cfg.address is None:  # a local instance for the stage, on the loopback interface only
        init |= {"_node_ip_address": "127.0.0.1", "include_dashboard": False}
    return RayTaskRunner(address=cfg.address, init_kwargs=init)


def shard_count(cfg: RunnerConfig) -> int:
    """How many shards a stage splits its batch work into: `cfg.shards` on Ray, 1 (the stage's
    own pass) with threads."""
    return cfg.shards if cfg.kind != "threads" else 1


class StageRunner:
    """One task runner for all of a stage's fan-outs: started at the first `map` (a stage that
    never fans out starts nothing) and stopped when the stage's `with` block ends, so a stage
    that fans out several times (an evaluation: each method on each split) starts one local Ray
    instance, and its Ray workers keep their imports from one call to the next."""

    def __init__(self, cfg: RunnerConfig, max_workers: int):
        self.cfg, self.max_workers = cfg, max_workers
        self._runner: TaskRunner | None = None

    def __enter__(self) -> StageRunner:
        return self

    def __exit__(self, *exc) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            runner.__exit__(*exc)

    def map(self, task: Task, calls: Sequence[Mapping[str, Any]]) -> list:
        """Run `task` once per parameter mapping in `calls`, all at once; the results in call
        order (the first failure raised once every call has ended)."""
        if not calls:
            return []
        if self._runner is None:
            self._runner = task_runner(self.cfg, self.max_workers).__enter__()
        runner = self._runner
        if self.cfg.kind == "ray":
            from prefect.settings import PREFECT_API_URL, temporary_settings
            from prefect_ray.context import remote_options

            url = temporary_api_url()
            api = temporary_settings({PREFECT_API_URL: url}) if url else nullcontext()
            with api, remote_options(num_cpus=self.cfg.num_cpus, num_gpus=self.cfg.num_gpus):
                futures = [runner.submit(task, dict(c)) for c in calls]
        else:
            futures = [runner.submit(task, dict(c)) for c in calls]
        for f in futures:
            f.wait()
        return [f.result() for f in futures]


def map_task(
    task: Task, calls: Sequence[Mapping[str, Any]], cfg: RunnerConfig, max_workers: int
) -> list:
    """`StageRunner.map` on a runner of its own, for a stage that fans out once."""
    with StageRunner(cfg, max_workers) as runner:
        return runner.map(task, calls)


def temporary_api_url() -> str | None:
    """The URL of the temporary Prefect server this process runs its flow against, when no
    Prefect API is configured (`gr2 run` without PREFECT_API_URL); None when one is. prefect-ray
    sends a task the submitting process's settings, and without a URL in them each Ray task would
    start a temporary server of its own (seconds per task, its runs out of the flow's sight)."""
    from prefect.settings import get_current_settings

    if get_current_settings().api.url:
        return None
    from prefect.server.api.server import SubprocessASGIServer

    # Prefect keeps one instance per port; the running one is this process's temporary server
    servers = getattr(SubprocessASGIServer, "_instances", {}).values()
    running = [s for s in servers if getattr(s, "running", False)]
    return running[0].api_url if running else None
