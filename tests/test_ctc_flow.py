"""The CTC summarization flow on real ACLSum, side by side with the reranker pipeline."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from data_contracts.ctc import load_ctc_profile
from flows.ctc_summarization import ctc_summarization
from flows.gr2_pipeline import gr2_pipeline
from tasks.report import ctc_report

pytestmark = pytest.mark.slow
CTC_STAGES = ["ctc_data", "ctc_train", "ctc_eval"]


@pytest.fixture
def ctc_ci(tmp_path: Path):
    return load_ctc_profile(
        "ci",
        {
            "artifacts_root": str(tmp_path / "ctc-artifacts"),
            "tracking.tracking_uri": f"sqlite:///{tmp_path / 'mlflow-ctc.db'}",
        },
    )


def test_ctc_flow_runs_beside_the_pipeline_and_registers_a_model(
    prefect_harness, ci_config, ctc_ci, monkeypatch, tmp_path
):
    # a URI set in-process by other code must not capture the pipeline's Trainer logging
    other = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    monkeypatch.setattr("mlflow.tracking._tracking_service.utils._tracking_uri", other)
    with ThreadPoolExecutor(2) as pool:
        pipeline = pool.submit(gr2_pipeline, ci_config, return_state=True)
        ctc = pool.submit(ctc_summarization, ctc_ci, return_state=True)
        pipeline_state, ctc_state = pipeline.result(), ctc.result()
    assert pipeline_state.is_completed(), pipeline_state.message
    assert ctc_state.is_completed(), ctc_state.message
    result = ctc_state.result()
    assert result.model_version == "1"
    text = ctc_report(result)
    for system in ("ctc-greedy", "ctc-beam2", "lead-", "llm-zero-shot"):
        assert f"| {system}" in text
    assert "| clean |" in text and "| asr-noise-0.2 |" in text

    client = MlflowClient(ctc_ci.tracking.tracking_uri)
    exp = client.get_experiment_by_name("gr2-ctc")
    children = client.search_runs(
        [exp.experiment_id], f"tags.mlflow.parentRunId = '{result.mlflow_run_id}'"
    )
    by_stage = {c.data.tags["gr2.stage"]: c for c in children}
    assert sorted(by_stage) == sorted(CTC_STAGES)
    train_run = by_stage["ctc_train"].info.run_id
    history = client.get_metric_history(train_run, "ctc_train/valid_loss")
    assert len(history) == ctc_ci.ctc.epochs
    metrics = by_stage["ctc_eval"].data.metrics
    assert 0 <= metrics["ctc_eval/clean/llm-zero-shot/rougeL"] <= 1
    assert metrics["ctc_eval/asr-noise-0.2/ctc-greedy/summaries_per_s"] > 0
    assert {"results.png", "scores.parquet"} <= {
        a.path for a in client.list_artifacts(by_stage["ctc_eval"].info.run_id)
    }
    # the reranker pipeline logged to its own store, untouched by the CTC flow
    pipeline = MlflowClient(ci_config.tracking.tracking_uri)
    pipeline_exp = pipeline.get_experiment_by_name("gr2-reranker")
    (mid,) = pipeline.search_runs([pipeline_exp.experiment_id], "tags.`gr2.stage` = 'midtrain'")
    assert len(pipeline.get_metric_history(mid.info.run_id, "loss")) == ci_config.midtrain.max_steps

    # the registered pyfunc summarizes; malformed input is named
    (version,) = client.search_model_versions("name = 'gr2-ctc-summarizer'")
    assert version.tags["gr2.stage_key"] and version.run_id == train_run
    import mlflow

    monkeypatch.setattr("mlflow.tracking._tracking_service.utils._tracking_uri", None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", ctc_ci.tracking.tracking_uri)
    loaded = mlflow.pyfunc.load_model("models:/gr2-ctc-summarizer/1")
    frame = pd.DataFrame({"document": ["Speech summaries keep the order of the talk ."]})
    out = loaded.predict(frame.assign(aspect="outcome"), params={"length": 4})
    assert list(out.columns) == ["summary"] and len(out) == 1
    with pytest.raises(MlflowException, match="unknown aspect 'nonsense'"):
        loaded.predict(frame.assign(aspect="nonsense"))
    with pytest.raises(MlflowException, match="empty document"):
        loaded.predict(pd.DataFrame({"document": [" "], "aspect": ["outcome"]}))
    folder = Path(client.download_artifacts(train_run, "ctc_summarizer"))
    assert "signature" in (folder / "MLmodel").read_text()
    assert "torch==" in (folder / "requirements.txt").read_text()

    # again: every stage cached, registration idempotent
    state2 = ctc_summarization(ctc_ci, return_state=True)
    assert state2.is_completed() and state2.result().model_version == "1"
    assert len(client.search_model_versions("name = 'gr2-ctc-summarizer'")) == 1


def test_ctc_bad_records_fail_cleanly_then_recover(prefect_harness, ctc_ci, tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [
        {
            "id": f"r{i}",
            "document": f"word{i} alpha beta gamma delta epsilon zeta eta theta",
            "summary": f"word{i} gamma",
            "split": split,
        }
        for i, split in enumerate(["train"] * 6 + ["valid"] * 2 + ["test"] * 2)
    ]
    bad = [*rows[:3], {**rows[3], "document": ""}, *rows[4:]]
    path.write_text("\n".join(json.dumps(r) for r in bad) + "\n")
    config = ctc_ci.model_copy(
        update={
            "data": ctc_ci.data.model_copy(
                update={"source": "jsonl", "jsonl_path": str(path), "max_train_pairs": None}
            )
        }
    )
    state = ctc_summarization(config, return_state=True)
    assert state.is_failed()
    assert "record 'r3': empty document" in str(state.result(raise_on_failure=False))
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    state = ctc_summarization(config, return_state=True)
    assert state.is_completed(), state.message
    # only the evaluation changes: the trained model is reused, not retrained
    changed = config.model_copy(
        update={"evaluation": config.evaluation.model_copy(update={"noise_rates": [0.3]})}
    )
    state = ctc_summarization(changed, return_state=True)
    assert state.is_completed()
    assert "asr-noise-0.3" in ctc_report(state.result())
    train_dirs = [p for p in (Path(config.artifacts_root) / "ctc_train").iterdir()]
    assert len(train_dirs) == 1
