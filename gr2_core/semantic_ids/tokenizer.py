"""One interface over both tokenizers: fit, encode to learned codes, save, load, describe."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl

from data_contracts.config import SemanticIdConfig
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
