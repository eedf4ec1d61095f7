"""Tasks `register` and `promote`, and rollback: the run's reranker in the MLflow model registry.

`register` packs the candidate model (`registry.candidate`) as a reranker bundle
(`gr2_core.reranker`), logs it as an MLflow pyfunc (`name="reranker"`, explicit pip requirements,
signature, input example) in a `register` child run, records the model's per-slate results on the
frozen evaluation set (the validation slates its evaluation stage scored) as run artifacts, and
registers it as a new version of `registry.model_name` with alias `challenger`. Idempotent: a
version already registered for the same model and evaluation (tag `gr2.registration_key`) is
reused and nothing is logged.

`promote` applies `gr2_core.promotion.decide` to the challenger and the `champion`, on the same
frozen set (a champion scored on another set is re-scored on the challenger's). The decision
reads validation slates only; the test scores are logged beside it (metrics `test/*`, tags
`gr2.test.*`) for reporting: choosing a model never peeks at the numbers reported for it. It
records the decision as version tags and a markdown report; on promotion the old champion becomes
`previous-champion` (and the new version's tag `gr2.previous_champion`), so `rollback` is one
call. A version that already carries a decision is not decided again.

Everything goes through `MlflowClient` with an explicit URI; the two fluent calls that need a
process URI (`log_model`, `load_model`) run with it pinned (`tasks.tracking.mlflow_env`).
"""

from __future__ import annotations

import importlib.metadata
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import polars as pl
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel

import data_contracts
import gr2_core.rerank_eval as rev
from data_contracts.config import PipelineConfig
from data_contracts.ctc import CTCFlowConfig
from data_contracts.manifest import Manifest
from gr2_core.promotion import (
    Decision,
    Gate,
    decide,
    frozen_set_digest,
    job_ids,
    slate_results,
    summarize,
)
from gr2_core.report import method_label
from gr2_core.reranker import RerankSettings, answerable, save_bundle, score_rows
from tasks.inputs import catalogue, read
from tasks.tracking import Tracking, metric_key, mlflow_env, pinned_tracking_uri, stage_run

CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous-champion"
MODEL_NAME = "reranker"  # the logged model's name inside its run
PYFUNC_FILE = Path(__file__).with_name("reranker_pyfunc.py")
RESULTS = "frozen_set/results.parquet"
SLATES = "frozen_set/slates.parquet"


class Registered(BaseModel):
    """A registered reranker version (the `register` task's output)."""

    name: str
    version: str
    run_id: str
    eval_set: str
    created: bool


