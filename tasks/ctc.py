"""Stages of the CTC summarization flow: `ctc_data`, `ctc_train`, `ctc_eval`, then registration.

Same protocol as the reranker stages (`tasks.stage.Stage`): content-addressed output folders,
one MLflow child run per stage execution, Prefect caching on the stage key.
"""

from __future__ import annotations

import random
from pathlib import Path

import pandas as pd
import polars as pl
from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact

from data_contracts.ctc import CTCFlowConfig
from data_contracts.manifest import Manifest, sha256_file
from data_contracts.summaries import SUMMARY_PAIRS, SUMMARY_SCORES
from data_contracts.tables import validate
from gr2_core.output import StageOutput
from gr2_core.plots import ctc_curves, summarizer_bars
from gr2_core.report import to_markdown
from gr2_core.summarization.baselines import LLMSummarizer
from gr2_core.summarization.ctc import (
    CTCSpec,
    Summarizer,
    TrainOptions,
    train_summarizer,
)
from gr2_core.summarization.data import (
    SummaryPair,
    aclsum_dir,
    load_aclsum,
    load_jsonl,
)
from gr2_core.summarization.evaluate import (
    from_config,
    paired_differences,
    score_conditions,
    summary_table,
    to_markdown_rows,
    tune,
)
from tasks.inputs import read
from tasks.stage import Stage
from tasks.tracking import StageRun, Tracking


def _fingerprint(config: CTCFlowConfig) -> dict[str, str]:
    """Content hash of the input file(s), so an edited corpus invalidates the stage."""
    d = config.data
    if d.source == "jsonl":
        path = Path(d.jsonl_path or "")
        return {"jsonl": sha256_file(path) if path.exists() else "absent"}
    return {s: sha256_file(aclsum_dir() / f"{s}.jsonl") for s in ("train", "val", "test")}


DATA = Stage(
    "ctc_data",
    lambda c: c.data,
    __name__,
    _fingerprint,
)
TRAIN = Stage("ctc_train", lambda c: c.ctc, __name__)
EVAL = Stage(
    "ctc_eval",
    lambda c: c.evaluation,
    __name__,
)


def pairs_of(manifest: Manifest, split: str) -> list[SummaryPair]:
    df = read(manifest, "pairs").filter(pl.col("split") == split)
    return [SummaryPair(**row) for row in df.iter_rows(named=True)]


def _cap(pairs: list[SummaryPair], n: int | None, seed: int) -> list[SummaryPair]:
    """At most n pairs, whole documents first (a seeded choice of documents)."""
    if n is None or len(pairs) <= n:
        return pairs
    docs = list(dict.fromkeys(p.doc_id for p in pairs))
    random.Random(seed).shuffle(docs)
    rank = {d: i for i, d in enumerate(docs)}
    return sorted(pairs, key=lambda p: (rank[p.doc_id], p.id))[:n]


@task(name="ctc_data", cache_key_fn=DATA.cache_key_fn, persist_result=True)
def ctc_data(config: CTCFlowConfig, tracking: Tracking) -> Manifest:
    """Read and check the (document, summary) pairs of every split."""

    def body(work: Path, run: StageRun) -> StageOutput:
        d = config.data
        if d.source == "jsonl":
            pairs = load_jsonl(d.jsonl_path, None, d.document_field, d.summary_field)
            source = d.jsonl_path
        else:
            pairs = [
                p for s in ("train", "valid", "test") for p in load_aclsum(s, d.aclsum_variant)
            ]
            source = f"aclsum ({d.aclsum_variant})"
        by_split = {s: [p for p in pairs if p.split == s] for s in ("train", "valid", "test")}
        by_split["train"] = _cap(by_split["train"], d.max_train_pairs, d.seed)
        for s in ("valid", "test"):
            by_split[s] = _cap(by_split[s], d.max_eval_pairs, d.seed)
        missing = [s for s in ("train", "test") if not by_split[s]]
        if missing:
            raise ValueError(f"{source}: no {' or '.join(missing)} pairs (record field 'split')")
        rows = [p.to_dict() for s in ("train", "valid", "test") for p in by_split[s]]
        df = validate(SUMMARY_PAIRS, pl.DataFrame(rows), f"{source} (pairs)")
        df.write_parquet(work / "pairs.parquet")
        run.log_dataset(df, f"summaries-{d.source}", str(source), "training")
        metrics = {f"pairs_{s}": float(len(v)) for s, v in by_split.items()}
        words = df.select(
            pl.col("document").str.split(" ").list.len().mean().alias("document_words"),
            pl.col("summary").str.split(" ").list.len().mean().alias("summary_words"),
        )
        metrics |= {k: float(v) for k, v in words.row(0, named=True).items()}
        get_run_logger().info("ctc_data: %s", metrics)
        return StageOutput({"pairs": "pairs.parquet"}, metrics)

    return DATA.run(config, [], tracking, body)


