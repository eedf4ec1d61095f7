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

import data_contracts.tables
import gr2_core.metrics
import gr2_core.summarization.baselines
import gr2_core.summarization.ctc
import gr2_core.summarization.data
import gr2_core.summarization.decode
import gr2_core.summarization.evaluate
import gr2_core.summarization.metrics
from data_contracts.ctc import CTCFlowConfig
from data_contracts.manifest import Manifest, sha256_file
from data_contracts.tables import SUMMARY_PAIRS, SUMMARY_SCORES, validate
from gr2_core.plots import ctc_curves, summarizer_bars
from gr2_core.report import to_markdown
from gr2_core.summarization.baselines import LLMSummarizer, lead_n, lead_words, truncated
from gr2_core.summarization.ctc import (
    CTCSpec,
    DecodeOptions,
    Summarizer,
    TrainOptions,
    train_summarizer,
)
from gr2_core.summarization.data import (
    SummaryPair,
    aclsum_dir,
    asr_noise,
    load_aclsum,
    load_jsonl,
)
from gr2_core.summarization.evaluate import (
    pick_by_rouge_l,
    score_system,
    summary_table,
    to_markdown_rows,
)
from tasks.data import read
from tasks.stage import Stage, StageResult
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
    (gr2_core.summarization.data, data_contracts.tables),
    _fingerprint,
)
TRAIN = Stage("ctc_train", lambda c: c.ctc, (gr2_core.summarization.ctc,))
EVAL = Stage(
    "ctc_eval",
    lambda c: c.evaluation,
    (
        gr2_core.summarization.evaluate,
        gr2_core.summarization.baselines,
        gr2_core.summarization.metrics,
        gr2_core.summarization.decode,
        gr2_core.metrics,
    ),
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
def load_pairs(config: CTCFlowConfig, tracking: Tracking) -> Manifest:
    """Read and check the (document, summary) pairs of every split."""

    def body(work: Path, run: StageRun) -> StageResult:
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
        return StageResult({"pairs": "pairs.parquet"}, metrics)

    return DATA.run(config, [], tracking, body)


def spec_of(config: CTCFlowConfig) -> CTCSpec:
    c = config.ctc
    return CTCSpec(
        encoder=c.encoder,
        hidden=c.hidden,
        layers=c.layers,
        heads=c.heads,
        window=c.window,
        upsample=c.upsample,
        dropout=c.dropout,
        copy_bias=c.copy_bias,
        target=c.target,
        max_source_words=config.data.max_source_words,
        max_source_tokens=c.max_source_tokens,
    )


@task(name="ctc_train", cache_key_fn=TRAIN.cache_key_fn, persist_result=True)
def train_ctc(config: CTCFlowConfig, data: Manifest, tracking: Tracking) -> Manifest:
    """Fit the CTC summarizer; resumes from the last finished epoch after a crash."""

    def body(work: Path, run: StageRun) -> StageResult:
        c = config.ctc
        opts = TrainOptions(
            epochs=c.epochs,
            batch_size=c.batch_size,
            lr=c.lr,
            weight_decay=c.weight_decay,
            seed=c.seed,
            num_threads=c.num_threads,
            patience=c.patience,
        )
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
        return StageResult(files, metrics, scratch=["ckpt"])

    return TRAIN.run(config, [data], tracking, body)


def ctc_system(summarizer: Summarizer, opts: DecodeOptions):
    """(document, aspect) -> summary, encoder included (so its time counts in the latency)."""

    def summarize(document: str, aspect: str) -> str:
        return summarizer.decode(summarizer.encoder.encode([document])[0], aspect, opts)

    return summarize


def cached_system(summarizer: Summarizer, encoded: dict, opts: DecodeOptions):
    """Like `ctc_system` over documents encoded beforehand (for tuning on valid)."""
    return lambda document, aspect: summarizer.decode(encoded[document], aspect, opts)


def conditions(rates: list[float]) -> dict[str, float]:
    return {("clean" if r == 0 else f"asr-noise-{r:g}"): r for r in rates}


@task(name="ctc_eval", cache_key_fn=EVAL.cache_key_fn, persist_result=True)
def evaluate_ctc(
    config: CTCFlowConfig, data: Manifest, model: Manifest, tracking: Tracking
) -> Manifest:
    """CTC (greedy, length-controlled greedy, beam), Lead-N and the zero-shot LLM on the test
    split, clean and with simulated ASR noise."""

    def body(work: Path, run: StageRun) -> StageResult:
        e, d = config.evaluation, config.data
        log = get_run_logger()
        test, train = pairs_of(data, "test"), pairs_of(data, "train")
        summarizer = Summarizer.load(model.path("model"))
        # output lengths of the CTC length control and of Lead-N: set, or picked on valid
        valid = pairs_of(data, "valid")
        valid_sources = truncated([p.document for p in valid], d.max_source_words)
        cache = dict(zip(valid_sources, summarizer.encoder.encode(valid_sources), strict=True))
        factors = e.length_factors
        median = summarizer.median_summary_tokens
        if e.length:
            length, tuned_ctc = e.length, {}
        else:
            length, tuned_ctc = pick_by_rouge_l(
                [max(1, round(median * f)) for f in factors],
                lambda n: cached_system(summarizer, cache, DecodeOptions("greedy", length=n)),
                valid,
                valid_sources,
                e.level,
            )
        words = lead_words([p.summary for p in train])
        n_lead, tuned_lead = pick_by_rouge_l(
            [max(1, round(words * f)) for f in factors],
            lambda n: lambda doc, aspect: lead_n(doc, n),
            valid,
            valid_sources,
            e.level,
        )
        log.info(
            "ctc_eval: CTC length %d (valid ROUGE-L %s), Lead-%d (%s)",
            length,
            tuned_ctc,
            n_lead,
            tuned_lead,
        )
        llm_pairs = _cap(test, e.llm_max_pairs, d.seed)
        llm = LLMSummarizer(e.llm_source, e.llm_max_new_tokens, e.num_threads)
        greedy = DecodeOptions("greedy", max_len=e.max_len)
        controlled = DecodeOptions("greedy", length=length)
        beam = DecodeOptions(
            "beam",
            beam=e.beam,
            top_k=e.top_k,
            max_len=e.max_len,
            min_len=e.min_len,
            length_bonus=e.length_bonus,
        )
        frames = []
        for name, rate in conditions(e.noise_rates).items():
            docs = truncated([p.document for p in test], d.max_source_words)
            vocab = sorted({w for doc in docs for w in doc.split()})
            sources = [asr_noise(doc, rate, d.seed, vocab) for doc in docs]
            systems = {
                "ctc-greedy": ctc_system(summarizer, greedy),
                f"ctc-greedy-len{length}": ctc_system(summarizer, controlled),
                f"ctc-beam{e.beam}": ctc_system(summarizer, beam),
                f"lead-{n_lead}": lambda doc, aspect: lead_n(doc, n_lead),
            }
            for system, fn in systems.items():
                frames.append(score_system(system, fn, test, sources, name, e.level))
            by_id = dict(zip([p.id for p in test], sources, strict=True))
            llm_sources = [by_id[p.id] for p in llm_pairs]
            frames.append(score_system("llm-zero-shot", llm, llm_pairs, llm_sources, name, e.level))
            log.info("ctc_eval: condition %s scored", name)
        scores = validate(SUMMARY_SCORES, pl.concat(frames), "ctc_eval scores")
        table = summary_table(scores, e.bootstrap_samples, d.seed)
        scores.write_parquet(work / "scores.parquet")
        table.write_parquet(work / "table.parquet")
        report = to_markdown(to_markdown_rows(table))
        (work / "report.md").write_text(report + "\n")
        run.log_figure(summarizer_bars(table, work / "results.png"), "results.png")
        run.log_table(scores, "scores.parquet")
        metrics = {f"valid_rougeL/ctc_length_{k}": v for k, v in tuned_ctc.items()}
        metrics |= {f"valid_rougeL/lead_{k}": v for k, v in tuned_lead.items()}
        metrics |= {"ctc_length": length, "lead_words": n_lead}
        for row in table.iter_rows(named=True):
            for k in ("rouge1", "rouge2", "rougeL", "order", "summaries_per_s", "latency_ms"):
                metrics[f"{row['condition']}/{row['system']}/{k}"] = row[k]
        files = {
            "scores": "scores.parquet",
            "table": "table.parquet",
            "report": "report.md",
            "plot": "results.png",
        }
        return StageResult(files, metrics)

    return EVAL.run(config, [data, model], tracking, body)


@task(name="ctc_publish")
def publish_ctc(config: CTCFlowConfig, tracking: Tracking, stages: list[Manifest]) -> dict:
    """Every run (cached or not): the results table in Prefect, stage links on the parent run."""
    from tasks.tracking import finish_parent

    scored = next(m for m in stages if m.stage == "ctc_eval")
    table = read(scored, "table")
    create_table_artifact(
        to_markdown_rows(table).to_dicts(),
        key="gr2-ctc",
        description=f"CTC summarizer vs baselines, {config.data.source} test "
        f"({config.profile}): mean [95% CI], summaries/s one document at a time",
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
def register_ctc(config: CTCFlowConfig, model: Manifest, tracking: Tracking) -> str:
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
