"""One interface over both tokenizers: fit, encode to learned codes, save, load, describe."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from data_contracts.config import SemanticIdConfig
from data_contracts.tables import SID_MAP, validate
from gr2_core import plots
from gr2_core.output import Log, OnMetrics, StageOutput
from gr2_core.semantic_ids.embeddings import check_embeddings
from gr2_core.semantic_ids.rqkmeans import RQKMeans
from gr2_core.semantic_ids.rqvae import RQVAE, train_rqvae
from gr2_core.semantic_ids.sidmap import (
    assign_last_level,
    build_sid_map,
    code_stats,
    extend_sid_map,
)

Tokenizer = RQVAE | RQKMeans

LOG = logging.getLogger(__name__)


def fit(
    x: np.ndarray,
    cfg: SemanticIdConfig,
    pairs: np.ndarray | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> tuple[Tokenizer, list[dict[str, float]], float]:
    """Train the configured tokenizer; returns it, its history and the wall time (s)."""
    start = time.perf_counter()
    if cfg.method == "rqkmeans":
        tok, history = RQKMeans.fit(x, cfg.levels, cfg.codebook_size, cfg.seed), []
    else:
        tok, history = train_rqvae(x, cfg, pairs, on_epoch)
    return tok, history, time.perf_counter() - start


def reconstruction_error(tok: Tokenizer, x: np.ndarray) -> float:
    """Mean squared L2 error of the input reconstruction."""
    if isinstance(tok, RQKMeans):
        return float(((tok.reconstruct(tok.encode(x)) - x) ** 2).sum(1).mean())
    return tok.reconstruction_error(x)


def save(tok: Tokenizer, folder: Path, cfg: SemanticIdConfig) -> list[str]:
    """Write the tokenizer; returns the file names written."""
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(tok, RQKMeans):
        tok.save(folder)
        (folder / "tokenizer_config.json").write_text(cfg.model_dump_json(indent=2))
        return ["codebooks.npy", "tokenizer_config.json"]
    tok.save(folder)
    return ["rqvae.pt", "tokenizer_config.json"]


def load(folder: Path) -> tuple[Tokenizer, SemanticIdConfig]:
    cfg = SemanticIdConfig.model_validate_json((folder / "tokenizer_config.json").read_text())
    tok = RQKMeans.load(folder) if cfg.method == "rqkmeans" else RQVAE.load(folder)
    return tok, cfg


def input_dim(tok: Tokenizer) -> int:
    return tok.dim if isinstance(tok, RQKMeans) else tok.input_dim


def sid_map_for(
    item_ids: list[str],
    x: np.ndarray,
    tok: Tokenizer,
    cfg: SemanticIdConfig,
    base_map: pl.DataFrame | None = None,
) -> tuple[pl.DataFrame, dict[str, float]]:
    """Code a catalogue: a fresh map, or `base_map` extended without changing existing SIDs."""
    check_embeddings(x, item_ids, input_dim(tok))
    learned = tok.encode(x)
    stats = code_stats(learned, [cfg.codebook_size] * cfg.levels)
    if base_map is None:
        full = assign_last_level(item_ids, learned, cfg.last_level_size)
        sid_map = build_sid_map(item_ids, full, cfg.version)
    else:
        # items that left the catalogue keep their rows: an SID is never reused
        sid_map = extend_sid_map(base_map, item_ids, learned, cfg.last_level_size)
    last = np.array([c[-1] for c in sid_map["codes"].to_list()])
    stats["last_level/max_group"] = float(last.max() + 1) if len(last) else 0.0
    stats["uniqueness"] = sid_map["sid"].n_unique() / max(sid_map.height, 1)
    return sid_map, stats


def describe(stats: dict[str, float]) -> str:
    return json.dumps({k: round(v, 4) for k, v in stats.items()})


@dataclass(frozen=True)
class SemanticIdInputs:
    embeddings: Path  # the embeddings stage's matrix (.npy)
    items: Path  # the embeddings stage's items, in the matrix's row order
    preranker_train: Path  # the split stage's prefixes (co-interaction pairs)


def run(
    inputs: SemanticIdInputs,
    cfg: SemanticIdConfig,
    out: Path,
    on_metrics: OnMetrics | None = None,
    log: Log = LOG,
) -> StageOutput:
    """Stage `semantic_ids`: train the SID tokenizer (or reuse `cfg.base`, extending it to new
    items) and code every item; the map is 100% unique or the stage fails."""
    x = np.load(inputs.embeddings)
    ids = pl.read_parquet(inputs.items)["item_id"].to_list()
    check_embeddings(x, ids)
    base_map, metrics = None, {}
    if cfg.base:
        tok, base_cfg = load(Path(cfg.base))
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
            from gr2_core.semantic_ids.rqvae import co_interaction_pairs

            prefixes = pl.read_parquet(inputs.preranker_train)
            pairs = co_interaction_pairs(prefixes, ids, 200_000, cfg.seed)

        def on_epoch(epoch: int, row: dict[str, float]) -> None:
            if on_metrics is not None:
                on_metrics({k: v for k, v in row.items() if k != "epoch"}, epoch)

        tok, _, seconds = fit(x, cfg, pairs, on_epoch)
        metrics["train_seconds"] = seconds
        cfg_used = cfg
    files = {name: name for name in save(tok, out, cfg_used)}
    sid_map, stats = sid_map_for(ids, x, tok, cfg_used, base_map)
    sid_map = validate(SID_MAP, sid_map, "sid_map")
    if stats["uniqueness"] != 1.0:  # the assigned level guarantees it; never ship otherwise
        raise AssertionError(f"SID uniqueness {stats['uniqueness']} != 1.0")
    metrics |= stats
    metrics["reconstruction_error"] = reconstruction_error(tok, x)
    sid_map.write_parquet(out / "sid_map.parquet")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    codes = np.array(sid_map["codes"].to_list())
    plots.close(plots.codebook_usage(codes, cfg_used.levels, out / "usage.png"))
    log.info("semantic_ids: %s", describe(metrics))
    attach = {"usage.png": "", "sid_map.parquet": ""} | {name: "tokenizer" for name in files}
    files |= {"sid_map": "sid_map.parquet", "metrics": "metrics.json", "plot": "usage.png"}
    return StageOutput(files, metrics, attach=attach)
