"""Teacher reasoning traces: slates to prompt, co-watching notes, sharded resumable sampling,
the rejection filter's statistics.

Modes (SPEC section 4): `targeted` reveals the target and asks the teacher to explain it;
`rejection` reveals nothing. In both, an attempt is kept only if `check_answer` accepts it with
the target first; a slate gets up to `max_attempts` attempts, stopping at the first accepted.

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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl

from gr2_core.catalogue import Catalogue
from gr2_core.prompts import CoWatch, build_messages, check_answer
from gr2_core.teacher import Teacher, TeacherError, TeacherReply, TeacherRequest

log = logging.getLogger(__name__)

MODES = ("targeted", "rejection")


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
) -> list[dict[str, str]]:
    notes = cowatch.notes(job.user_id, job.history, job.candidates) if cowatch else None
    target = job.target if mode == "targeted" else None
    return build_messages(job.history, job.candidates, cat, knowledge, notes, target)


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
    messages = {j.job_id: job_messages(j, cat, mode, knowledge, cowatch) for j in jobs}
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
                requests.append(TeacherRequest(messages[j.job_id], n, job_seed + first, slate))
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
