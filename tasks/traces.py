"""Stage `traces`: teacher reasoning traces for each mode (targeted, rejection), filtered.

The teacher is reached through `gr2_core.teacher`; with no `teacher.base_url` the stage exports
the packaged SmolLM2-135M-Instruct to safetensors, starts vLLM's OpenAI-compatible server on
127.0.0.1 from the `make teacher-env` virtualenv, and stops it at the end. Shards are Prefect
tasks submitted to the task runner (`teacher.parallel_shards` at once); their attempt files live
in the stage's work folder, so a crashed or interrupted stage resumes where it stopped.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import polars as pl
from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NONE

import gr2_core.traces as tr
from data_contracts.config import PipelineConfig, PromptConfig, TeacherConfig
from data_contracts.manifest import Manifest
from gr2_core.models import export_student
from gr2_core.output import StageOutput
from gr2_core.prompts import CoWatch
from gr2_core.serving import ManagedServer, free_port, vllm_command, vllm_env
from gr2_core.teacher import HFTeacher, OpenAITeacher, Retry, Teacher
from tasks.inputs import catalogue, prompt_identity, read
from tasks.stage import Stage
from tasks.tracking import StageRun, Tracking

STAGE = Stage("traces", lambda c: c.teacher, __name__, prompt_identity)
SERVED_NAME = "gr2-teacher"


def api_key(cfg: TeacherConfig) -> str | None:
    """The API key from a Prefect Secret block or the environment; never logged."""
    if cfg.api_key_secret:
        from prefect.blocks.system import Secret

        return Secret.load(cfg.api_key_secret).get()
    return os.environ.get(cfg.api_key_env) or None


def _model_folder(cfg: TeacherConfig, work: Path) -> str:
    """A local folder of safetensors weights for the local server or the hf backend."""
    if cfg.source and Path(cfg.source).is_dir():
        return str(Path(cfg.source).resolve())
    out = work / "teacher_model"
    if not (out / "config.json").exists():
        export_student(out, cfg.source)  # packaged GGUF (or a hub id) -> safetensors, no SIDs
    return str(out.resolve())


@contextmanager
def open_teacher(cfg: TeacherConfig, work: Path) -> Iterator[Teacher]:
    """The configured teacher; a local vLLM server lives as long as the context."""
    log = get_run_logger()
    if cfg.backend == "hf":
        yield HFTeacher(
            _model_folder(cfg, work),
            cfg.max_tokens,
            cfg.temperature,
            cfg.top_p,
            cfg.hf_batch_size,
            cfg.num_threads,
        )
        return

    def client(url: str, model: str | None) -> OpenAITeacher:
        teacher = OpenAITeacher(
            url,
            model or "",
            api_key=api_key(cfg),
            concurrency=cfg.concurrency,
            timeout_s=cfg.timeout_s,
            retry=Retry(cfg.max_retries, cfg.backoff_s),
            max_tokens=cfg.max_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            structured=cfg.structured_output,
            use_n=cfg.use_n,
            stepwise=cfg.stepwise,
            explanation_chars=cfg.explanation_chars,
        )
        if not teacher.model:
            teacher.model = teacher.served_models()[0]
        return teacher

    if cfg.base_url:
        log.info("traces: teacher at %s", cfg.base_url)
        yield client(cfg.base_url, cfg.model)
        return
    python = Path(cfg.server_python)
    if not python.is_absolute():  # relative to the repository (where `make teacher-env` puts it)
        python = Path(__file__).resolve().parent.parent / python
    port = free_port()
    folder = _model_folder(cfg, work)
    server = ManagedServer(
        # the server's own sampling seed pinned (each request also carries its seed)
        vllm_command(str(python), folder, SERVED_NAME, port, extra=("--seed", str(cfg.seed))),
        port,
        work / "teacher_server.log",
        vllm_env(cfg.server_kv_cache_gib),
        cfg.server_start_timeout_s,
    )
    log.info(
        "traces: starting vLLM on 127.0.0.1:%d with %s (log %s)", port, folder, server.log_path
    )
    with server:
        log.info("traces: vLLM is up")
        yield client(server.base_url, SERVED_NAME)


@task(name="teacher-shard", cache_policy=NONE, task_run_name="{mode}-shard-{index}")
def teacher_shard(
    jobs: list[tr.Job],
    cat,
    teacher: Teacher,
    path: Path,
    mode: str,
    index: int,
    cfg: TeacherConfig,
    prompt: PromptConfig,
    cowatch: CoWatch | None,
) -> tr.ShardResult:
    """Sample one shard until every slate is decided (resumes from the shard's file)."""
    log = get_run_logger()

    def progress(done: int, total: int) -> None:
        log.info("%s shard %d: %d/%d slates decided", mode, index, done, total)

    result = tr.run_shard(
        jobs,
        cat,
        teacher,
        path,
        mode,
        max_attempts=cfg.max_attempts,
        samples_per_request=cfg.samples_per_request,
        knowledge=prompt.knowledge,
        cowatch=cowatch,
        seed=cfg.seed,
        progress=progress,
        min_explanation_chars=cfg.min_explanation_chars,
    )
    log.info("%s shard %d: %s", mode, index, result)
    return result


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
    cfg = config.teacher
    log = get_run_logger()

    def body(work: Path, run: StageRun) -> StageOutput:
        cat = catalogue(data, semantic_ids)
        prompt = config.prompt
        jobs = tr.select_jobs(
            read(candidates, "slates"), cfg.slates, prompt.history_items, cfg.seed
        )
        cowatch = CoWatch(read(split, "sequences")) if prompt.cowatch_notes else None
        shards = tr.split_shards(jobs, cfg.shards)
        log.info("traces: %d slates in %d shards, modes %s", len(jobs), len(shards), cfg.modes)
        files, metrics, failures = {}, {}, []
        with open_teacher(cfg, work) as teacher:
            for mode in cfg.modes:
                folder = work / mode
                folder.mkdir(exist_ok=True)
                paths = [folder / f"shard-{k:03d}.jsonl" for k in range(len(shards))]
                results: list[tr.ShardResult] = []
                for start in range(0, len(shards), cfg.parallel_shards):
                    futures = [
                        teacher_shard.submit(
                            shards[k], cat, teacher, paths[k], mode, k, cfg, prompt, cowatch
                        )
                        for k in range(start, min(len(shards), start + cfg.parallel_shards))
                    ]
                    results += [f.result() for f in futures]
                failures += [
                    f"{mode} shard {k}: {r.failed_requests} failed requests"
                    for k, r in enumerate(results)
                    if r.failed_requests
                ]
                attempts = tr.attempts_table(paths)
                stats, per_attempt = tr.filter_stats(attempts, len(jobs))
                traces = tr.accepted_traces(attempts, jobs, cat)
                attempts.write_parquet(work / f"{mode}_attempts.parquet")
                traces.write_parquet(work / f"{mode}_traces.parquet")
                files |= {
                    f"{mode}_attempts": f"{mode}_attempts.parquet",
                    f"{mode}_traces": f"{mode}_traces.parquet",
                    f"{mode}_shards": mode,
                }
                metrics |= {f"{mode}/{k}": v for k, v in stats.items()}
                run.log_table(per_attempt, f"{mode}_acceptance_per_attempt.csv")
                run.log_table(attempts.head(200), f"{mode}_attempts_sample.csv")
                reasons = [
                    {"reason": k.split("/", 1)[1], "count": int(v)}
                    for k, v in stats.items()
                    if k.startswith("rejected/")
                ]
                create_table_artifact(
                    key=f"gr2-traces-{mode}",
                    table=per_attempt.to_dicts() + [{"attempt": "all", **_summary(stats)}],
                    description=f"Teacher acceptance per attempt, {mode} mode "
                    f"({config.profile}); rejection reasons: {reasons}",
                )
                log.info(
                    "traces %s: %d/%d slates accepted (%.1f%%), %d attempts, reasons %s",
                    mode,
                    int(stats["accepted_slates"]),
                    len(jobs),
                    100 * stats["slate_acceptance"],
                    attempts.height,
                    reasons,
                )
        if failures:
            raise RuntimeError(
                "teacher requests failed after retries (" + "; ".join(failures) + "); the "
                f"attempts so far are kept in {work}, rerun the pipeline to resume"
            )
        if (work / "teacher_server.log").exists():
            run.log_artifact(work / "teacher_server.log")
        return StageOutput(files, metrics, scratch=["teacher_model"])

    return STAGE.run(config, [data, split, semantic_ids, candidates], tracking, body)


def _summary(stats: dict[str, float]) -> dict[str, float]:
    return {
        "attempts": int(stats["attempts"]),
        "accepted": int(stats["accepted_slates"]),
        "acceptance_rate": round(stats["slate_acceptance"], 4),
    }


def traces_frame(traces: Manifest, mode: str) -> pl.DataFrame:
    return read(traces, f"{mode}_traces")
