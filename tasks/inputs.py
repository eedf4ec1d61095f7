"""What several stages share: reading a finished stage's outputs back, and the prompt's identity.

Not a stage: it imports no stage module, so a stage that reads through it depends only on its
own code and on these readers (both are hashed into its key, see `tasks.store.code_closure`).
"""

from __future__ import annotations

import polars as pl

from data_contracts.config import PipelineConfig
from data_contracts.manifest import Manifest
from gr2_core.catalogue import Catalogue


def prompt_identity(config: PipelineConfig) -> dict:
    """The key part of a stage that builds reranking prompts: the `prompt` section."""
    return {"prompt": config.prompt.digest()}


def read(manifest: Manifest, name: str) -> pl.DataFrame:
    """A table of a finished stage."""
    return pl.read_parquet(manifest.path(name))


def catalogue(data: Manifest, semantic_ids: Manifest) -> Catalogue:
    """The items with their SIDs and captions, from the data and semantic-ID stages."""
    return Catalogue.build(read(data, "items"), read(semantic_ids, "sid_map"))
