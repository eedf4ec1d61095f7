"""Teacher reasoning traces: slates to prompt, co-watching notes, sharded resumable sampling,
the rejection filter's statistics.

Modes (SPEC section 4): `targeted` reveals the target and asks the teacher to explain it;
`rejection` reveals nothing; `grounded` (an ablation, `gr2_core.grounded`) asks no model and
composes the answer from the prompt's facts, knowing the target. In all, an attempt is kept
only if `check_answer` accepts it with the target first; a slate gets up to `max_attempts`
attempts, stopping at the first accepted.

Every attempt is one JSON line in its shard's file (`shard-NNN.jsonl`): slate id, attempt number,
prompt hash, seed, raw output, finish reason, accepted or the rejection reason. Lines are appended
and flushed as replies arrive, so a run killed half-way loses at most the requests in flight; a
restart reads the file back, skips slates that are decided (accepted, or out of attempts) and
continues the others from their next attempt number, with the same seeds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from data_contracts.config import PromptConfig, TeacherConfig
from data_contracts.rerankers import TRACE_MODES
from gr2_core.catalogue import Catalogue
from gr2_core.grounded import GroundedTeacher
from gr2_core.output import Log, StageOutput, Summary
from gr2_core.prompts import CoWatch, build_messages, check_answer
from gr2_core.serving import ManagedServer, free_port, server_python, vllm_command, vllm_env
from gr2_core.teacher import (
    HFTeacher,
    OpenAITeacher,
    Retry,
    Teacher,
    TeacherError,
    TeacherReply,
    TeacherRequest,
)

log = logging.getLogger(__name__)

MODES = TRACE_MODES  # data_contracts.rerankers
GROUNDED = "grounded"  # no teacher model: gr2_core.grounded composes the answer


@dataclass(frozen=True)
class Job:
    """One slate to explain: the user's recent history, the candidates, the target."""

    job_id: str
    user_id: str
    position: int
    history: tuple[str, ...]
    candidates: tuple[str, ...]
    target: str


def select_jobs(slates: pl.DataFrame, count: int, history_items: int, seed: int) -> list[Job]:
    """Training-split slates that contain their target, at most one per user, `count` of them
    drawn with `seed` (the newest training position of each drawn user)."""
    pool = (
        slates.filter((pl.col("split") == "train") & pl.col("target_rank").is_not_null())
        .sort("user_id", "position")
        .unique("user_id", keep="last", maintain_order=True)
    )
    if pool.is_empty():
        raise ValueError("no training-split slate contains its target: nothing to explain")
    rng = np.random.default_rng(seed)
    rows = sorted(rng.choice(pool.height, size=min(count, pool.height), replace=False).tolist())
    out = []
    for r in pool[rows].iter_rows(named=True):
        out.append(
            Job(
                f"{r['user_id']}:{r['position']}",
                r["user_id"],
                r["position"],
                tuple(r["history"][-history_items:]),
                tuple(r["candidates"]),
                r["target"],
            )
        )
    return out


def prompt_hash(messages: list[dict]) -> str:
    return hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:16]


def job_messages(
    job: Job,
    cat: Catalogue,
    mode: str,
    knowledge: bool,
    cowatch: CoWatch | None,
    max_explanation_tokens: int = 64,
) -> list[dict[str, str]]:
    """The teacher's prompt for one job: the student's, with the target in targeted mode, and
    the same reasoning budget."""
    notes = cowatch.notes(job.user_id, job.history, job.candidates) if cowatch else None
    target = job.target if mode == "targeted" else None  # grounded: its prompt is the student's
    return build_messages(
        job.history, job.candidates, cat, knowledge, notes, target, max_explanation_tokens
    )


@dataclass(frozen=True)
class Attempt:
    job_id: str
    attempt: int
    mode: str
    prompt_sha: str
    seed: int
    raw: str
    finish_reason: str
    accepted: bool
    reason: str
    prompt_tokens: int
    completion_tokens: int
    seconds: float


