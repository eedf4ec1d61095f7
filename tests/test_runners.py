"""A stage's task runner: started once for all of a stage's fan-outs, and only when it fans out."""

from __future__ import annotations

from prefect import flow, task

from data_contracts.config import RunnerConfig
from tasks import runners


@task(name="double")
def double(x: int) -> int:
    return 2 * x


@flow(name="fan-outs")
def fan_outs(cfg: RunnerConfig) -> list:
    """What a stage does: no fan-out, then two fan-outs on one runner, then a one-off."""
    with runners.StageRunner(cfg, 2) as runner:
        nothing = runner.map(double, [])
    with runners.StageRunner(cfg, 2) as runner:
        first = runner.map(double, [{"x": 1}, {"x": 2}])
        second = runner.map(double, [{"x": 3}])
    return [nothing, first, second, runners.map_task(double, [{"x": 4}], cfg, 1)]


def test_a_stage_runner_starts_once_for_all_its_fan_outs(prefect_harness, monkeypatch):
    started, real = [], runners.task_runner

    def counted(cfg, max_workers):
        started.append(max_workers)
        return real(cfg, max_workers)

    monkeypatch.setattr(runners, "task_runner", counted)
    # threads, as on a laptop; on Ray the same object holds the stage's Ray instance
    results = fan_outs(RunnerConfig())
    assert results == [[], [2, 4], [6], [8]]  # each call's results in call order
    assert started == [2, 1]  # nothing for no fan-out, one runner for two, one for the one-off