def spec_of(config: CTCFlowConfig) -> CTCSpec:
    return from_config(CTCSpec, config.ctc, max_source_words=config.data.max_source_words)


@task(name="ctc_train", cache_key_fn=TRAIN.cache_key_fn, persist_result=True)
def ctc_train(config: CTCFlowConfig, data: Manifest, tracking: Tracking) -> Manifest:
    """Fit the CTC summarizer; resumes from the last finished epoch after a crash."""

    def body(work: Path, run: StageRun) -> StageOutput:
        opts = from_config(TrainOptions, config.ctc)
        log = get_run_logger()

        def on_epoch(epoch: int, row: dict[str, float]) -> None:
            run.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch)
            log.info("ctc_train epoch %d: %s", epoch, {k: round(v, 4) for k, v in row.items()})

        summarizer, history = train_summarizer(
            pairs_of(data, "train"), pairs_of(data, "valid"), spec_of(config), opts, work, on_epoch
        )
        summarizer.save(work / "model")
        pl.DataFrame(history).write_parquet(work / "history.parquet")
        run.log_figure(ctc_curves(history, work / "curves.png"), "curves.png")
        best = min(history, key=lambda r: r["valid_loss"]) if history else {}
        metrics = {
            "best_valid_loss": best.get("valid_loss", float("nan")),
            "best_epoch": best.get("epoch", 0),
            "epochs_run": len(history),
            "output_vocabulary": len(summarizer.spec.summary_labels),
        }
        files = {"model": "model", "history": "history.parquet", "curves": "curves.png"}
        return StageOutput(files, metrics, scratch=["ckpt"])

    return TRAIN.run(config, [data], tracking, body)


def conditions(rates: list[float]) -> dict[str, float]:
    return {("clean" if r == 0 else f"asr-noise-{r:g}"): r for r in rates}


@task(name="ctc_eval", cache_key_fn=EVAL.cache_key_fn, persist_result=True)
def ctc_eval(
    config: CTCFlowConfig, data: Manifest, model: Manifest, tracking: Tracking
) -> Manifest:
    """CTC (greedy, length-controlled greedy, beam), Lead-N and the zero-shot LLM on the test
    split, clean and with simulated ASR noise."""

    def body(work: Path, run: StageRun) -> StageOutput:
        e, d = config.evaluation, config.data
        log = get_run_logger()
        test, train = pairs_of(data, "test"), pairs_of(data, "train")
        summarizer = Summarizer.load(model.path("model"))
        words = d.max_source_words
        tuned = tune(summarizer, pairs_of(data, "valid"), train, e, words)
        log.info("ctc_eval: picked on valid by ROUGE-L: %s", tuned)
        llm_pairs = _cap(test, e.llm_max_pairs, d.seed)
        llm = LLMSummarizer(e.llm_source, e.llm_max_new_tokens, e.num_threads)
        frames = score_conditions(
            summarizer,
            llm,
            test,
            llm_pairs,
            tuned,
            e,
            words,
            d.seed,
            conditions(e.noise_rates),
            lambda name: log.info("ctc_eval: condition %s scored", name),
        )
        scores = validate(SUMMARY_SCORES, frames, "ctc_eval scores")
        table = summary_table(scores, e.bootstrap_samples, d.seed)
        scores.write_parquet(work / "scores.parquet")
        table.write_parquet(work / "table.parquet")
        lead = f"lead-{tuned.lead_words}"
        differences = paired_differences(scores, lead, "rougeL", e.bootstrap_samples, d.seed)
        differences.write_parquet(work / "differences.parquet")
        report = (
            to_markdown(to_markdown_rows(table))
            + f"\n\nROUGE-L minus {lead} on the same test pairs, mean [95% paired bootstrap CI, "
            + "clustered by document]:"
            + "\n\n"
            + to_markdown(differences)
        )
        (work / "report.md").write_text(report + "\n")
        run.log_figure(summarizer_bars(table, work / "results.png"), "results.png")
        run.log_table(scores, "scores.parquet")
        metrics = tuned.metrics()
        for row in table.iter_rows(named=True):
            for k in ("rouge1", "rouge2", "rougeL", "order", "summaries_per_s", "latency_ms"):
                metrics[f"{row['condition']}/{row['system']}/{k}"] = row[k]
        files = {
            "scores": "scores.parquet",
            "table": "table.parquet",
            "differences": "differences.parquet",
            "report": "report.md",
            "plot": "results.png",
        }
        return StageOutput(files, metrics)

    return EVAL.run(config, [data, model], tracking, body)