def read_attempts(path: Path) -> list[Attempt]:
    """The attempts recorded in a shard file; a torn last line (crash mid-write) is dropped."""
    if not path.exists():
        return []
    out = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines, 1):
        try:
            out.append(Attempt(**json.loads(line)))
        except (json.JSONDecodeError, TypeError) as exc:
            if n == len(lines):
                log.warning("%s: dropping a torn last line (%s)", path, exc)
                break
            raise ValueError(f"{path}, line {n}: not an attempt record ({exc})") from exc
    return out


def _truncate_torn_tail(path: Path) -> None:
    """Cut a partial last line so appends start on a fresh line."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


@dataclass
class ShardResult:
    attempts: int
    new_attempts: int
    accepted_jobs: int
    failed_requests: int


def run_shard(
    jobs: Sequence[Job],
    cat: Catalogue,
    teacher: Teacher,
    path: Path,
    mode: str,
    *,
    max_attempts: int,
    samples_per_request: int,
    knowledge: bool,
    cowatch: CoWatch | None = None,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    min_explanation_chars: int = 0,
    max_explanation_tokens: int = 64,
) -> ShardResult:
    """Sample attempts for `jobs` until each is accepted or out of attempts, appending to `path`.

    `min_explanation_chars` is the filter's minimum explanation length (`check_answer`).

    Resumable: attempts already in `path` count. Requests that fail for good (server down after
    the retries) leave their slates pending and are reported in `failed_requests`; rerunning
    continues from there.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    valid = frozenset(cat.sid.values())
    _truncate_torn_tail(path)
    done = read_attempts(path)
    used = Counter(a.job_id for a in done)
    accepted = {a.job_id for a in done if a.accepted}
    start_count = len(done)
    if done:
        log.warning("%s: resuming after %d attempts already written", path, start_count)
    messages = {
        j.job_id: job_messages(j, cat, mode, knowledge, cowatch, max_explanation_tokens)
        for j in jobs
    }
    failed = 0
    with path.open("a", encoding="utf-8") as out:
        while True:
            pending = [
                j for j in jobs if j.job_id not in accepted and used[j.job_id] < max_attempts
            ]
            if not pending:
                break
            requests, owners = [], []
            for j in pending:
                first = used[j.job_id]
                n = min(samples_per_request, max_attempts - first)
                job_seed = seed + int(hashlib.sha256(j.job_id.encode()).hexdigest()[:6], 16)
                slate = tuple(cat.sid[c] for c in j.candidates)
                requests.append(
                    TeacherRequest(messages[j.job_id], n, job_seed + first, slate, slate_facts=j)
                )
                owners.append((j, first))
            round_failed = 0

            def on_reply(
                i: int,
                reply: TeacherReply | TeacherError,
                owners: list = owners,
                requests: list = requests,
            ) -> None:
                nonlocal round_failed
                job, first = owners[i]
                if isinstance(reply, TeacherError) or not reply.texts:
                    round_failed += 1  # the slate stays pending for the next run
                    problem = reply if isinstance(reply, TeacherError) else "a reply with no sample"
                    log.warning("slate %s: %s", job.job_id, problem)
                    return
                target_sid = cat.sid[job.target]
                slate_sids = [cat.sid[c] for c in job.candidates]
                k = max(1, len(reply.texts))
                for s, (text, finish) in enumerate(
                    zip(reply.texts, reply.finish_reasons, strict=True)
                ):
                    verdict = check_answer(
                        text, slate_sids, valid, target_sid, min_explanation_chars
                    )
                    reason = verdict.reason
                    if not verdict.accepted and finish == "length":
                        reason = f"truncated:{reason}"
                    rec = Attempt(
                        job.job_id,
                        first + s + 1,
                        mode,
                        prompt_hash(requests[i].messages),
                        requests[i].seed + s,
                        text,
                        finish,
                        verdict.accepted,
                        reason,
                        reply.prompt_tokens // k,
                        reply.completion_tokens // k,
                        reply.seconds / k,
                    )
                    out.write(json.dumps(asdict(rec), ensure_ascii=False) + "\n")
                    used[job.job_id] += 1
                    if verdict.accepted:
                        accepted.add(job.job_id)
                        break  # later samples of this request are not attempts
                out.flush()
                os.fsync(out.fileno())
                if progress:
                    progress(
                        sum(
                            1
                            for j in jobs
                            if j.job_id in accepted or used[j.job_id] >= max_attempts
                        ),
                        len(jobs),
                    )

            teacher.sample_many(requests, on_reply)
            failed += round_failed
            if round_failed:
                break  # the server is gone; keep what we have, the caller decides
    total = len(read_attempts(path))
    return ShardResult(total, total - start_count, len(accepted), failed)


