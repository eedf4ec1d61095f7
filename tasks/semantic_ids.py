"""Stages `embeddings` (item text embeddings) and `semantic_ids` (tokenizer + SID map)."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

import gr2_core.semantic_ids.embeddings as emb_core
import gr2_core.semantic_ids.tokenizer as tok_core
from data_contracts.config import PipelineConfig
from data_contracts.manifest import Manifest
from tasks.runners import map_task, shard_count
from tasks.stage import Stage
from tasks.tracking import Tracking


def _model_fingerprint(config: PipelineConfig) -> dict[str, str]:
    path = Path(config.embeddings.model_path or emb_core.default_model_path())
    weights = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    return {"model": str(path), "bytes": str(sum(w.stat().st_size for w in weights))}


EMBED = Stage(
    "embeddings", lambda c: c.embeddings, __name__, _model_fingerprint, core=emb_core.__name__
)
SIDS = Stage("semantic_ids", lambda c: c.semantic_ids, __name__, core=tok_core.__name__)


@task(task_run_name="embed-shard-{shard.index}")
def embed_shard(shard: emb_core.EmbedShard):
    """One shard of the items' embeddings, where the runner puts it (a Ray worker)."""
    return emb_core.embed_shard(shard)


@task(name="embeddings", cache_key_fn=EMBED.cache_key_fn, persist_result=True)
def embeddings(
    config: PipelineConfig, data: Manifest, tracking: Tracking, preranker: Manifest | None = None
) -> Manifest:
    """MiniLM embeddings of 'title | year | genres' (+ pre-ranker item vectors if configured),
    in `runner.shards` Ray tasks on the Ray runner."""
    folder = Path(preranker.directory) if preranker is not None else None
    inputs = emb_core.EmbeddingInputs(data.path("items"), folder)
    upstream = [data] + ([preranker] if preranker is not None else [])
    runner = config.runner
    shards = shard_count(runner)

    def on_runner(parts: list[emb_core.EmbedShard]) -> list:
        return map_task(embed_shard, [{"shard": p} for p in parts], runner, len(parts))

    def body(out: Path, run):
        return emb_core.run(inputs, config.embeddings, out, on_runner, shards)

    return EMBED.run(config, upstream, tracking, body)


@task(name="semantic_ids", cache_key_fn=SIDS.cache_key_fn, persist_result=True)
def semantic_ids(
    config: PipelineConfig, embeddings: Manifest, split: Manifest, tracking: Tracking
) -> Manifest:
    """Train (or reuse, with `base`) the SID tokenizer and code every item, 100% unique."""
    inputs = tok_core.SemanticIdInputs(
        embeddings.path("embeddings"), embeddings.path("items"), split.path("preranker_train")
    )

    def body(out: Path, run):
        return tok_core.run(inputs, config.semantic_ids, out, run.log_metrics, get_run_logger())

    return SIDS.run(config, [embeddings, split], tracking, body)
