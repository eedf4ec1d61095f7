"""MLflow tracking for flows and stages, through `MlflowClient` and explicit run ids only.

Prefect runs tasks in worker threads and MLflow's active run is thread-local, so nothing here
uses `mlflow.start_run`: the flow creates a parent run, each stage creates a child run (tag
`mlflow.parentRunId`) and logs to it by id. Trainers that log by themselves attach through
`MLFLOW_RUN_ID`. Metric keys read `stage/split/metric@k`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import polars as pl
from mlflow.data.polars_dataset import from_polars
from mlflow.entities import DatasetInput, InputTag, Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from pydantic import BaseModel

from data_contracts.config import PipelineConfig, StageConfig
from data_contracts.ctc import FlowConfig

CACHE_NEUTRAL = True  # logging to MLflow: never shapes a stage's output

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


class Tracking(BaseModel):
    """Where a flow run is tracked: passed to tasks (and excluded from their cache keys)."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str | None = None


def resolve_uri(cfg: FlowConfig) -> str:
    """Config value, else $MLFLOW_TRACKING_URI, else SQLite beside the artifacts root."""
    if cfg.tracking.tracking_uri:
        return cfg.tracking.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    base = Path(cfg.artifacts_root).resolve().parent
    base.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{base / 'mlflow.db'}"


def ensure_experiment(client: MlflowClient, name: str, artifacts_base: Path) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if not client.tracking_uri.startswith(("http://", "https://", "databricks")):
        location = (artifacts_base / "mlartifacts").resolve().as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # another run created it meanwhile
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def start_parent(cfg: FlowConfig, flow_name: str, flow_run_id: str | None) -> Tracking:
    """Create the flow's parent run with its config; returns what tasks need to attach."""
    uri = resolve_uri(cfg)
    client = MlflowClient(uri)
    exp_id = ensure_experiment(
        client, cfg.tracking.experiment, Path(cfg.artifacts_root).resolve().parent
    )
    tags = {
        "gr2.flow": flow_name,
        "gr2.profile": cfg.profile,
        "prefect.flow_run_id": flow_run_id or "none",
        "mlflow.source.git.commit": git_commit(),
        "gr2.host_cpus": str(os.cpu_count()),  # for the timings page
    }
    run = client.create_run(exp_id, run_name=f"{flow_name}-{cfg.profile}", tags=tags)
    log_config(client, run.info.run_id, cfg)
    return Tracking(tracking_uri=uri, experiment_id=exp_id, parent_run_id=run.info.run_id)


def finish_parent(
    tracking: Tracking, status: str = "FINISHED", tags: Mapping[str, str] | None = None
) -> None:
    client = MlflowClient(tracking.tracking_uri)
    if tracking.parent_run_id:
        for k, v in (tags or {}).items():
            client.set_tag(tracking.parent_run_id, k, v)
        client.set_terminated(tracking.parent_run_id, status)


