"""What every stage task shares: its key, its Prefect cache key, and the run protocol.

A task module declares one `Stage` (name, which part of the config it depends on, and the task
module itself, from which `tasks.store.code_closure` finds the code it runs) and a body
`(work_dir, run) -> StageOutput`, usually one call of the stage's core function
`gr2_core.<stage>.run`. `Stage.run` does the rest: return a complete earlier output with the same
key, or open the work folder, open the MLflow child run, call the body, record what the output
asks to show (`attach`), and publish the folder with its manifest (the `publish` task tags the
parent run).
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.context import TaskRunContext

from data_contracts.config import StageConfig
from data_contracts.ctc import FlowConfig
from data_contracts.manifest import Manifest
from gr2_core.output import StageOutput
from tasks.store import PROJECT_ROOT, StageDir, code_version, stage_closure, stage_key
from tasks.tracking import StageRun, Tracking, stage_run

CACHE_NEUTRAL = True  # the run protocol: never shapes a stage's output


Body = Callable[[Path, StageRun], StageOutput]
STAGES: dict[str, Stage] = {}  # every declared stage by name (filled as task modules load)


def attach(run: StageRun, work: Path, result: StageOutput, profile: str) -> None:
    """Record on the stage's MLflow run, and in Prefect, what its core function asked to show."""
    for name, text in result.texts.items():
        run.log_text(text, name)
    for name, table in result.tables.items():
        run.log_table(table, name)
    for rel, folder in result.attach.items():
        run.log_artifact(work / rel, folder or None)
    for d in result.datasets:
        run.log_dataset(d.table, d.name, d.source, d.context)
    for key, summary in result.summaries.items():
        create_table_artifact(
            summary.rows, key=f"gr2-{key}", description=f"{summary.description} ({profile})"
        )


WRITING = "%s: key %s, writing to %s"  # the log line of a stage that computes its output
_WRITING = re.compile(r" - (\w+): key \w+, writing to ")


def computed_stages(log: str) -> list[str]:
    """The stages a run's log says it computed (not reused), in order: for crash and rerun
    checks that read a run's output (infra/crash_matrix.py, tests)."""
    return _WRITING.findall(log)


class MissingOutputError(FileNotFoundError):
    """A stage output that Prefect's cache still records was deleted from the artifacts root."""


def require(manifest: Manifest) -> Manifest:
    """Fail clearly if an upstream output recorded by a cached run was deleted since."""
    missing = [n for n in manifest.files if not manifest.path(n).exists()]
    if missing:
        raise MissingOutputError(
            f"upstream stage '{manifest.stage}' output {missing} is missing from "
            f"{manifest.directory} (deleted after a cached run?); rerun with `gr2 run --refresh`"
        )
    return manifest


@dataclass(frozen=True)
class Stage:
    """A named stage: its config section and its task module (`__name__`), whose import closure
    in the project is the code its output depends on. A task module that hosts several stages
    names each one's `core` module, so that a stage is not re-keyed by its sibling's code."""

    name: str
    section: Callable[[FlowConfig], StageConfig]
    module: str
    # content that the config does not capture, e.g. hashes of the raw input files
    fingerprint: Callable[[FlowConfig], Mapping] | None = None
    core: str | None = None

    def __post_init__(self) -> None:
        known = STAGES.setdefault(self.name, self)
        if known.module != self.module:  # a module loaded twice re-declares its own: fine
            raise ValueError(f"stage {self.name!r} is declared in {known.module} and {self.module}")

    def siblings(self) -> tuple[str, ...]:
        """The core modules of the other stages declared in this stage's task module."""
        cores = {s.core for s in STAGES.values() if s.module == self.module and s.core}
        return tuple(sorted(cores - {self.core}))

    def closure(self, root: Path = PROJECT_ROOT) -> dict[str, Path]:
        return stage_closure(self.module, root, self.core, self.siblings())

    def code(self, root: Path = PROJECT_ROOT) -> str:
        return code_version(self.module, root, self.core, self.siblings())

    def identity(self, config: FlowConfig) -> dict:
        extra = self.fingerprint(config) if self.fingerprint else {}
        return {"config": self.section(config).digest(), "extra": extra}

    def key(self, config: FlowConfig, upstream: Sequence[Manifest]) -> str:
        return stage_key(self.name, self.identity(config), upstream, self.code())

    def cache_key_fn(self, context: TaskRunContext, parameters: dict[str, Any]) -> str:
        """Prefect cache key: the stage key, scoped to the artifacts root in use."""
        config: FlowConfig = parameters["config"]
        upstream = [v for v in parameters.values() if isinstance(v, Manifest)]
        root = hashlib.sha256(str(Path(config.artifacts_root).resolve()).encode()).hexdigest()[:8]
        return f"gr2-{self.name}-{self.key(config, upstream)}-{root}"

    def run(
        self,
        config: FlowConfig,
        upstream: Sequence[Manifest],
        tracking: Tracking,
        body: Body,
    ) -> Manifest:
        log = get_run_logger()
        for m in upstream:
            require(m)
        code = self.code()  # once: the key and the manifest must agree
        key = stage_key(self.name, self.identity(config), upstream, code)
        folder = StageDir(Path(config.artifacts_root), self.name, key)
        if (done := folder.existing()) is not None:
            log.info("%s: output %s already complete, reusing it", self.name, done.directory)
            return done

        def waiting(lock: Path) -> None:
            log.info("%s: another run is computing key %s (%s held); waiting", self.name, key, lock)

        with folder.lock(on_wait=waiting):
            if (done := folder.existing()) is not None:  # the other run finished it meanwhile
                log.info("%s: output %s completed by another run, reusing it", self.name, key)
                return done
            return self._compute(config, upstream, tracking, body, folder, code)

    def _compute(
        self,
        config: FlowConfig,
        upstream: Sequence[Manifest],
        tracking: Tracking,
        body: Body,
        folder: StageDir,
        code: str,
    ) -> Manifest:
        """Open the work folder and the MLflow run, run the body, publish (the lock is held)."""
        log = get_run_logger()
        key = folder.key
        work = folder.open()
        log.info(WRITING, self.name, key, work)
        with stage_run(tracking, self.name, key, self.section(config)) as run:
            start = time.perf_counter()
            result = body(work, run)
            result.metrics["wall_seconds"] = time.perf_counter() - start
            run.log_metrics(result.metrics)
            attach(run, work, result, config.profile)
            manifest = folder.commit(
                result.files,
                self.identity(config),
                upstream,
                code,
                result.metrics,
                run.run_id,
                result.scratch,
            )
            run.log_text(manifest.model_dump_json(indent=2), "manifest.json")
        log.info("%s: done -> %s", self.name, manifest.directory)
        return manifest