def client_for(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


# what the pyfunc imports from this repository: the core and the contracts it reads settings with
SERVED_PACKAGES = (Path(rev.__file__).parent, Path(data_contracts.__file__).parent)


def serving_requirements() -> list[str]:
    """Pins of what the pyfunc imports, from this environment (local version suffixes dropped)."""
    names = ["torch", "transformers", "polars", "pandas", "numpy", "scipy", "pydantic"]
    names += ["pyyaml", "pandera"]  # data_contracts: the prompt settings and the table schemas
    return [f"{n}=={importlib.metadata.version(n).split('+')[0]}" for n in names]


FROZEN_SPLIT = "valid"  # promotion decides on validation slates; test is reported only


def frozen_set(config: PipelineConfig, candidates: Manifest, split: str = FROZEN_SPLIT):
    """The evaluation set a registered model is judged on: the validation slates its evaluation
    stage answered by the served method (`sft.scored_slates` for `scored`, else
    `sft.eval_slates`; conditional, drawn with `sft.seed`); `split="test"` gives the reported
    set."""
    cfg = config.sft
    count = cfg.slates_for(cfg.serve_method)
    return rev.eval_slates(read(candidates, "slates"), split, count, cfg.seed)


def served_method(config: PipelineConfig, model: Manifest) -> str:
    """The evaluation row of the method the registered model serves (`sft.serve_method`)."""
    return method_label(model.stage, config.prompt.knowledge, config.sft.serve_method)


def evaluation_results(
    config: PipelineConfig,
    model: Manifest,
    evaluation: Manifest,
    rows: pl.DataFrame,
    cat,
    split: str = FROZEN_SPLIT,
) -> pl.DataFrame:
    """Per-slate results of the served method on `rows` (slates of `split`), from the
    evaluation stage."""
    method = served_method(config, model)
    answers = read(evaluation, "answers").filter(
        (pl.col("split") == split) & (pl.col("method") == method)
    )
    jobs = job_ids(rows)
    text = dict(zip(answers["job"], answers["text"], strict=True))
    missing = [j for j in jobs if j not in text]
    if missing:
        raise ValueError(
            f"evaluation {evaluation.directory} has no '{method}' {split} answer for "
            f"{len(missing)} frozen-set slates (first: {missing[:3]}); was it run with other "
            "sft.eval_slates / sft.scored_slates?"
        )
    scored = rev.score_answers([text[j] for j in jobs], rows, cat)
    return slate_results(jobs, scored["ranks"], scored["invalid"], scored["identity"])


def _signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema
    from mlflow.types.schema import Array

    strings = Array(DataType.string)
    inputs = Schema(
        [
            ColSpec(strings, "history"),
            ColSpec(strings, "candidates"),
            ColSpec(DataType.string, "user_id", required=False),
        ]
    )
    outputs = Schema(
        [
            ColSpec(strings, "recommendations"),
            ColSpec(DataType.string, "explanation"),
            ColSpec(DataType.boolean, "valid"),
            ColSpec(DataType.string, "reason"),
            ColSpec(DataType.double, "seconds"),
        ]
    )
    return ModelSignature(inputs, outputs)


RERANKER_DESCRIPTION = (
    "GR2 generative reasoning reranker: history + candidates in, the candidates reordered with "
    "an explanation out. Aliases: champion (serve this), challenger (latest registered), "
    "previous-champion (rollback target)."
)


def _ensure_model(client: MlflowClient, name: str, description: str = RERANKER_DESCRIPTION):
    try:
        client.create_registered_model(name, description=description)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def find_version(client: MlflowClient, name: str, key: str, tag: str = "gr2.registration_key"):
    """The version of `name` whose tag `tag` equals `key`, or None."""
    for version in client.search_model_versions(f"name = '{name}'"):
        if version.tags.get(tag) == key:
            return version
    return None


@dataclass
class FrozenScores:
    """The model's results on the frozen (validation) set and its test scores, for `register`."""

    rows: pl.DataFrame
    results: pl.DataFrame
    valid: dict[str, float]
    test: dict[str, float]

    def tags(self) -> dict[str, str]:
        return {
            metric_key(f"gr2.{split}.{k}"): f"{v:.4f}"
            for split, scores in (("valid", self.valid), ("test", self.test))
            for k, v in scores.items()
        }

    def metrics(self) -> dict[str, float]:
        return {
            f"{split}/{k}": v
            for split in ("valid", "test")
            for k, v in getattr(self, split).items()
        }

    def __str__(self) -> str:
        v, t = self.valid, self.test
        return (
            f"valid R@5 {v['recall@5']:.3f}, NDCG@5 {v['ndcg@5']:.3f}, invalid "
            f"{v['invalid_rate']:.3f} (test R@5 {t['recall@5']:.3f}, NDCG@5 {t['ndcg@5']:.3f})"
        )


def frozen_scores(config: PipelineConfig, model: Manifest, evaluation: Manifest, candidates, cat):
    """Score the served method's answers (from the evaluation stage) on the frozen validation
    set, and on the test slates for reporting."""
    rows = frozen_set(config, candidates)
    results = evaluation_results(config, model, evaluation, rows, cat)
    test_rows = frozen_set(config, candidates, "test")
    test = summarize(evaluation_results(config, model, evaluation, test_rows, cat, "test"))
    return FrozenScores(rows=rows, results=results, valid=summarize(results), test=test)


def served_settings(config: PipelineConfig, model: Manifest) -> RerankSettings:
    """How the registered bundle prompts and decodes: the settings its evaluation used."""
    return RerankSettings(
        variant=model.stage,
        prompt=config.prompt,
        method=config.sft.serve_method,
        batch_size=config.sft.eval_batch_size,
    )


def registered(version, run_id: str, eval_set: str | None = None) -> Registered:
    """The task's output for `version`; created (in this call) when its `eval_set` is given."""
    return Registered(
        name=version.name,
        version=str(version.version),
        run_id=run_id,
        eval_set=version.tags.get("gr2.eval_set", "") if eval_set is None else eval_set,
        created=eval_set is not None,
    )


def registration_tags(config: PipelineConfig, model, key, semantic_ids, tracking) -> dict[str, str]:
    """What a registered version records of where it comes from."""
    return {
        "gr2.registration_key": key,
        "gr2.variant": model.stage,
        "gr2.profile": config.profile,
        "gr2.dataset": config.data.dataset,
        "gr2.semantic_ids_dir": semantic_ids.directory,
        "gr2.parent_run_id": tracking.parent_run_id or "",
    }


@task(name="register")
def register(
    config: PipelineConfig,
    model: Manifest,
    evaluation: Manifest,
    data: Manifest,
    split: Manifest,
    semantic_ids: Manifest,
    candidates: Manifest,
    tracking: Tracking,
) -> Registered:
    """Register the run's reranker as a new version with alias `challenger` (idempotent)."""
    log = get_run_logger()
    name, key = config.registry.model_name, f"{model.key}:{evaluation.key}"
    client = client_for(tracking.tracking_uri)  # log_and_register creates the model if new
    if (done := find_version(client, name, key)) is not None:
        log.info("register: %s version %s already holds this model", name, done.version)
        return registered(done, done.run_id)
    cat = catalogue(data, semantic_ids)
    scores = frozen_scores(config, model, evaluation, candidates, cat)
    sequences = read(split, "sequences") if config.prompt.cowatch_notes else None
    tags = registration_tags(config, model, key, semantic_ids, tracking) | scores.tags()
    with (
        stage_run(tracking, "register", key, config.registry) as run,
        tempfile.TemporaryDirectory() as tmp,
    ):
        settings = served_settings(config, model)
        bundle = save_bundle(Path(tmp) / "reranker", model.path("model"), cat, settings, sequences)
        run.log_metrics(scores.metrics())
        version = log_and_register(
            tracking.tracking_uri, run.run_id, name, bundle, scores.rows, scores.results, tags
        )
    log.info(
        "register: %s v%s (%s), %s; %s", name, version.version, model.stage, CHALLENGER, scores
    )
    return registered(version, run.run_id, frozen_set_digest(scores.rows))


def log_and_register(
    uri: str,
    run_id: str,
    name: str,
    bundle: Path,
    rows: pl.DataFrame,
    results: pl.DataFrame,
    tags: dict[str, str],
):
    """Log `bundle` as the pyfunc `reranker` of run `run_id` with the frozen set (`rows`) and
    the model's per-slate `results` on it, register it as a new version of `name` and point
    `challenger` at it. Returns the model version."""
    import mlflow
    import pandas as pd

    client = client_for(uri)
    _ensure_model(client, name)
    with tempfile.TemporaryDirectory() as tmp:
        for table, path in ((results, RESULTS), (rows, SLATES)):
            local = Path(tmp) / Path(path).name
            table.write_parquet(local)
            client.log_artifact(run_id, str(local), str(Path(path).parent))
    settings = json.loads((bundle / "settings.json").read_text())
    first = rows.row(0, named=True)
    example = pd.DataFrame(
        {
            "history": [list(first["history"])[-settings["prompt"]["history_items"] :]],
            "candidates": [list(first["candidates"])],
            "user_id": ["new"],
        }
    )
    tags = tags | {"gr2.eval_set": frozen_set_digest(rows), "gr2.eval_slates": str(rows.height)}
    with mlflow_env(Tracking(tracking_uri=uri, experiment_id=""), run_id):
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name=MODEL_NAME,
                python_model=str(PYFUNC_FILE),
                artifacts={"reranker": str(bundle)},
                code_paths=[str(p) for p in SERVED_PACKAGES],
                pip_requirements=serving_requirements(),
                signature=_signature(),
                input_example=example,
            )
        version = client.create_model_version(
            name, info.model_uri, run_id, tags=tags, model_id=info.model_id
        )
    client.set_registered_model_alias(name, CHALLENGER, version.version)
    return version


