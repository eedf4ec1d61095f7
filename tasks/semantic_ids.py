"""Stages `embeddings` (item text embeddings) and `semantic_ids` (tokenizer + SID map)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
from prefect import get_run_logger, task

import gr2_core.semantic_ids.embeddings as emb_core
import gr2_core.semantic_ids.rqvae as rqvae_core
import gr2_core.semantic_ids.tokenizer as tok_core
from data_contracts.config import PipelineConfig
from data_contracts.manifest import Manifest
from data_contracts.tables import SID_MAP, validate
from gr2_core import plots
from gr2_core import preranker as pre_core
from tasks.inputs import read
from tasks.stage import Stage, StageResult
from tasks.tracking import StageRun, Tracking


def _model_fingerprint(config: PipelineConfig) -> dict[str, str]:
    path = Path(config.embeddings.model_path or emb_core.default_model_path())
    weights = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    return {"model": str(path), "bytes": str(sum(w.stat().st_size for w in weights))}


EMBED = Stage("embeddings", lambda c: c.embeddings, __name__, _model_fingerprint)
SIDS = Stage(
    "semantic_ids",
    lambda c: c.semantic_ids,
    __name__,
)


@task(name="embeddings", cache_key_fn=EMBED.cache_key_fn, persist_result=True)
def embed_items(
    config: PipelineConfig, data: Manifest, tracking: Tracking, preranker: Manifest | None = None
) -> Manifest:
    """MiniLM embeddings of 'title | year | genres' (+ pre-ranker item vectors if configured)."""
    cfg = config.embeddings

    def body(work: Path, run: StageRun) -> StageResult:
        items = read(data, "items")
        texts = emb_core.item_texts(items)
        model_path = Path(cfg.model_path) if cfg.model_path else None
        x = emb_core.embed_texts(texts, model_path, cfg.batch_size, cfg.max_length)
        if cfg.with_collaborative:
            if preranker is None:
                raise ValueError("embeddings.with_collaborative needs the preranker manifest")
            model, vocab = pre_core.load(Path(preranker.directory))
            collab = model.item_vectors().detach().numpy()
            order = [vocab.index[i] - 1 for i in items["item_id"].to_list()]
            collab = collab[order] / np.linalg.norm(collab[order], axis=1, keepdims=True)
            x = np.concatenate([x, collab.astype(np.float32)], axis=1)
        np.save(work / "embeddings.npy", x)
        items.select("item_id", pl.Series("text", texts)).write_parquet(work / "items.parquet")
        run.log_text("\n".join(texts[:50]), "sample_texts.txt")
        return StageResult(
            {"embeddings": "embeddings.npy", "items": "items.parquet"},
            {"items": float(len(x)), "dim": float(x.shape[1])},
        )

    upstream = [data] + ([preranker] if preranker is not None else [])
    return EMBED.run(config, upstream, tracking, body)


@task(name="semantic_ids", cache_key_fn=SIDS.cache_key_fn, persist_result=True)
def build_semantic_ids(
    config: PipelineConfig, embeddings: Manifest, split: Manifest, tracking: Tracking
) -> Manifest:
    """Train (or reuse, with `base`) the SID tokenizer and code every item, 100% unique."""
    cfg = config.semantic_ids

    def body(work: Path, run: StageRun) -> StageResult:
        log = get_run_logger()
        x = np.load(embeddings.path("embeddings"))
        ids = read(embeddings, "items")["item_id"].to_list()
        emb_core.check_embeddings(x, ids)
        base_map, metrics = None, {}
        if cfg.base:
            tok, base_cfg = tok_core.load(Path(cfg.base))
            if base_cfg.version != cfg.version:
                raise ValueError(
                    f"semantic_ids.base {cfg.base} is version {base_cfg.version!r}, config asks "
                    f"for {cfg.version!r}: drop `base` to re-code everything as a new version"
                )
            base_map = pl.read_parquet(Path(cfg.base) / "sid_map.parquet")
            cfg_used = base_cfg
        else:
            pairs = None
            if cfg.contrastive_weight > 0:
                pairs = rqvae_core.co_interaction_pairs(
                    read(split, "preranker_train"), ids, 200_000, cfg.seed
                )

            def on_epoch(epoch: int, row: dict[str, float]) -> None:
                run.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch)

            tok, history, seconds = tok_core.fit(x, cfg, pairs, on_epoch)
            metrics["train_seconds"] = seconds
            cfg_used = cfg
        files = {name: name for name in tok_core.save(tok, work, cfg_used)}
        sid_map, stats = tok_core.sid_map_for(ids, x, tok, cfg_used, base_map)
        sid_map = validate(SID_MAP, sid_map, "sid_map")
        if stats["uniqueness"] != 1.0:  # the assigned level guarantees it; never ship otherwise
            raise AssertionError(f"SID uniqueness {stats['uniqueness']} != 1.0")
        metrics |= stats
        metrics["reconstruction_error"] = tok_core.reconstruction_error(tok, x)
        sid_map.write_parquet(work / "sid_map.parquet")
        (work / "metrics.json").write_text(json.dumps(metrics, indent=2))
        run.log_figure(
            plots.codebook_usage(
                np.array(sid_map["codes"].to_list()), cfg_used.levels, work / "usage.png"
            ),
            "usage.png",
        )
        run.log_artifact(work / "sid_map.parquet")
        for name in files:
            run.log_artifact(work / name, "tokenizer")
        log.info("semantic_ids: %s", tok_core.describe(metrics))
        files |= {"sid_map": "sid_map.parquet", "metrics": "metrics.json", "plot": "usage.png"}
        return StageResult(files, metrics)

    return SIDS.run(config, [embeddings, split], tracking, body)
