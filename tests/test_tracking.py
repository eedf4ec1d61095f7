"""MLflow's process-wide state around a stage: what a stage sets, it takes back."""

import os

import pytest

from tasks.tracking import Tracking, mlflow_env


@pytest.fixture
def clean_uri(monkeypatch):
    import mlflow

    mlflow.set_tracking_uri(None)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield mlflow
    mlflow.set_tracking_uri(None)


def test_a_stage_unpins_a_uri_that_came_from_the_environment(clean_uri, monkeypatch, tmp_path):
    mlflow = clean_uri
    env, stage, later = (f"sqlite:///{tmp_path / n}.db" for n in ("env", "stage", "later"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env)
    with mlflow_env(Tracking(tracking_uri=stage, experiment_id=""), "run-1"):
        assert mlflow.get_tracking_uri() == stage
        assert os.environ["MLFLOW_RUN_ID"] == "run-1"
    assert mlflow.get_tracking_uri() == env
    assert "MLFLOW_RUN_ID" not in os.environ
    # the variable counts again (a worker process serves runs of several tracking servers)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", later)
    assert mlflow.get_tracking_uri() == later


def test_a_stage_keeps_a_uri_that_other_code_set(clean_uri, tmp_path):
    mlflow = clean_uri
    mine, stage = (f"sqlite:///{tmp_path / n}.db" for n in ("mine", "stage"))
    mlflow.set_tracking_uri(mine)
    with mlflow_env(Tracking(tracking_uri=stage, experiment_id=""), "run-1"):
        assert mlflow.get_tracking_uri() == stage
    assert mlflow.get_tracking_uri() == mine


def test_logged_text_names_no_local_folder_and_keeps_sibling_virtualenvs_apart(monkeypatch):
    """A virtualenv inside the checkout (`.venv`, as `make install` makes it) must not turn the
    teacher's `.venv-vllm` into `<python>-vllm`: the checkout's placeholder covers both."""
    import sys
    from pathlib import Path

    from tasks.store import PROJECT_ROOT
    from tasks.tracking import portable_text

    root = Path(PROJECT_ROOT).resolve()
    monkeypatch.setattr(sys, "prefix", str(root / ".venv"))
    monkeypatch.setattr(sys, "base_prefix", "/opt/python3.11")
    text = (
        f"{root}/.venv-vllm/bin/python -m vllm ... {root}/.venv/bin/python "
        f"/opt/python3.11/lib/python3.11/os.py {Path.home()}/.cache/huggingface"
    )
    assert portable_text(text) == (
        "<gr2>/.venv-vllm/bin/python -m vllm ... <gr2>/.venv/bin/python "
        "<python>/lib/python3.11/os.py ~/.cache/huggingface"
    )