def gate_of(config: PipelineConfig) -> Gate:
    r = config.registry
    return Gate(
        max_invalid_rate=r.max_invalid_rate,
        max_identity_rate=r.max_identity_rate,
        metrics=tuple(r.metrics),
        margin=r.margin,
        non_inferiority=r.non_inferiority,
        min_slates=r.min_slates,
        samples=r.bootstrap_samples,
        confidence=r.confidence,
        seed=r.seed,
    )


def _download_table(client: MlflowClient, run_id: str, path: str) -> pl.DataFrame:
    with tempfile.TemporaryDirectory() as tmp:
        return pl.read_parquet(client.download_artifacts(run_id, path, tmp))


def alias_version(client: MlflowClient, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def champion_results(
    client: MlflowClient, uri: str, champion, challenger, log
) -> tuple[pl.DataFrame, str]:
    """The champion's per-slate results on the challenger's frozen set, and a note. A champion
    evaluated on another set is re-scored through its pyfunc on the slates it can answer (a
    slate with an item added since it was trained cannot be); the results are logged to the
    challenger's run."""
    if champion.tags.get("gr2.eval_set") == challenger.tags.get("gr2.eval_set"):
        return _download_table(client, champion.run_id, RESULTS), ""
    import mlflow

    rows = _download_table(client, challenger.run_id, SLATES)
    with pinned_tracking_uri(uri):
        loaded = mlflow.pyfunc.load_model(f"models:/{champion.name}/{champion.version}")
    reranker = loaded.unwrap_python_model().reranker
    keep = answerable(rows, reranker.cat.sid, reranker.settings.prompt.history_items)
    note = (
        f"champion version {champion.version} was evaluated on another set: re-scored on "
        f"{sum(keep)} of the {rows.height} frozen-set slates"
    )
    if not all(keep):
        note += f" ({rows.height - sum(keep)} hold items it does not know)"
    log.info("promote: %s", note)
    results = score_rows(reranker, rows.filter(pl.Series(keep))) if any(keep) else None
    if results is not None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"champion_v{champion.version}.parquet"
            results.write_parquet(path)
            client.log_artifact(challenger.run_id, str(path), "frozen_set")
    return results, note


def promote_version(
    uri: str, name: str, version: str, gate: Gate, log
) -> tuple[Decision | None, str]:
    """Decide on `version` against the champion; move aliases and tag the decision. Returns
    (decision, markdown); (None, why) when there is nothing to do."""
    client = client_for(uri)
    mv = client.get_model_version(name, version)
    if (done := mv.tags.get("gr2.promotion.decision")) is not None:
        return None, f"version {version} was already decided ({done}); nothing to do"
    champion = alias_version(client, name, CHAMPION)
    if champion is not None and champion.version == mv.version:
        return None, f"version {version} is already the champion; nothing to do"
    challenger = _download_table(client, mv.run_id, RESULTS)
    theirs, note = None, ""
    if champion is not None:
        theirs, note = champion_results(client, uri, champion, mv, log)
        if theirs is None:
            note += "; nothing to compare, the rate limits alone decide"
        else:
            challenger = challenger.filter(pl.col("job").is_in(theirs["job"].implode()))
    decision = decide(challenger, theirs, gate)
    if note:
        decision.reasons.insert(0, note)
    against = "none" if champion is None else str(champion.version)
    title = f"Promotion of {name} version {version} against champion {against}"
    report = decision.markdown(title)
    tags = {
        "gr2.promotion.decision": "promoted" if decision.promote else "refused",
        "gr2.promotion.against": against,
        "gr2.promotion.reasons": "; ".join(decision.reasons)[:4900],
        "gr2.promotion.time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if decision.promote:
        if champion is not None:
            client.set_registered_model_alias(name, PREVIOUS, champion.version)
            tags["gr2.previous_champion"] = str(champion.version)
        client.set_registered_model_alias(name, CHAMPION, mv.version)
    for k, v in tags.items():
        client.set_model_version_tag(name, mv.version, k, v)
    client.log_text(mv.run_id, report, "promotion.md")
    return decision, report


@task(name="promote")
def promote(config: PipelineConfig, registered: Registered, tracking: Tracking) -> str:
    """Challenger vs champion on the frozen set; moves `champion` only if not worse."""
    log = get_run_logger()
    decision, report = promote_version(
        tracking.tracking_uri, registered.name, registered.version, gate_of(config), log
    )
    if decision is None:
        log.info("promote: %s", report)
        return report
    create_markdown_artifact(
        report,
        key="gr2-promotion",
        description=f"Promotion decision for {registered.name} version {registered.version}",
    )
    log.info("promote:\n%s", report)
    return report


def rollback(uri: str, name: str) -> tuple[str, str]:
    """Point `champion` back at `previous-champion`; the version before that (if recorded)
    becomes the new `previous-champion`. Returns (from version, to version)."""
    client = client_for(uri)
    current = alias_version(client, name, CHAMPION)
    previous = alias_version(client, name, PREVIOUS)
    if current is None or previous is None:
        raise RuntimeError(
            f"{name}: nothing to roll back to (champion: "
            f"{current.version if current else 'none'}, {PREVIOUS}: "
            f"{previous.version if previous else 'none'})"
        )
    client.set_registered_model_alias(name, CHAMPION, previous.version)
    older = previous.tags.get("gr2.previous_champion")
    if older:
        client.set_registered_model_alias(name, PREVIOUS, older)
    else:
        client.delete_registered_model_alias(name, PREVIOUS)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    client.set_model_version_tag(name, current.version, "gr2.rolled_back", stamp)
    client.set_model_version_tag(name, previous.version, "gr2.restored", stamp)
    return str(current.version), str(previous.version)


# --- the CTC summarizer ---

CTC_PYFUNC_FILE = Path(__file__).with_name("ctc_pyfunc.py")
CTC_ARTIFACT = "ctc_summarizer"
CTC_SERVING_REQUIREMENTS = ["torch==2.13.0", "transformers==5.24.0", "numpy>=2,<3", "tqdm>=4.66"]


CTC_DESCRIPTION = "GR2 CTC summarizer (order-preserving, non-autoregressive)"
CTC_EXAMPLE = (
    "We propose a new method for summarizing spoken lectures . Experiments show that it keeps "
    "the order of the source and improves ROUGE over strong baselines ."
)


def save_ctc_pyfunc(model_dir: Path, local: Path) -> None:
    """Save the summarizer in `model_dir` as an MLflow pyfunc model folder `local`, with a
    signature and an input example from the model's own output."""
    import mlflow
    import pandas as pd
    from mlflow.models import infer_signature

    import gr2_core
    from gr2_core.summarization.ctc import Summarizer

    summarizer = Summarizer.load(model_dir)
    aspect = summarizer.spec.conditions[-1]
    example = pd.DataFrame({"document": [CTC_EXAMPLE], "aspect": [aspect]})
    output = pd.DataFrame({"summary": summarizer.summarize([CTC_EXAMPLE], [aspect])})
    mlflow.pyfunc.save_model(
        path=str(local),
        python_model=str(CTC_PYFUNC_FILE),
        artifacts={"summarizer": str(model_dir)},
        code_paths=[str(Path(gr2_core.__file__).parent)],
        pip_requirements=CTC_SERVING_REQUIREMENTS,
        signature=infer_signature(example, output, {"method": "greedy", "length": 0, "beam": 8}),
        input_example=example,
    )


@task(name="ctc_register")
def ctc_register(config: CTCFlowConfig, model: Manifest, tracking: Tracking) -> str:
    """Save the trained summarizer as an MLflow pyfunc model, log it to its training run and
    register it under `config.registered_model`. Idempotent: a version already registered for
    this training output (tag `gr2.stage_key`) is returned as is. Returns the version number.

    Only `MlflowClient` calls with an explicit URI: no process-wide tracking URI is set, so a
    pipeline running beside this flow keeps logging where it should."""
    log = get_run_logger()
    client, name = client_for(tracking.tracking_uri), config.registered_model
    _ensure_model(client, name, CTC_DESCRIPTION)
    if (done := find_version(client, name, model.key, tag="gr2.stage_key")) is not None:
        log.info("ctc_register: %s version %s already holds this model", name, done.version)
        return str(done.version)
    with tempfile.TemporaryDirectory() as tmp:
        save_ctc_pyfunc(model.path("model"), Path(tmp) / CTC_ARTIFACT)
        client.log_artifacts(model.mlflow_run_id, str(Path(tmp) / CTC_ARTIFACT), CTC_ARTIFACT)
    source = f"{client.get_run(model.mlflow_run_id).info.artifact_uri}/{CTC_ARTIFACT}"
    tags = {"gr2.stage_key": model.key, "gr2.profile": config.profile}
    version = client.create_model_version(name, source, model.mlflow_run_id, tags=tags)
    log.info("ctc_register: registered %s version %s from %s", name, version.version, source)
    return str(version.version)