def split_shards(jobs: Sequence[Job], shards: int) -> list[list[Job]]:
    """Round-robin shards (stable: the same jobs and count give the same shards)."""
    shards = max(1, min(shards, len(jobs)))
    return [list(jobs[k::shards]) for k in range(shards)]


def attempts_table(paths: Sequence[Path]) -> pl.DataFrame:
    rows = [asdict(a) for p in paths for a in read_attempts(p)]
    schema = {
        "job_id": pl.Utf8,
        "attempt": pl.Int64,
        "mode": pl.Utf8,
        "prompt_sha": pl.Utf8,
        "seed": pl.Int64,
        "raw": pl.Utf8,
        "finish_reason": pl.Utf8,
        "accepted": pl.Boolean,
        "reason": pl.Utf8,
        "prompt_tokens": pl.Int64,
        "completion_tokens": pl.Int64,
        "seconds": pl.Float64,
    }
    return pl.DataFrame(rows, schema=schema)


def filter_stats(attempts: pl.DataFrame, jobs: int) -> tuple[dict[str, float], pl.DataFrame]:
    """Acceptance per attempt number and the rejection-reason tally.

    Returns metrics (slate acceptance, attempt acceptance, reasons) and a table with one row per
    attempt number: attempts made, accepted, rate.
    """
    per_attempt = (
        attempts.group_by("attempt")
        .agg(pl.len().alias("attempts"), pl.col("accepted").sum().alias("accepted"))
        .with_columns((pl.col("accepted") / pl.col("attempts")).alias("acceptance_rate"))
        .sort("attempt")
    )
    accepted_jobs = attempts.filter(pl.col("accepted"))["job_id"].n_unique()
    metrics = {
        "slates": float(jobs),
        "attempts": float(attempts.height),
        "accepted_slates": float(accepted_jobs),
        "slate_acceptance": accepted_jobs / max(1, jobs),
        "attempt_acceptance": float(attempts["accepted"].mean() or 0.0),
        "completion_tokens": float(attempts["completion_tokens"].sum()),
    }
    for reason, n in attempts.filter(~pl.col("accepted"))["reason"].value_counts().iter_rows():
        metrics[f"rejected/{reason}"] = float(n)
    return metrics, per_attempt


def accepted_traces(
    attempts: pl.DataFrame, jobs: Sequence[Job], cat: Catalogue, notes: Mapping | None = None
) -> pl.DataFrame:
    """One row per accepted slate (its first accepted attempt): the slate and the answer."""
    by_id = {j.job_id: j for j in jobs}
    first = attempts.filter(pl.col("accepted")).sort("attempt").unique("job_id", keep="first")
    rows = []
    for r in first.sort("job_id").iter_rows(named=True):
        job = by_id[r["job_id"]]
        answer = json.loads(r["raw"])
        rows.append(
            {
                "job_id": job.job_id,
                "user_id": job.user_id,
                "position": job.position,
                "history": list(job.history),
                "candidates": list(job.candidates),
                "target": job.target,
                "explanation": answer["explanation"],
                "recommendations": answer["recommendations"],
                "attempt": r["attempt"],
            }
        )
    schema = {
        "job_id": pl.Utf8,
        "user_id": pl.Utf8,
        "position": pl.Int64,
        "history": pl.List(pl.Utf8),
        "candidates": pl.List(pl.Utf8),
        "target": pl.Utf8,
        "explanation": pl.Utf8,
        "recommendations": pl.List(pl.Utf8),
        "attempt": pl.Int64,
    }
    return pl.DataFrame(rows, schema=schema)