@task(name="ctc_publish")
def ctc_publish(config: CTCFlowConfig, tracking: Tracking, stages: list[Manifest]) -> dict:
    """Every run (cached or not): the results table in Prefect, stage links on the parent run."""
    from tasks.tracking import finish_parent

    scored = next(m for m in stages if m.stage == "ctc_eval")
    table = read(scored, "table")
    create_table_artifact(
        to_markdown_rows(table).to_dicts(),
        key="gr2-ctc",
        description=f"CTC summarizer vs baselines, {config.data.source} test "
        f"({config.profile}): mean [95% CI, documents resampled], summaries/s one document at "
        "a time",
    )
    tags = {}
    for m in stages:
        tags[f"gr2.stage.{m.stage}.key"] = m.key
        tags[f"gr2.stage.{m.stage}.run_id"] = m.mlflow_run_id or ""
    finish_parent(tracking, tags=tags)
    return {
        "report": scored.path("report").read_text(),
        "stage_seconds": {m.stage: m.metrics.get("wall_seconds") for m in stages},
        "tracking_uri": tracking.tracking_uri,
        "experiment_id": tracking.experiment_id,
        "mlflow_run_id": tracking.parent_run_id or "",
    }


PYFUNC_FILE = Path(__file__).with_name("ctc_pyfunc.py")
ARTIFACT = "ctc_summarizer"
SERVING_REQUIREMENTS = ["torch==2.13.0", "transformers==5.24.0", "numpy>=2,<3", "tqdm>=4.66"]


@task(name="ctc_register")
def ctc_register(config: CTCFlowConfig, model: Manifest, tracking: Tracking) -> str:
    """Save the trained summarizer as an MLflow pyfunc model, log it to its training run and
    register it under `config.registered_model`. Idempotent: a version already registered for
    this training output (tag `gr2.stage_key`) is returned as is. Returns the version number.

    Only `MlflowClient` calls with an explicit URI: no process-wide tracking URI is set, so a
    pipeline running beside this flow keeps logging where it should."""
    import tempfile

    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.models import infer_signature
    from mlflow.tracking import MlflowClient

    import gr2_core

    log = get_run_logger()
    client = MlflowClient(tracking.tracking_uri)
    name = config.registered_model
    try:
        client.create_registered_model(
            name, description="GR2 CTC summarizer (order-preserving, non-autoregressive)"
        )
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    for version in client.search_model_versions(f"name = '{name}'"):
        if version.tags.get("gr2.stage_key") == model.key:
            log.info("ctc_register: %s version %s already holds this model", name, version.version)
            return str(version.version)
    summarizer = Summarizer.load(model.path("model"))
    document = (
        "We propose a new method for summarizing spoken lectures . Experiments show that it "
        "keeps the order of the source and improves ROUGE over strong baselines ."
    )
    aspect = summarizer.spec.conditions[-1]
    example = pd.DataFrame({"document": [document], "aspect": [aspect]})
    output = pd.DataFrame({"summary": summarizer.summarize([document], [aspect])})
    signature = infer_signature(example, output, {"method": "greedy", "length": 0, "beam": 8})
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / ARTIFACT
        mlflow.pyfunc.save_model(
            path=str(local),
            python_model=str(PYFUNC_FILE),
            artifacts={"summarizer": str(model.path("model"))},
            code_paths=[str(Path(gr2_core.__file__).parent)],
            pip_requirements=SERVING_REQUIREMENTS,
            signature=signature,
            input_example=example,
        )
        client.log_artifacts(model.mlflow_run_id, str(local), ARTIFACT)
    source = f"{client.get_run(model.mlflow_run_id).info.artifact_uri}/{ARTIFACT}"
    tags = {"gr2.stage_key": model.key, "gr2.profile": config.profile}
    version = client.create_model_version(name, source, model.mlflow_run_id, tags=tags)
    log.info("ctc_register: registered %s version %s from %s", name, version.version, source)
    return str(version.version)
