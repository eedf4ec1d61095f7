"""Configuration of the CTC summarization flow (`flows/ctc_summarization.py`, SPEC section 7).

`CTCFlowConfig` is that flow's parameter, so the Prefect UI renders these fields as its form.
Profiles live in `infra/configs/ctc/`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from data_contracts.config import (
    PROFILES_DIR,
    PipelineConfig,
    RunnerConfig,
    StageConfig,
    TrackingConfig,
    read_profile,
)

CTC_PROFILES_DIR = PROFILES_DIR / "ctc"


class SummaryDataConfig(StageConfig):
    """Which (document, summary) pairs to use."""

    source: Literal["aclsum", "jsonl"] = Field(
        "aclsum", description="aclsum: the packaged ACLSum papers; jsonl: your own file."
    )
    aclsum_variant: Literal["aspects", "abstract"] = Field(
        "aspects",
        description="aspects: abstract+introduction+conclusion -> each aspect summary; "
        "abstract: body text -> abstract.",
    )
    jsonl_path: str | None = Field(
        None,
        description="jsonl only: one object per line with the document and summary fields "
        "(optional id, aspect, split in train/valid/test).",
    )
    document_field: str = "document"
    summary_field: str = "summary"
    max_source_words: int = Field(
        400, ge=8, description="Every system reads the first N words of each document."
    )
    max_train_pairs: int | None = Field(
        None, ge=1, description="Cap on training pairs (smoke runs)."
    )
    max_eval_pairs: int | None = Field(None, ge=1, description="Cap on valid/test pairs.")
    seed: int = 0

    @model_validator(mode="after")
    def _paths(self) -> SummaryDataConfig:
        if self.source == "jsonl" and not self.jsonl_path:
            raise ValueError("data.source is 'jsonl' but data.jsonl_path is empty")
        return self


class CTCModelConfig(StageConfig):
    """The CTC summarizer and its training."""

    OPERATIONAL = frozenset({"num_threads"})

    encoder: Literal["minilm", "char"] = Field(
        "minilm",
        description="minilm: frozen pretrained all-MiniLM-L6-v2 and its word-piece vocabulary; "
        "char: a character encoder trained from scratch (Chinese).",
    )
    hidden: int = Field(384, ge=8, description="Width (must be 384 with minilm).")
    layers: int = Field(2, ge=1, description="Trainable Transformer layers above the encoder.")
    heads: int = Field(6, ge=1)
    window: int = Field(128, ge=8, le=512, description="Attention window (tokens).")
    upsample: int = Field(1, ge=1, description="Output positions per input token.")
    dropout: float = Field(0.1, ge=0, lt=1)
    copy_bias: bool = Field(True, description="Learned bias towards emitting the input token.")
    target: Literal["lcs", "reference"] = Field(
        "lcs",
        description="Training target: the reference's longest common subsequence with the "
        "source (what an order-preserving model can copy), or the whole reference.",
    )
    max_source_tokens: int = Field(1024, ge=8)
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    patience: int = Field(4, ge=1, description="Stop after N epochs without a better valid loss.")
    seed: int = 0
    num_threads: int = Field(2, ge=1)

    @model_validator(mode="after")
    def _heads(self) -> CTCModelConfig:
        if self.hidden % self.heads:
            raise ValueError(f"ctc.hidden {self.hidden} is not divisible by ctc.heads {self.heads}")
        return self


class CTCEvalConfig(StageConfig):
    """Test conditions, how the CTC model decodes, and the baselines it is compared with."""

    OPERATIONAL = frozenset({"num_threads"})

    noise_rates: list[float] = Field(
        default_factory=lambda: [0.0, 0.1],
        description="Test conditions: simulated ASR noise rates applied to test documents "
        "(0 = clean). Word deletions, substitutions and insertions, seeded.",
    )
    level: Literal["word", "char"] = Field(
        "word", description="ROUGE and order on words (English) or characters (Chinese)."
    )
    length: int | None = Field(
        None,
        ge=1,
        description="Length control for greedy decoding: emit this many tokens; empty: chosen "
        "on the validation split among length_factors x the median training summary length.",
    )
    length_factors: list[float] = Field(
        default_factory=lambda: [1.0, 1.25, 1.5],
        description="Candidate lengths (x median training summary length) for the CTC length "
        "control and Lead-N, picked by validation ROUGE-L.",
    )
    span: int | None = Field(
        None,
        ge=0,
        description="Length control: smooth each position's score over +-span neighbours "
        "(favours phrases); empty: picked on the validation split from `spans`.",
    )
    spans: list[int] = Field(default_factory=lambda: [0, 1, 2])
    beam: int = Field(8, ge=1, description="Prefix beam search width.")
    top_k: int = Field(8, ge=1, description="Labels tried per position in the beam search.")
    max_len: int | None = Field(64, ge=1, description="Length cap on CTC outputs (tokens).")
    min_len: int = Field(0, ge=0, description="Beam outputs shorter than this rank last.")
    length_bonus: float | None = Field(
        None,
        description="Beam score added per output token; empty: picked on the validation split "
        "from `length_bonuses`.",
    )
    length_bonuses: list[float] = Field(default_factory=lambda: [0.0, 2.0, 4.0])
    llm_source: str | None = Field(
        None, description="Zero-shot LLM baseline: a local model folder; empty = SmolLM2-135M."
    )
    llm_max_pairs: int | None = Field(
        60, ge=1, description="Test pairs the (slow) LLM baseline summarizes; empty = all."
    )
    llm_max_new_tokens: int = Field(48, ge=1)
    bootstrap_samples: int = Field(1000, ge=10)
    num_threads: int = Field(2, ge=1)

    @model_validator(mode="after")
    def _rates(self) -> CTCEvalConfig:
        if any(not 0 <= r <= 1 for r in self.noise_rates):
            raise ValueError(f"evaluation.noise_rates must lie in [0, 1], got {self.noise_rates}")
        return self


class CTCTrackingConfig(TrackingConfig):
    """Where the CTC runs are recorded (their own experiment)."""

    experiment: str = "gr2-ctc"


class CTCFlowConfig(StageConfig):
    """The CTC summarization experiments: the parameter of `ctc_summarization` in Prefect."""

    profile: str = Field("custom", description="Name of the profile this config came from.")
    artifacts_root: str = Field(
        "var/artifacts", description="Local folder (or shared storage) for stage outputs."
    )
    data: SummaryDataConfig = SummaryDataConfig()
    ctc: CTCModelConfig = CTCModelConfig()
    evaluation: CTCEvalConfig = CTCEvalConfig()
    registered_model: str = Field(
        "gr2-ctc-summarizer", description="MLflow registered model name for the trained model."
    )
    tracking: CTCTrackingConfig = CTCTrackingConfig()
    runner: RunnerConfig = RunnerConfig()


def load_ctc_profile(name_or_path: str | Path, overrides: dict | None = None) -> CTCFlowConfig:
    """A YAML profile (a name in infra/configs/ctc/ or a path) over the defaults."""
    return CTCFlowConfig.model_validate(read_profile(name_or_path, CTC_PROFILES_DIR, overrides))


# what a flow's `config` parameter can be: both flows share the stage and tracking machinery
FlowConfig = PipelineConfig | CTCFlowConfig