SERVED_NAME = "gr2-teacher"


def _model_folder(cfg: TeacherConfig, work: Path) -> str:
    """A local folder of safetensors weights for the local server or the hf backend."""
    if cfg.source and Path(cfg.source).is_dir():
        return str(Path(cfg.source).resolve())
    out = work / "teacher_model"
    if not (out / "config.json").exists():
        from gr2_core.models import export_student  # torch and transformers: only when needed

        export_student(out, cfg.source)  # packaged GGUF (or a hub id) -> safetensors, no SIDs
    return str(out.resolve())


@contextmanager
def open_teacher(
    cfg: TeacherConfig, work: Path, api_key: str | None = None, log: Log = log
) -> Iterator[Teacher]:
    """The configured teacher; a local vLLM server (no `base_url`) lives as long as the context,
    its log in `work/teacher_server.log`."""
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
            api_key=api_key,
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
    python = server_python(cfg.server_python)
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


@dataclass(frozen=True)
class Shard:
    """One shard of one mode's slates and the file its attempts are appended to."""

    mode: str
    index: int
    jobs: list[Job]
    path: Path


@dataclass(frozen=True)
class ShardContext:
    """What every shard of a stage run shares."""

    cat: Catalogue
    teacher: Teacher
    cfg: TeacherConfig
    prompt: PromptConfig
    cowatch: CoWatch | None


def sample_shard(shard: Shard, ctx: ShardContext, log: Log = log) -> ShardResult:
    """Sample one shard until every slate is decided (resumes from the shard's file)."""

    def progress(done: int, total: int) -> None:
        log.info("%s shard %d: %d/%d slates decided", shard.mode, shard.index, done, total)

    result = run_shard(
        shard.jobs,
        ctx.cat,
        ctx.teacher,
        shard.path,
        shard.mode,
        max_attempts=ctx.cfg.max_attempts,
        samples_per_request=ctx.cfg.samples_per_request,
        knowledge=ctx.prompt.knowledge,
        cowatch=ctx.cowatch,
        seed=ctx.cfg.seed,
        progress=progress,
        min_explanation_chars=ctx.cfg.min_explanation_chars,
        max_explanation_tokens=ctx.prompt.max_explanation_tokens,
    )
    log.info("%s shard %d: %s", shard.mode, shard.index, result)
    return result


# runs a batch of shards (at most `teacher.parallel_shards`), possibly at once; the results in order
MapShards = Callable[[list[Shard], ShardContext], list[ShardResult]]


def one_by_one(shards: list[Shard], ctx: ShardContext) -> list[ShardResult]:
    return [sample_shard(s, ctx) for s in shards]


@dataclass(frozen=True)
class TracesInputs:
    slates: Path  # the candidates stage's slates
    sequences: Path  # the split stage's sequences (co-watch notes)
    items: Path  # the data stage's items
    sid_map: Path  # the semantic-ID stage's SID map
    prompt: PromptConfig  # the prompt's settings (history length, knowledge, co-watch notes)
    api_key: str | None = field(default=None, repr=False)  # for a remote teacher; never logged


