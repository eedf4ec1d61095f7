"""Teacher traces: co-watching notes, jobs, shard files, and sampling against a real vLLM server.

The server tests start vLLM's OpenAI-compatible server (the `make teacher-env` virtualenv) on
127.0.0.1 with the packaged SmolLM2-135M-Instruct exported to safetensors, once per module.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import polars as pl
import pytest

import gr2_core.traces as tr
from gr2_core.catalogue import Catalogue
from gr2_core.models import export_student
from gr2_core.semantic_ids.sidmap import encode_sid
from gr2_core.serving import ManagedServer, free_port, vllm_command, vllm_env
from gr2_core.teacher import OpenAITeacher, Retry, TeacherReply

ROOT = Path(__file__).resolve().parent.parent
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
LIMITS = {"max_attempts": 2, "samples_per_request": 1}
THREE_TRIES = {"max_attempts": 3, "samples_per_request": 1, "knowledge": True}


def _sequences(rows: dict[str, list[str]]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "user_id": list(rows),
            "items": list(rows.values()),
            "n": [len(v) for v in rows.values()],
        }
    )


def test_cowatch_notes_are_the_share_of_the_history_viewers_and_exclude_the_user():
    # training part = items[:n-2]: u1 {a,b,c}, u2 {a,b,d}, u3 {b,c,d}
    seqs = _sequences(
        {
            "u1": ["a", "b", "c", "v1", "t1"],
            "u2": ["a", "b", "d", "v2", "t2"],
            "u3": ["b", "c", "d", "v3", "t3"],
        }
    )
    cw = tr.CoWatch(seqs)
    notes = cw.notes("u1", ["a", "b"], ["c", "d", "zz"])
    # viewers of the history, u1 left out: a by u2, b by u2 and u3 -> 3
    # c: co-watched with a by nobody else, with b by u3 -> 1 of 3 = 33%
    assert notes["c"] == "33"
    # d: with a by u2, with b by u2 and u3 -> 3 of 3; u1 never watched d
    assert notes["d"] == "100"
    assert notes["zz"] == "0"
    # the valid/test items never count
    assert "v1" not in cw.index and "t3" not in cw.index


def _slates() -> pl.DataFrame:
    rows = []
    for u in range(6):
        for p in (3, 4, 5):
            rows.append(
                {
                    "user_id": f"u{u}",
                    "position": p,
                    "split": "train" if p < 5 else "test",
                    "history": [f"h{k}" for k in range(p)],
                    "target": f"t{u}{p}",
                    "candidates": [f"t{u}{p}", "x", "y"] if u != 0 else ["x", "y", "z"],
                    "scores": [1.0, 0.5, 0.2],
                    "target_rank": 1 if u != 0 else None,
                }
            )
    return pl.DataFrame(rows)


def test_select_jobs_takes_training_slates_with_their_target_one_per_user():
    jobs = tr.select_jobs(_slates(), 10, 2, 0)
    assert len(jobs) == 5  # u0's slates lack the target
    assert len({j.user_id for j in jobs}) == 5
    assert all(j.position == 4 and j.target in j.candidates for j in jobs)
    assert all(j.history == ("h2", "h3") for j in jobs)
    assert [j.job_id for j in tr.select_jobs(_slates(), 3, 2, 7)] == [
        j.job_id for j in tr.select_jobs(_slates(), 3, 2, 7)
    ]
    shards = tr.split_shards(jobs, 2)
    assert sorted(j.job_id for s in shards for j in s) == sorted(j.job_id for j in jobs)


def test_attempt_file_drops_a_torn_last_line_and_names_a_corrupt_one(tmp_path):
    rec = {
        "job_id": "u1:4",
        "attempt": 1,
        "mode": "rejection",
        "prompt_sha": "x",
        "seed": 1,
        "raw": "{}",
        "finish_reason": "stop",
        "accepted": False,
        "reason": "schema",
        "prompt_tokens": 1,
        "completion_tokens": 1,
        "seconds": 0.1,
    }
    path = tmp_path / "shard-000.jsonl"
    path.write_text(json.dumps(rec) + "\n" + json.dumps(rec)[:20])
    assert len(tr.read_attempts(path)) == 1
    path.write_text("garbage\n" + json.dumps(rec) + "\n")
    with pytest.raises(ValueError, match=r"shard-000.jsonl, line 1"):
        tr.read_attempts(path)


# -- against a real vLLM server ---------------------------------------------------------------
class _FixedTeacher:
    """Answers every request with the same text (n copies)."""

    name = "fixed"

    def __init__(self, text: str):
        self.text = text

    def sample_many(self, requests, on_reply) -> None:
        for i, req in enumerate(requests):
            on_reply(i, TeacherReply([self.text] * req.n, ["stop"] * req.n))


def test_run_shard_rejects_short_explanations_with_their_own_reason(tmp_path):
    ids = [f"m{i}" for i in range(6)]
    items = pl.DataFrame(
        {"item_id": ids, "title": ids, "year": [2000] * 6, "categories": [["Drama"]] * 6}
    )
    cat = Catalogue.build(
        items, pl.DataFrame({"item_id": ids, "sid": [encode_sid([i, 0]) for i in range(6)]})
    )
    job = tr.Job("u0:3", "u0", 3, ("m0", "m1"), ("m2", "m3", "m4"), "m3")
    recs = [cat.sid[c] for c in ("m3", "m2", "m4")]  # the target first: only the length fails
    teacher = _FixedTeacher(json.dumps({"explanation": " ", "recommendations": recs}))
    path = tmp_path / "shard.jsonl"
    tr.run_shard(
        [job], cat, teacher, path, "targeted", **LIMITS, knowledge=False, min_explanation_chars=20
    )
    assert [(a.accepted, a.reason) for a in tr.read_attempts(path)] == [
        (False, "short_explanation")
    ] * 2
    path = tmp_path / "off.jsonl"
    tr.run_shard([job], cat, teacher, path, "targeted", **LIMITS, knowledge=False)  # no minimum
    assert [a.reason for a in tr.read_attempts(path)] == ["accepted"]


def test_stage_run_samples_every_mode_in_shards_and_resumes_from_its_files(
    tiny, catalogue_jobs, tmp_path
):
    """The stage's core function on the hf backend (a tiny model): per-mode attempt files in
    shards handed out `parallel_shards` at a time, tables, summaries, and a rerun that finds
    every slate decided."""
    from data_contracts.config import DataConfig, PromptConfig, TeacherConfig
    from gr2_core.data import read_items, resolve_sources

    cat, _ = catalogue_jobs
    (tmp_path / "in").mkdir()
    src = resolve_sources(DataConfig(dataset="ml-100k"))
    items = read_items(src.items, src.category_sep, src.lenient_year).head(60)
    items.write_parquet(tmp_path / "in" / "items.parquet")
    ids = items["item_id"].to_list()
    sid_map = pl.DataFrame({"item_id": ids, "sid": [cat.sid[i] for i in ids]})
    sid_map.write_parquet(tmp_path / "in" / "sid_map.parquet")
    slates = pl.DataFrame(
        [
            {
                "user_id": f"u{u}",
                "position": 6,
                "split": "train",
                "history": ids[u : u + 4],
                "target": ids[20 + u],
                "candidates": [ids[30 + u], ids[20 + u], ids[35]],
                "scores": [0.9, 0.5, 0.1],
                "target_rank": 2,
            }
            for u in range(4)
        ]
    )
    slates.write_parquet(tmp_path / "in" / "slates.parquet")
    _sequences({f"u{u}": ids[u : u + 8] for u in range(4)}).write_parquet(
        tmp_path / "in" / "sequences.parquet"
    )
    inputs = tr.TracesInputs(
        *(tmp_path / "in" / f"{n}.parquet" for n in ("slates", "sequences", "items", "sid_map")),
        prompt=PromptConfig(history_items=3, cowatch_notes=True),
    )
    cfg = TeacherConfig(
        backend="hf",
        source=str(tiny),
        slates=3,
        shards=3,
        parallel_shards=2,
        max_attempts=1,
        samples_per_request=1,
        max_tokens=16,
    )
    batches: list[list[tuple[str, int]]] = []

    def map_shards(shards, ctx):
        batches.append([(s.mode, s.index) for s in shards])
        return tr.one_by_one(shards, ctx)

    out = tmp_path / "out"
    out.mkdir()
    result = tr.run(inputs, cfg, out, map_shards)
    modes = list(cfg.modes)
    assert batches == [b for m in modes for b in ([(m, 0), (m, 1)], [(m, 2)])]
    for mode in modes:
        attempts = pl.read_parquet(out / result.files[f"{mode}_attempts"])
        assert attempts.height == 3 and set(attempts["mode"]) == {mode}
        assert result.metrics[f"{mode}/attempts"] == 3
        assert len(list((out / mode).glob("shard-*.jsonl"))) == 3
        summary = result.summaries[f"traces-{mode}"]
        assert summary.rows[-1]["attempts"] == 3 and mode in summary.description
        assert f"{mode}_acceptance_per_attempt.csv" in result.tables
        traces = pl.read_parquet(out / result.files[f"{mode}_traces"])
        assert traces.height == result.metrics[f"{mode}/accepted_slates"]
    assert not (out / "teacher_model").exists()  # a local folder is used as is
    again = tr.run(inputs, cfg, out, map_shards)  # every slate decided: no new attempt
    assert again.metrics == result.metrics


@pytest.fixture(scope="module")
def teacher_model(tmp_path_factory) -> Path:
    return export_student(tmp_path_factory.mktemp("teacher") / "model")


def _server(model: Path, log: Path, port: int) -> ManagedServer:
    if not VLLM_PYTHON.exists():
        pytest.fail(f"{VLLM_PYTHON} missing: run `make teacher-env` (make test does)")
    return ManagedServer(
        vllm_command(str(VLLM_PYTHON), str(model), "teacher", port), port, log, vllm_env(2)
    )


@pytest.fixture(scope="module")
def catalogue_jobs():
    """Real MovieLens-100k titles; SIDs are made-up codes in the real SID format."""
    from data_contracts.config import DataConfig
    from gr2_core.data import read_items, resolve_sources

    src = resolve_sources(DataConfig(dataset="ml-100k"))
    items = read_items(src.items, src.category_sep, src.lenient_year).head(60)
    sid = pl.DataFrame(
        {
            "item_id": items["item_id"],
            "sid": [
                f"<|sid_begin|><s_a_{k // 8}><s_b_{k % 8}><|sid_end|>" for k in range(items.height)
            ],
        }
    )
    cat = Catalogue.build(items, sid)
    ids = items["item_id"].to_list()
    jobs = [
        tr.Job(f"u{u}:9", f"u{u}", 9, tuple(ids[10 * u : 10 * u + 4]), tuple(c), c[2])
        for u, c in enumerate([ids[40 + k : 45 + k] for k in range(0, 12, 4)])
    ]
    return cat, jobs


def _teacher(port: int, retries: int = 2) -> OpenAITeacher:
    return OpenAITeacher(
        f"http://127.0.0.1:{port}",
        "teacher",
        concurrency=3,
        timeout_s=120,
        retry=Retry(retries, 0.5, 2.0),
        max_tokens=160,
        stepwise=True,
        explanation_chars=80,
    )


@pytest.mark.slow
def test_rejection_run_writes_every_attempt_and_statistics(teacher_model, catalogue_jobs, tmp_path):
    cat, jobs = catalogue_jobs
    port = free_port()
    with _server(teacher_model, tmp_path / "server.log", port):
        path = tmp_path / "shard-000.jsonl"
        result = tr.run_shard(
            jobs,
            cat,
            _teacher(port),
            path,
            "rejection",
            max_attempts=2,
            samples_per_request=2,
            knowledge=True,
        )
    attempts = tr.attempts_table([path])
    assert result.failed_requests == 0 and result.attempts == attempts.height
    # every slate decided: accepted, or both attempts used
    per_job = attempts.group_by("job_id").agg(pl.len(), pl.col("accepted").any())
    assert per_job.height == len(jobs)
    assert all(acc or n == 2 for _, n, acc in per_job.iter_rows())
    # stepwise decoding: every answer is a permutation, so only the top-1 rule can reject
    assert set(attempts["reason"]) <= {"accepted", "wrong_top1"}
    stats, per_attempt = tr.filter_stats(attempts, len(jobs))
    assert stats["attempts"] == attempts.height
    assert per_attempt["attempts"].sum() == attempts.height
    assert stats["accepted_slates"] == per_job["accepted"].sum()
    traces = tr.accepted_traces(attempts, jobs, cat)
    assert traces.height == stats["accepted_slates"]
    for row in traces.iter_rows(named=True):
        assert row["recommendations"][0] == cat.sid[row["target"]]


def _kill_after_first_attempts(server: ManagedServer, paths: list[Path], threads):
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and any(
        not tr.read_attempts(p) and t.is_alive() for p, t in zip(paths, threads, strict=True)
    ):
        time.sleep(0.2)
    server.kill()  # a crash, after each shard wrote at least one attempt


@pytest.mark.slow
def test_a_server_killed_mid_run_is_survived_and_resumed(teacher_model, catalogue_jobs, tmp_path):
    cat, jobs = catalogue_jobs
    jobs = jobs[:2]  # two slates show the same as three, and each shard samples them all
    port = free_port()
    server = _server(teacher_model, tmp_path / "server.log", port).start()
    results = {}

    def shard(path: Path, retry: Retry, key: str) -> threading.Thread:
        teacher = _teacher(port)
        teacher.retry = retry

        def work() -> None:  # targeted mode, up to 3 attempts per slate, 1 sample per request
            results[key] = tr.run_shard(jobs, cat, teacher, path, "targeted", **THREE_TRIES)

        thread = threading.Thread(target=work)
        thread.start()
        return thread

    # two shards at once on the server, killed once each has written an attempt and started
    # again: (1) the first one's retry budget (about 6 minutes of waits of at most 8 s) outlasts
    # a restart on a busy CPU, so its requests in flight are retried; (2) the second one gives up
    # after one short retry and stops, and a rerun resumes it
    retried, path = tmp_path / "retried.jsonl", tmp_path / "resumed.jsonl"
    try:
        threads = [
            shard(retried, Retry(60, 1.0, 8.0), "retried"),
            shard(path, Retry(1, 0.2, 0.5), "stopped"),
        ]
        _kill_after_first_attempts(server, [retried, path], threads)
        threads[1].join(120)
        before = tr.read_attempts(path)
        assert before, "an attempt was written before the kill"
        decided = {a.job_id for a in before if a.accepted or a.attempt == 3}
        if decided != {j.job_id for j in jobs}:  # slates in flight failed after their retries
            assert results["stopped"].failed_requests > 0
        server.start()
        threads[0].join(600)
        assert results["retried"].failed_requests == 0
        done = tr.read_attempts(retried)
        assert {a.job_id for a in done if a.accepted or a.attempt == 3} == {j.job_id for j in jobs}
        second = tr.run_shard(jobs, cat, _teacher(port), path, "targeted", **THREE_TRIES)
    finally:
        server.stop()
    after = tr.read_attempts(path)
    assert second.failed_requests == 0
    assert after[: len(before)] == before, "nothing written before the kill is lost or changed"
    keys = [(a.job_id, a.attempt) for a in after]
    assert len(keys) == len(set(keys)), "no attempt is redone"
    for job in jobs:
        mine = sorted(a.attempt for a in after if a.job_id == job.job_id)
        assert mine == list(range(1, len(mine) + 1))
        assert any(a.accepted for a in after if a.job_id == job.job_id) or len(mine) == 3
    accepted_before = {a.job_id for a in before if a.accepted}
    assert accepted_before <= {a.job_id for a in after if a.accepted}
    # an accepted slate gets no further attempt after the restart
    last_before = {j: max(a.attempt for a in before if a.job_id == j) for j in accepted_before}
    assert all(a.attempt <= last_before[a.job_id] for a in after if a.job_id in last_before)


def test_the_api_key_is_sent_but_never_shown():
    teacher = OpenAITeacher("http://127.0.0.1:9/v1", "m", api_key="sk-secret-123")
    assert "sk-secret-123" not in repr(teacher)
    assert teacher.base_url == "http://127.0.0.1:9/v1"
    assert OpenAITeacher("http://h:1", "m").base_url == "http://h:1/v1"


def test_published_tables_name_the_teacher_outputs_they_come_from():
    """A docs table built on teacher traces carries the traces stage key and the hashes of the
    accepted traces, so two publications can be told apart by their teacher outputs."""
    from data_contracts.manifest import FileEntry, Manifest
    from gr2_core.serving import vllm_command
    from tasks.report import traces_digest

    def entry(name: str, sha: str, rows: int | None) -> FileEntry:
        return FileEntry(path=f"{name}.parquet", sha256=sha, bytes=1, rows=rows)

    manifest = Manifest(
        stage="traces",
        key="abcdef0123456789",
        config_hash="c",
        code_version="v",
        schema_version="1",
        directory="/tmp/x",
        files={
            "targeted_traces": entry("t", "1" * 64, 7),
            "targeted_attempts": entry("a", "2" * 64, 30),
            "rejection_traces": entry("r", "3" * 64, 3),
        },
    )
    assert traces_digest(manifest) == (
        "traces stage abcdef012345: rejection_traces 333333333333 (3 rows), "
        "targeted_traces 111111111111 (7 rows)"
    )
    assert traces_digest(None) == ""
    cmd = vllm_command("py", "m", "teacher", 8000, extra=("--seed", "7"))
    assert cmd[-2:] == ["--seed", "7"]


def test_vllm_weights_stay_float32_on_a_cpu_that_emulates_bf16():
    import torch

    from gr2_core.serving import vllm_dtype
    from gr2_core.training import cpu_bf16

    cmd = vllm_command("py", "m", "teacher", 8000, dtype="float16")
    assert cmd[cmd.index("--dtype") + 1] == "float16"  # an explicit dtype is kept
    auto = vllm_command("py", "m", "teacher", 8000)
    if torch.cuda.is_available() or cpu_bf16():
        assert "--dtype" not in auto and vllm_dtype() == "auto"
    else:  # an AVX2-only CPU such as the reference machine: bf16 would be emulated
        assert auto[auto.index("--dtype") + 1] == "float32"
