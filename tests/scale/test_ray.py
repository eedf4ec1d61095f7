"""The teacher's shards, the evaluation's answer shards and the item embeddings' shards as Ray tasks
through prefect-ray's task runner, on a Ray head started here on 127.0.0.1 (as a cluster's head
would be): the ci flow writes the same traces, answers and vectors as with Prefect's thread pool,
and the shards ran in Ray's worker processes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from prefect.settings import PREFECT_TASKS_REFRESH_CACHE, temporary_settings

from data_contracts.config import load_profile
from data_contracts.manifest import Manifest
from data_contracts.rerankers import eval_stage, sft_stage
from flows.gr2_pipeline import gr2_pipeline
from gr2_core.serving import free_port

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
SHARDS = 2
EVAL = eval_stage(sft_stage("grounded"))


@pytest.fixture(scope="module")
def ray_head():
    """`ray start --head` on 127.0.0.1 with two CPUs; stopped (with its workers) after. Token
    authentication is off for the head and this process (the driver) alike: Ray switches it on
    for a head when `~/.ray/auth_token` exists (any earlier local `ray.init` writes one), and a
    driver then needs RAY_AUTH_MODE=token (docs/scaling.md)."""
    tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths are capped
    port = free_port()
    before = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    env = os.environ | {"RAY_USAGE_STATS_ENABLED": "0"}
    cmd = [str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1"]
    cmd += ["--port", str(port), "--num-cpus", "2", "--include-dashboard", "false"]
    cmd += ["--temp-dir", str(tmp), "--disable-usage-stats"]
    started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        yield {"address": f"127.0.0.1:{port}", "tmp": tmp}
    finally:
        subprocess.run([str(BIN / "ray"), "stop"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(tmp, ignore_errors=True)
        if before is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = before


def _published(root: Path, stage: str) -> Manifest:
    (folder,) = [p for p in (root / stage).iterdir() if not p.name.endswith(".partial")]
    return Manifest.read(folder)


def _traces(root: Path) -> tuple[Manifest, dict[str, pl.DataFrame]]:
    manifest = _published(root, "traces")
    tables = {
        name: pl.read_parquet(manifest.path(name)).drop("seconds", strict=False)
        for name in manifest.files
        if name.endswith(("_attempts", "_traces"))
    }
    return manifest, tables


def _answers(root: Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The evaluation's answers, and its metrics without the answer times."""
    manifest = _published(root, EVAL)
    metrics = pl.read_parquet(manifest.path("metrics")).filter(pl.col("metric") != "seconds")
    return pl.read_parquet(manifest.path("answers")), metrics


def test_shards_on_ray_write_what_the_thread_pool_writes(prefect_harness, ray_head, tmp_path):
    root = tmp_path / "artifacts"
    overrides = {
        "artifacts_root": str(root),
        "tracking.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "data.max_users": 120,
        "evaluation.bootstrap_samples": 50,
        "teacher.modes": ["grounded"],  # the teacher without a model server: fast, offline
        "teacher.shards": SHARDS,
        "teacher.parallel_shards": SHARDS,
        "runner.shards": SHARDS,
        "sft.eval_batch_size": 2,  # 6 decoded slates a split: 3 batches, so 2 shards
        "rl.variants": [],
        "registry.enabled": False,
    }
    threads = load_profile("ci", overrides)
    assert gr2_pipeline(threads, return_state=True).is_completed()
    by_threads, tables_threads = _traces(root)
    assert tables_threads["grounded_attempts"].height > 0

    answers_threads = _answers(root)
    embedded = _published(root, "embeddings")
    vectors = np.load(embedded.path("embeddings"))

    # the same run on Ray: the embeddings, traces and evaluation outputs moved away, Prefect's
    # cache records ignored, so the three are computed again (on Ray) and every other stage
    # reuses its output
    for stage in ("embeddings", "traces", EVAL):
        shutil.move(root / stage, tmp_path / f"{stage}-threads")
    on_ray = load_profile(
        "ci", overrides | {"runner.kind": "ray", "runner.address": ray_head["address"]}
    )
    assert on_ray.teacher.digest() == threads.teacher.digest()  # the runner is operational
    with temporary_settings({PREFECT_TASKS_REFRESH_CACHE: True}):
        assert gr2_pipeline(on_ray, return_state=True).is_completed()
    by_ray, tables_ray = _traces(root)

    assert by_ray.key == by_threads.key and by_ray.directory == by_threads.directory
    assert by_ray.mlflow_run_id != by_threads.mlflow_run_id  # computed again, not reused
    assert tables_ray.keys() == tables_threads.keys()
    for name, table in tables_threads.items():
        assert tables_ray[name].equals(table), name
    # the evaluation's answers (each method's slates in two Ray tasks), the same too
    answers_ray = _answers(root)
    assert answers_ray[0].equals(answers_threads[0])
    assert answers_ray[1].equals(answers_threads[1])
    # the item embeddings (in two Ray tasks of whole batches): the same vectors
    assert _published(root, "embeddings").mlflow_run_id != embedded.mlflow_run_id
    assert np.array_equal(np.load(_published(root, "embeddings").path("embeddings")), vectors)
    # each shard ran as a Prefect task run inside one of the head's Ray workers
    logs = "".join(
        p.read_text(errors="replace") for p in ray_head["tmp"].glob("session_*/logs/worker-*")
    )
    for k in range(SHARDS):
        assert f"grounded-shard-{k}" in logs, k
        assert f"eval-free-shard-{k}" in logs and f"eval-scored-shard-{k}" in logs, k
        assert f"embed-shard-{k}" in logs, k


def test_ctc_evaluation_on_ray_scores_what_one_pass_scores(prefect_harness, ray_head, tmp_path):
    """The CTC flow's evaluation with its test pairs in Ray tasks: the same predictions and
    scores, in the same order, as the stage scoring them in one pass."""
    from data_contracts.ctc import load_ctc_profile
    from flows.ctc_summarization import ctc_summarization

    root = tmp_path / "ctc-artifacts"
    overrides = {
        "artifacts_root": str(root),
        "tracking.tracking_uri": f"sqlite:///{tmp_path / 'mlflow-ctc.db'}",
        "runner.shards": SHARDS,
    }
    one_pass = load_ctc_profile("ci", overrides)
    assert ctc_summarization(one_pass, return_state=True).is_completed()
    before = _published(root, "ctc_eval")
    scores = pl.read_parquet(before.path("scores")).drop("seconds")

    shutil.move(root / "ctc_eval", tmp_path / "ctc_eval-threads")
    on_ray = load_ctc_profile(
        "ci", overrides | {"runner.kind": "ray", "runner.address": ray_head["address"]}
    )
    with temporary_settings({PREFECT_TASKS_REFRESH_CACHE: True}):
        assert ctc_summarization(on_ray, return_state=True).is_completed()
    after = _published(root, "ctc_eval")
    assert after.key == before.key and after.mlflow_run_id != before.mlflow_run_id
    assert pl.read_parquet(after.path("scores")).drop("seconds").equals(scores)
    logs = "".join(
        p.read_text(errors="replace") for p in ray_head["tmp"].glob("session_*/logs/worker-*")
    )
    for k in range(SHARDS):
        assert f"ctc-eval-shard-{k}" in logs, k