def run(
    inputs: TracesInputs,
    cfg: TeacherConfig,
    out: Path,
    map_shards: MapShards = one_by_one,
    log: Log = log,
) -> StageOutput:
    """Stage `traces`: teacher traces per mode (every attempt, the accepted traces, the filter's
    statistics). Shards run through `map_shards`, `cfg.parallel_shards` at a time; their attempt
    files live in `out`, so an interrupted stage resumes where it stopped."""
    cat = Catalogue.build(pl.read_parquet(inputs.items), pl.read_parquet(inputs.sid_map))
    prompt = inputs.prompt
    jobs = select_jobs(pl.read_parquet(inputs.slates), cfg.slates, prompt.history_items, cfg.seed)
    cowatch = CoWatch(pl.read_parquet(inputs.sequences)) if prompt.cowatch_notes else None
    parts = split_shards(jobs, cfg.shards)
    log.info("traces: %d slates in %d shards, modes %s", len(jobs), len(parts), cfg.modes)
    result = StageOutput({}, scratch=["teacher_model"])
    failures = []
    model_modes = [m for m in cfg.modes if m != GROUNDED]
    opened = open_teacher(cfg, out, inputs.api_key, log) if model_modes else nullcontext(None)
    with opened as model_teacher:
        for mode in cfg.modes:
            teacher = (
                GroundedTeacher(cat, cowatch, prompt.knowledge)
                if mode == GROUNDED
                else model_teacher
            )
            ctx = ShardContext(cat, teacher, cfg, prompt, cowatch)
            (out / mode).mkdir(exist_ok=True)
            shards = [
                Shard(mode, k, p, out / mode / f"shard-{k:03d}.jsonl") for k, p in enumerate(parts)
            ]
            results: list[ShardResult] = []
            for start in range(0, len(shards), cfg.parallel_shards):
                results += map_shards(shards[start : start + cfg.parallel_shards], ctx)
            failures += [
                f"{mode} shard {k}: {r.failed_requests} failed requests"
                for k, r in enumerate(results)
                if r.failed_requests
            ]
            _mode_output(mode, [s.path for s in shards], jobs, cat, out, result, log)
    if failures:
        raise RuntimeError(
            "teacher requests failed after retries (" + "; ".join(failures) + "); the "
            f"attempts so far are kept in {out}, rerun the pipeline to resume"
        )
    if (out / "teacher_server.log").exists():
        result.attach["teacher_server.log"] = ""
    return result


def _mode_output(
    mode: str,
    paths: list[Path],
    jobs: list[Job],
    cat: Catalogue,
    out: Path,
    result: StageOutput,
    log: Log,
) -> None:
    """One mode's attempts and accepted traces written, and its statistics added to `result`."""
    attempts = attempts_table(paths)
    stats, per_attempt = filter_stats(attempts, len(jobs))
    attempts.write_parquet(out / f"{mode}_attempts.parquet")
    accepted_traces(attempts, jobs, cat).write_parquet(out / f"{mode}_traces.parquet")
    result.files |= {
        f"{mode}_attempts": f"{mode}_attempts.parquet",
        f"{mode}_traces": f"{mode}_traces.parquet",
        f"{mode}_shards": mode,
    }
    result.metrics |= {f"{mode}/{k}": v for k, v in stats.items()}
    result.tables[f"{mode}_acceptance_per_attempt.csv"] = per_attempt
    result.tables[f"{mode}_attempts_sample.csv"] = attempts.head(200)
    reasons = [
        {"reason": k.split("/", 1)[1], "count": int(v)}
        for k, v in stats.items()
        if k.startswith("rejected/")
    ]
    total = {
        "attempt": "all",
        "attempts": int(stats["attempts"]),
        "accepted": int(stats["accepted_slates"]),
        "acceptance_rate": round(stats["slate_acceptance"], 4),
    }
    result.summaries[f"traces-{mode}"] = Summary(
        per_attempt.to_dicts() + [total],
        f"Teacher acceptance per attempt, {mode} mode; rejection reasons: {reasons}",
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
