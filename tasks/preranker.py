"""Stages `preranker` (train SASRec on training prefixes) and `candidates` (faiss slates)."""

from __future__ import annotations

from pathlib import Path

import polars as pl
from prefect import get_run_logger, task

from data_contracts.config import PipelineConfig
from data_contracts.manifest import Manifest
from gr2_core import plots
from gr2_core import preranker as core
from tasks.inputs import read
from tasks.stage import Stage, StageResult
from tasks.tracking import StageRun, Tracking

TRAIN = Stage("preranker", lambda c: c.preranker, __name__)
CANDIDATES = Stage("candidates", lambda c: c.preranker, __name__)


@task(name="preranker", cache_key_fn=TRAIN.cache_key_fn, persist_result=True)
def train_preranker(
    config: PipelineConfig, data: Manifest, split: Manifest, tracking: Tracking
) -> Manifest:
    """Train the SASRec pre-ranker; resumes from its checkpoint after a crash."""
    cfg = config.preranker

    def body(work: Path, run: StageRun) -> StageResult:
        vocab = core.ItemVocab(read(data, "items")["item_id"].to_list())
        prefixes = [vocab.encode(s) for s in read(split, "preranker_train")["items"]]
        train, monitor = core.hold_out_monitor(prefixes)  # monitor: each prefix's last item
        log = get_run_logger()
        log.info(
            "preranker: %d sequences, %d items, %d epochs", len(train), len(vocab.items), cfg.epochs
        )

        def on_epoch(epoch: int, row: dict[str, float]) -> None:
            run.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch)
            log.info("preranker epoch %d: %s", epoch, {k: round(v, 4) for k, v in row.items()})

        model, history = core.train_sasrec(
            train, len(vocab.items), cfg, monitor, on_epoch, checkpoint=work / "checkpoint.pt"
        )
        core.save(model, vocab, work)
        pl.DataFrame(history).write_parquet(work / "history.parquet")
        run.log_figure(plots.preranker_curve(history, work / "training.png"), "training.png")
        best = max(history, key=lambda r: r.get("monitor_ndcg@10", 0.0))
        files = {
            "model": "model.pt",
            "config": "config.json",
            "items": "items.parquet",
            "history": "history.parquet",
            "plot": "training.png",
        }
        run.log_artifact(work / "model.pt", "model")
        run.log_artifact(work / "config.json", "model")
        metrics = {"best_epoch": best["epoch"], "epochs_run": float(len(history))}
        metrics |= {f"best_{k}": v for k, v in best.items() if k.startswith("monitor")}
        return StageResult(files, metrics, scratch=["checkpoint.pt"])

    return TRAIN.run(config, [data, split], tracking, body)


@task(name="candidates", cache_key_fn=CANDIDATES.cache_key_fn, persist_result=True)
def generate_candidates(
    config: PipelineConfig, split: Manifest, preranker: Manifest, tracking: Tracking
) -> Manifest:
    """Top-|D| slates for every reranker sample, history items excluded."""

    def body(work: Path, run: StageRun) -> StageResult:
        model, vocab = core.load(Path(preranker.directory))
        slates = core.generate_slates(
            model,
            vocab,
            read(split, "samples"),
            read(split, "sequences"),
            config.preranker.slate_size,
        )
        slates.write_parquet(work / "slates.parquet")
        cov = slates.group_by("split").agg(pl.col("target_rank").is_not_null().mean())
        metrics = {f"{s}/coverage": float(v) for s, v in cov.iter_rows()}
        get_run_logger().info("candidates: coverage %s", metrics)
        return StageResult({"slates": "slates.parquet"}, metrics)

    return CANDIDATES.run(config, [split, preranker], tracking, body)