def flatten(obj: Mapping, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in obj.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out |= flatten(v, f"{key}.")
        else:
            out[key] = json.dumps(v) if isinstance(v, list | dict) else str(v)
    return out


def log_config(client: MlflowClient, run_id: str, cfg: StageConfig) -> None:
    """Flattened params plus the resolved config as a JSON artifact."""
    params = [Param(k, v[:6000]) for k, v in flatten(cfg.model_dump(mode="json")).items()]
    for i in range(0, len(params), 100):
        client.log_batch(run_id, params=params[i : i + 100])
    client.log_dict(run_id, cfg.model_dump(mode="json"), "config.json")


def metric_key(name: str) -> str:
    """MLflow allows no '@' in metric names: `test/recall@5` is logged as `test/recall_at_5`."""
    return name.replace("@", "_at_")


def local_paths() -> dict[str, str]:
    """This machine's folders that mean nothing elsewhere, longest first, with the placeholder
    that replaces each in logged text: the checkout (its virtual environments with it), the
    Python installation, the home folder. A Python installation inside the checkout (its
    `.venv`) is left to the checkout's placeholder: replaced first, as the longer path, it would
    also rewrite the start of a sibling such as `.venv-vllm`."""
    from tasks.store import PROJECT_ROOT

    root = Path(PROJECT_ROOT).resolve()
    paths = {str(root): "<gr2>", str(Path.home()): "~"}
    for prefix in {Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve()}:
        if not prefix.is_relative_to(root):
            paths[str(prefix)] = "<python>"
    return dict(sorted(paths.items(), key=lambda kv: -len(kv[0])))


def portable_text(text: str) -> str:
    """`text` with `local_paths` replaced by their placeholders."""
    for path, placeholder in local_paths().items():
        if path not in ("/", ""):
            text = text.replace(path, placeholder)
    return text


class StageRun:
    """A stage's MLflow child run, logged to by id."""

    def __init__(self, client: MlflowClient, run_id: str, stage: str):
        self.client, self.run_id, self.stage = client, run_id, stage

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        import time

        ts = int(time.time() * 1000)
        batch = [
            Metric(metric_key(f"{self.stage}/{k}"), float(v), ts, step or 0)
            for k, v in metrics.items()
        ]
        for i in range(0, len(batch), 500):
            self.client.log_batch(self.run_id, metrics=batch[i : i + 500])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Log a file or folder; a `.log` file (a server's output) goes with this machine's
        paths replaced by placeholders (`portable_text`)."""
        if path.is_file() and path.suffix == ".log":
            with tempfile.TemporaryDirectory() as tmp:
                copy = Path(tmp) / path.name
                copy.write_text(portable_text(path.read_text(errors="replace")))
                self.client.log_artifact(self.run_id, str(copy), artifact_path)
            return
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)

    def log_dataset(self, df: pl.DataFrame, name: str, source: str, context: str) -> None:
        """Record an input table (schema, digest, source) under the run's Datasets."""
        ds = from_polars(df, source=source, name=name)
        tag = InputTag(key="mlflow.data.context", value=context)
        self.client.log_inputs(self.run_id, datasets=[DatasetInput(ds._to_mlflow_entity(), [tag])])

    def log_table(self, df: pl.DataFrame, name: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            df.write_csv(path) if name.endswith(".csv") else df.write_parquet(path)
            self.log_artifact(path)


@contextmanager
def stage_run(tracking: Tracking, stage: str, key: str, config: StageConfig) -> Iterator[StageRun]:
    """A child run for one stage execution; FAILED if the body raises."""
    client = MlflowClient(tracking.tracking_uri)
    tags = {"gr2.stage": stage, "gr2.stage_key": key}
    if tracking.parent_run_id:
        tags["mlflow.parentRunId"] = tracking.parent_run_id
    run = client.create_run(tracking.experiment_id, run_name=stage, tags=tags)
    run_id = run.info.run_id
    log_config(client, run_id, config)
    try:
        yield StageRun(client, run_id, stage)
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")


def start_tracking_run(cfg: FlowConfig, flow_name: str) -> Tracking:
    """The flow's parent run, tagged with the current Prefect flow-run id."""
    from prefect.runtime import flow_run

    return start_parent(cfg, flow_name, flow_run.id)


def fail_parent_hook_for(config_cls: type[StageConfig]):
    """A flow on_failure/on_crashed hook that marks the flow's parent MLflow run FAILED; the
    flow's `config` parameter is parsed as `config_cls`."""

    def hook(flow, flow_run, state) -> None:  # noqa: ANN001 - Prefect hook signature
        raw = flow_run.parameters.get("config") or {}
        cfg = raw if isinstance(raw, config_cls) else config_cls.model_validate(raw)
        uri = resolve_uri(cfg)
        client = MlflowClient(uri)
        try:
            exp = client.get_experiment_by_name(cfg.tracking.experiment)
            if exp is None:
                return
            query = (
                f"tags.`prefect.flow_run_id` = '{flow_run.id}' and attributes.status = 'RUNNING'"
            )
            for run in client.search_runs([exp.experiment_id], filter_string=query):
                client.set_terminated(run.info.run_id, "FAILED")
        except MlflowException as err:  # the tracking server is what failed: say so, briefly
            from prefect.logging import get_logger

            get_logger("gr2").warning(
                "could not mark the run FAILED in MLflow at %s: %s", uri, str(err)[:200]
            )

    return hook


fail_parent_hook = fail_parent_hook_for(PipelineConfig)


@contextmanager
def pinned_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (`mlflow.start_run`, `log_model`, `load_model`, transformers'
    callback) at `uri` for the block: it prefers a URI set in-process, by any other code, over
    the environment. On exit the process is as before: a URI that other code had set stays set,
    and one that came from MLFLOW_TRACKING_URI (or MLflow's default) is unpinned again, so a
    later change of the variable counts."""
    import mlflow

    env_before = os.environ.get("MLFLOW_TRACKING_URI")
    previous = mlflow.get_tracking_uri()
    # `set_tracking_uri` also writes the variable: a URI set in-process and still in force
    # differs from the variable only if the variable changed since; equal values resolve alike
    explicit = env_before is not None and previous != env_before
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous if explicit else None)  # None clears the variable too
        if env_before is not None:
            os.environ["MLFLOW_TRACKING_URI"] = env_before


@contextmanager
def mlflow_env(tracking: Tracking, run_id: str) -> Iterator[None]:
    """Let transformers' MLflow callback attach to the stage run (MLFLOW_RUN_ID)."""
    values = {
        "MLFLOW_TRACKING_URI": tracking.tracking_uri,
        "MLFLOW_RUN_ID": run_id,
        "MLFLOW_MAX_LOG_PARAMS": "0",  # the stage run already holds the config as params
    }
    with pinned_tracking_uri(tracking.tracking_uri):
        old = {k: os.environ.get(k) for k in values}
        os.environ.update(values)
        try:
            yield
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
