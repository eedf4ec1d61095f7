"""The main flow end to end on real MovieLens-100k: tracking, caching, partial re-runs, failure."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml
from mlflow.tracking import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from data_contracts.config import PipelineConfig
from data_contracts.rerankers import eval_stage, rl_stage, sft_stage
from flows.cli import main as cli
from flows.gr2_pipeline import gr2_pipeline
from tasks import report
from tests.conftest import write_csv

pytestmark = pytest.mark.slow
STAGES = ["data", "split", "preranker", "candidates", "baselines", "embeddings", "semantic_ids"]
STAGES += ["student", "midtrain", "midtrain_eval"]
# with teacher.modes [targeted] and rl.variants [targeted]: SFT and DAPO with their evaluations
TEACHER_STAGES = ["traces"]
TEACHER_STAGES += [
    s for r in (sft_stage("targeted"), rl_stage("targeted")) for s in (r, eval_stage(r))
]


def _run(config: PipelineConfig):
    state = gr2_pipeline(config, return_state=True)
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    states = {r.name.rsplit("-", 1)[0]: r.state.name for r in runs}
    return state, str(flow_run_id), states


SECRET = "sk-gr2-leak-check-5f1c0e9a7b"
TEXT = {".json", ".yaml", ".yml", ".txt", ".md", ".log", ".csv", ".jsonl", ".py", ""}
# where the artifacts root may appear: the manifests and the parent run's `gr2.stage.<s>.dir`
# tags (where each output lives), the run's config and command (the setting itself), and the
# servers' logs (which read its files); other local folders are replaced in logs by placeholders
ROOT_ALLOWED = {"manifest.json", "config.json"}


def _leaks(client: MlflowClient, experiment_id: str, artifacts_root: Path) -> list[str]:
    """Every place in the experiment's params, tags and text artifacts (logged model files
    included) that holds the API key, a path of this checkout / virtual environment / home
    folder, or the artifacts root outside `ROOT_ALLOWED`."""
    repo = Path(__file__).resolve().parents[1]
    local = [str(repo), sys.prefix, str(Path.home()) + "/"]
    found = []

    def check(where: str, text: str, root_ok: bool) -> None:
        if SECRET in text:
            found.append(f"{where}: the teacher API key")
        for path in local:
            if path in text:
                found.append(f"{where}: {path}")
        if not root_ok and str(artifacts_root) in text:
            found.append(f"{where}: the artifacts root {artifacts_root}")

    runs = client.search_runs([experiment_id], max_results=1000)
    assert runs
    for run in runs:
        name = f"run {run.info.run_name} ({run.info.run_id[:8]})"
        for kind, values in (("param", run.data.params), ("tag", run.data.tags)):
            for key, value in values.items():
                root_ok = key in ("artifacts_root", "gr2.command") or (
                    key.startswith("gr2.stage.") and key.endswith(".dir")
                )
                check(f"{name} {kind} {key}", value, root_ok)
    # every file under the experiment's artifact location: runs' artifacts and logged models
    location = Path(client.get_experiment(experiment_id).artifact_location.removeprefix("file://"))
    for path in sorted(location.rglob("*")):
        if path.is_file() and (path.suffix in TEXT or path.name == "MLmodel"):
            rel = path.relative_to(location)
            text = path.read_text(errors="replace")
            if path.name == "MLmodel":  # MLflow records where a models-from-code file was
                # (`model_code_path`, resolved to an absolute path by MLflow itself, never read
                # back: it loads its own copy by file name); every other field is checked
                text = re.sub(r"(?m)^\s*model_code_path: .*$", "", text)
            check(f"artifact {rel}", text, path.name in ROOT_ALLOWED or path.suffix == ".log")
    return found


def _complete_dirs(root: Path, stage: str) -> list[Path]:
    base = root / stage
    return [p for p in base.iterdir() if not p.name.endswith(".partial")] if base.exists() else []


def test_pipeline_tracks_caches_and_reruns_only_what_changed(
    prefect_harness, ci_config, monkeypatch, capsys
):
    # the full pipeline, with the pipeline's own vLLM teacher server (targeted traces only)
    # and DAPO from the SFT-targeted student; the teacher's API key is set (the local server
    # takes any) so that the run can be searched for it afterwards
    monkeypatch.setenv(ci_config.teacher.api_key_env, SECRET)
    ci_config = ci_config.model_copy(
        update={
            # two slates (one a shard): the teacher's stepwise decoding is this test's longest step
            "teacher": ci_config.teacher.model_copy(update={"modes": ["targeted"], "slates": 2}),
            "rl": ci_config.rl.model_copy(update={"variants": ["targeted"]}),
        }
    )
    state, flow_run_id, states = _run(ci_config)
    assert state.is_completed(), state.message
    assert {states[s] for s in STAGES + TEACHER_STAGES} == {"Completed"}
    assert {states["targeted-shard"]} == {"Completed"}
    result = state.result()  # the stages' manifests, in flow order, and the MLflow run
    assert list(result.stages) == STAGES + TEACHER_STAGES
    tables = report.pipeline_report(ci_config, result)
    assert "| preranker |" in tables.baselines

    # every stage folder is complete: manifest present, files hashed
    root = Path(ci_config.artifacts_root)
    for stage in STAGES + TEACHER_STAGES:
        (folder,) = _complete_dirs(root, stage)
        assert (folder / "manifest.json").exists()

    # MLflow: parent run tagged with the flow run, one FINISHED child per stage
    client = MlflowClient(ci_config.tracking.tracking_uri)
    exp = client.get_experiment_by_name("gr2-reranker")
    parent = client.get_run(result.mlflow_run_id)
    assert parent.data.tags["prefect.flow_run_id"] == flow_run_id
    assert parent.info.status == "FINISHED"
    children = client.search_runs(
        [exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    expected = STAGES + TEACHER_STAGES + ["register"]
    assert sorted(c.data.tags["gr2.stage"] for c in children) == sorted(expected)
    by_stage = {c.data.tags["gr2.stage"]: c for c in children}
    assert all(c.info.status == "FINISHED" for c in children)
    assert by_stage["data"].inputs.dataset_inputs, "input datasets logged with mlflow.data"
    assert by_stage["semantic_ids"].data.metrics["semantic_ids/uniqueness"] == 1.0
    assert by_stage["preranker"].data.params["epochs"] == str(ci_config.preranker.epochs)
    assert parent.data.params["preranker.epochs"] == str(ci_config.preranker.epochs)
    assert by_stage["preranker"].data.metrics["preranker/train_loss"] > 0
    base_metrics = by_stage["baselines"].data.metrics
    r5 = base_metrics["baselines/test/preranker.conditional.recall_at_5"]
    assert 0 <= r5 <= 1
    assert np.isfinite(base_metrics["baselines/valid/random.end_to_end.ndcg_at_10"])
    # mid-training: the Trainer's curves reached the stage run (MLFLOW_RUN_ID), model logged
    mid = by_stage["midtrain"]
    steps = ci_config.midtrain.max_steps
    assert len(client.get_metric_history(mid.info.run_id, "loss")) == steps
    assert len(client.get_metric_history(mid.info.run_id, "eval_sequential_loss")) == 2
    assert "model" in {a.path for a in client.list_artifacts(mid.info.run_id)}
    mid_eval = by_stage["midtrain_eval"].data.metrics
    assert mid_eval["midtrain_eval/test/invalid_rate"] == 0
    assert mid_eval["midtrain_eval/test/duplicate_rate"] == 0
    assert 0 <= mid_eval["midtrain_eval/test/student.recall_at_10"] <= 1

    # teacher traces: every attempt written, statistics in MLflow and the Prefect table
    traces = by_stage["traces"].data.metrics
    assert traces["traces/targeted/slates"] == ci_config.teacher.slates
    assert traces["traces/targeted/accepted_slates"] >= 1
    (traces_dir,) = _complete_dirs(root, "traces")
    attempts = pl.read_parquet(traces_dir / "targeted_attempts.parquet")
    assert attempts.height == traces["traces/targeted/attempts"]
    assert not (traces_dir / "teacher_model").exists(), "the exported teacher is scratch"
    assert "teacher_server.log" in {
        a.path for a in client.list_artifacts(by_stage["traces"].info.run_id)
    }
    # SFT: the Trainer's loss reached the stage run; the reranker was evaluated
    sft_run = by_stage["sft_targeted"]
    assert len(client.get_metric_history(sft_run.info.run_id, "loss")) == ci_config.sft.max_steps
    sft_eval = by_stage["sft_eval_targeted"].data.metrics
    assert 0 <= sft_eval["sft_eval_targeted/test/sft-targeted.invalid_rate"] <= 1
    assert sft_eval["sft_eval_targeted/test/preranker.identity_rate"] == 1
    assert "| sft-targeted |" in tables.rerankers
    # DAPO: TRL's metrics and our monitors reached the stage run; rollouts and curves logged
    rl_run = by_stage["rl_targeted"]
    rollout_batches = ci_config.rl.max_steps // ci_config.rl.steps_per_rollout
    for key in (
        "reward",
        "monitor/identity_rate",
        "monitor/top1_demoted_rate",
        "monitor/forced_token_share",  # constrained rollouts: forced tokens out of the loss
        "dynamic/zero_std_before",
    ):
        assert len(client.get_metric_history(rl_run.info.run_id, key)) == rollout_batches, key
    clip = client.get_metric_history(rl_run.info.run_id, "clip_ratio/region_mean")
    assert len(clip) == ci_config.rl.max_steps  # every optimizer step
    assert {"completions.jsonl", "curves.png"} <= {
        a.path for a in client.list_artifacts(rl_run.info.run_id)
    }
    rl_eval = by_stage["rl_eval_targeted"].data.metrics
    assert 0 <= rl_eval["rl_eval_targeted/test/rl-targeted.invalid_rate"] <= 1
    # the run's most trained reranker is registered (pyfunc in the register run) and decided on
    uri = ci_config.tracking.tracking_uri
    registry = MlflowClient(tracking_uri=uri, registry_uri=uri)
    (version,) = registry.search_model_versions("name = 'gr2-reranker'")
    assert version.tags["gr2.variant"] == "rl_targeted"
    assert version.run_id == by_stage["register"].info.run_id
    assert version.tags["gr2.promotion.decision"] in ("promoted", "refused")

    # nothing leaked: the API key nowhere in MLflow, no path of this checkout, its virtual
    # environments or the home folder (they would not exist on another machine); the configured
    # artifacts root appears only where the run records where its outputs are
    leaks = _leaks(client, exp.experiment_id, root)
    assert not leaks, "\n".join(leaks[:20])

    # the report writer: docs sections and wall times from the finished run's manifests
    docs = root.parent / "docs"
    docs.mkdir()
    cmd = "gr2 run --profile ci"
    written = report.write_docs(
        ci_config, result, tables, cmd, str(docs / "results.md"), rl_doc=str(docs / "rl.md")
    )
    assert len(written) == 3
    results_md = (docs / "results.md").read_text()
    assert "## Baselines, ml-100k (profile ci)" in results_md and cmd in results_md
    assert "| sft-targeted |" in results_md and "timings.md" in results_md
    assert (docs / "img" / "rl_ml-100k_ci.png").exists()
    report.write_timings(result, cmd, path=str(docs / "timings.md"))
    timings = (docs / "timings.md").read_text()
    assert "## gr2-pipeline, profile ci" in timings
    assert "| preranker |" in timings and "reused" not in timings  # all computed by this run
    # ... and the same, read back from MLflow alone (`gr2 report`)
    again, logged = report.read_run(result.tracking_uri, result.mlflow_run_id)
    assert again.stages == result.stages and logged["profile"] == ci_config.profile
    rewritten = docs / "again.md"
    assert (
        cli(
            ["report", "--profile", "ci", "--run-id", result.mlflow_run_id]
            + ["--tracking-uri", result.tracking_uri, "--doc", str(rewritten)]
        )
        == 0
    )
    assert rewritten.read_text() == results_md  # the same sections, without rerunning

    # same config again: every stage is a cache hit (no server is started)
    (midtrain_dir,) = _complete_dirs(root, "midtrain")
    state2, _, states2 = _run(ci_config)
    assert state2.is_completed()
    assert {states2[s] for s in STAGES + TEACHER_STAGES} == {"Cached"}, states2
    assert len(registry.search_model_versions("name = 'gr2-reranker'")) == 1, "registered once"
    for _ in range(2):  # the second write replaces the first
        report.write_timings(state2.result(), cmd, path=str(docs / "timings.md"))
    timings = (docs / "timings.md").read_text()
    rerun = "## gr2-pipeline, profile ci, every stage from the cache\n"
    assert timings.count(rerun) == 1  # beside the cold run's section, which stays
    assert timings.count("## gr2-pipeline, profile ci\n") == 1
    assert "(0 of " in timings and "| traces |" in timings and "reused from the cache" in timings

    # an output deleted behind Prefect's back: its cache record now points at nothing; `gr2 run`
    # says so and runs again without the cache records, computing only what is missing
    (baselines_dir,) = _complete_dirs(root, "baselines")
    shutil.rmtree(baselines_dir)
    same = root.parent / "same.yaml"
    same.write_text(yaml.safe_dump(ci_config.model_dump(mode="json")))
    capsys.readouterr()
    assert cli(["run", "--config", str(same)]) == 0
    err = capsys.readouterr().err
    assert "running again without Prefect's cache records" in err
    assert (baselines_dir / "manifest.json").exists()
    assert _complete_dirs(root, "midtrain") == [midtrain_dir]  # the rest reused

    # only the pre-ranker changes: data and split stay cached, the rest re-runs (no teacher)
    changed = ci_config.model_copy(
        update={
            "preranker": ci_config.preranker.model_copy(update={"epochs": 1}),
            "teacher": ci_config.teacher.model_copy(update={"modes": []}),
            "rl": ci_config.rl.model_copy(update={"variants": []}),
        }
    )
    state3, _, states3 = _run(changed)
    assert state3.is_completed()
    assert states3["data"] == "Cached" and states3["split"] == "Cached"
    # the SIDs do not depend on the pre-ranker (without collaborative embeddings)
    assert states3["embeddings"] == "Cached" and states3["semantic_ids"] == "Cached"
    assert states3["student"] == "Cached" and states3["midtrain"] == "Cached"
    rerun = ("preranker", "candidates", "baselines", "midtrain_eval")
    assert {states3[s] for s in rerun} == {"Completed"}, states3
    assert len(_complete_dirs(root, "data")) == 1 and len(_complete_dirs(root, "preranker")) == 2


def _synthetic(tmp_path: Path, n_users: int = 30, n_items: int = 40, per_user: int = 12):
    rng = np.random.default_rng(0)
    items = write_csv(
        tmp_path / "items.csv",
        "item_id,title,year,categories",
        [f"i{j},Item {j},{1990 + j % 30},Drama|Comedy" for j in range(n_items)],
    )
    rows = []
    for u in range(n_users):
        for t, j in enumerate(rng.choice(n_items, size=per_user, replace=False)):
            rows.append(f"u{u},i{j},{1000 + t}")
    inter = write_csv(tmp_path / "interactions.csv", "user_id,item_id,timestamp", rows)
    return inter, items, rows


def test_bad_input_fails_cleanly_then_recovers(prefect_harness, ci_config, tmp_path):
    inter, items, rows = _synthetic(tmp_path)
    write_csv(inter, "user_id,item_id,timestamp", rows[:5] + ["u0,i1,not-a-time"] + rows[6:])
    config = ci_config.model_copy(
        update={
            "data": ci_config.data.model_copy(
                update={
                    "dataset": "custom",
                    "interactions_path": str(inter),
                    "items_path": str(items),
                    "max_users": None,
                    "min_item_interactions": 2,
                }
            )
        }
    )
    state, _, states = _run(config)
    assert state.is_failed()
    message = str(state.result(raise_on_failure=False))
    assert "interactions.csv" in message and "timestamp" in message and "line" in message
    root = Path(config.artifacts_root)
    assert _complete_dirs(root, "data") == [], "no stage output may look complete after a failure"
    client = MlflowClient(config.tracking.tracking_uri)
    exp = client.get_experiment_by_name("gr2-reranker")
    failed = client.search_runs([exp.experiment_id], "attributes.status = 'FAILED'")
    assert {r.data.tags.get("gr2.stage", "parent") for r in failed} >= {"data", "parent"}

    write_csv(inter, "user_id,item_id,timestamp", rows)  # fixed
    state2, _, states2 = _run(config)
    assert state2.is_completed(), state2.message
    assert len(_complete_dirs(root, "baselines")) == 1


def test_retraining_keeps_existing_sids(prefect_harness, ci_config):
    """More users (so more items), tokenizer frozen via `semantic_ids.base`: old SIDs unchanged."""
    import polars as pl

    state, _, _ = _run(ci_config)
    assert state.is_completed(), state.message
    root = Path(ci_config.artifacts_root)
    (first,) = _complete_dirs(root, "semantic_ids")
    old = pl.read_parquet(first / "sid_map.parquet")

    grown = ci_config.model_copy(
        update={
            "data": ci_config.data.model_copy(update={"max_users": 200}),
            "semantic_ids": ci_config.semantic_ids.model_copy(update={"base": str(first)}),
            "embeddings": ci_config.embeddings.model_copy(update={"with_collaborative": True}),
        }
    )
    # with_collaborative changes the embedding width, which a frozen tokenizer must refuse
    state_bad, _, _ = _run(grown)
    assert state_bad.is_failed()
    assert "dimension" in str(state_bad.result(raise_on_failure=False))

    grown = grown.model_copy(update={"embeddings": ci_config.embeddings})
    state2, _, states2 = _run(grown)
    assert state2.is_completed(), state2.message
    new_dir = next(p for p in _complete_dirs(root, "semantic_ids") if p != first)
    new = pl.read_parquet(new_dir / "sid_map.parquet")
    assert new.height > old.height and new["sid"].n_unique() == new.height
    joined = old.join(new, on="item_id", suffix="_new")
    assert joined.height == old.height
    assert (joined["sid"] == joined["sid_new"]).all()
