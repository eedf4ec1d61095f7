"""Stages `student` (export + SID vocabulary), `midtrain` (four tasks) and `midtrain_eval`."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

import gr2_core.midtrain as mt
from data_contracts.config import PipelineConfig
from data_contracts.manifest import Manifest, sha256_file
from gr2_core import models, sid_eval
from gr2_core.models import default_student
from tasks.stage import Stage
from tasks.tracking import Tracking, mlflow_env


def _source_fingerprint(config: PipelineConfig) -> dict[str, str]:
    src = config.student.source
    if src is None:
        folder, gguf = default_student()
        return {"gguf": sha256_file(folder / gguf)}
    path = Path(src)
    if path.is_dir():
        weights = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
        return {w.name: str(w.stat().st_size) for w in weights}
    return {"hub_id": src}


STUDENT = Stage("student", lambda c: c.student, __name__, _source_fingerprint, core=models.__name__)
MIDTRAIN = Stage("midtrain", lambda c: c.midtrain, __name__, core=mt.__name__)
EVAL = Stage(
    "midtrain_eval",
    lambda c: c.midtrain,
    __name__,
    lambda c: {"evaluation": c.evaluation.digest()},
    core=sid_eval.__name__,
)


@task(name="student", cache_key_fn=STUDENT.cache_key_fn, persist_result=True)
def student(config: PipelineConfig, semantic_ids: Manifest, tracking: Tracking) -> Manifest:
    """Export the student to a plain safetensors folder with one token per SID code."""
    inputs = models.StudentInputs(Path(semantic_ids.directory))

    def body(out: Path, run):
        return models.run(inputs, config.student, out, get_run_logger())

    return STUDENT.run(config, [semantic_ids], tracking, body)


@task(name="midtrain", cache_key_fn=MIDTRAIN.cache_key_fn, persist_result=True)
def midtrain(
    config: PipelineConfig,
    data: Manifest,
    split: Manifest,
    semantic_ids: Manifest,
    student: Manifest,
    tracking: Tracking,
) -> Manifest:
    """Build the four-task mixture from the training split and mid-train the student."""
    inputs = mt.MidtrainInputs(
        student=student.path("model"),
        sid_levels=student.path("sid_levels"),
        items=data.path("items"),
        users=data.path("users") if "users" in data.files else None,
        sid_map=semantic_ids.path("sid_map"),
        sequences=split.path("sequences"),
    )

    def body(out: Path, run):
        with mlflow_env(tracking, run.run_id):  # the Trainer's curves go to the stage run
            return mt.run(inputs, config.midtrain, out, ("mlflow",), get_run_logger())

    return MIDTRAIN.run(config, [data, split, semantic_ids, student], tracking, body)


@task(name="midtrain_eval", cache_key_fn=EVAL.cache_key_fn, persist_result=True)
def midtrain_eval(
    config: PipelineConfig,
    data: Manifest,
    split: Manifest,
    semantic_ids: Manifest,
    candidates: Manifest,
    midtrain: Manifest,
    tracking: Tracking,
) -> Manifest:
    """Next-item R@K/NDCG@K by constrained beam search vs the pre-ranker; caption accuracy."""
    title = (
        f"Next-item retrieval over the whole catalogue, {config.data.dataset} ({config.profile})"
    )
    inputs = sid_eval.MidtrainEvalInputs(
        model=midtrain.path("model"),
        heldout_items=midtrain.path("heldout_items"),
        items=data.path("items"),
        sid_map=semantic_ids.path("sid_map"),
        sequences=split.path("sequences"),
        slates=candidates.path("slates"),
        title=title,
        bootstrap=config.evaluation,
    )

    def body(out: Path, run):
        return sid_eval.run(inputs, config.midtrain, out, get_run_logger())

    return EVAL.run(config, [data, split, semantic_ids, candidates, midtrain], tracking, body)
