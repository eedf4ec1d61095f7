"""Decoupled-weight SFT loss: reasoning tokens weighted lambda_r, answer tokens lambda_o.

The assistant message is the answer JSON, tokenized segment by segment as the decoder writes it
(`gr2_core.decoding`). Its tokens split into reasoning (the explanation) and answer (the fixed
segments that open and close it, the SIDs and punctuation of the list, and EOS); prompt tokens
are not trained. An explanation longer than the reasoning budget (`prompt.max_explanation_tokens`)
is cut at its last sentence end within the budget, or the trace is dropped if it has none there.
With per-token weights w_t (lambda_r, lambda_o, or 0):

    loss = sum_t w_t * CE_t / sum_t [w_t > 0]

i.e. the mean over trained tokens of the weighted cross-entropy, so lambda_r = lambda_o = 1 is
the ordinary SFT loss on the assistant message. In training, the sums run over the whole
optimizer step: every micro-batch of the gradient accumulation window on every process is
divided by the step's global count of trained tokens, so the update (and the effective learning
rate) does not depend on how a batch is split into micro-batches or processes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F

from data_contracts.config import PromptConfig, SFTConfig
from gr2_core import distributed
from gr2_core.catalogue import Catalogue
from gr2_core.decoding import ANSWER, REASONING, answer_ids, explanation_body, fit_explanation
from gr2_core.generation import prompt_ids
from gr2_core.output import Log, StageOutput
from gr2_core.prompts import CoWatch, student_messages

LOG = logging.getLogger(__name__)


def token_weights(kinds: list[str | None], lambda_r: float, lambda_o: float) -> list[float]:
    """Per-token weights from per-token kinds (None: not trained)."""
    table = {REASONING: lambda_r, ANSWER: lambda_o, None: 0.0}
    return [table[k] for k in kinds]


def trained_tokens(weights: torch.Tensor) -> torch.Tensor:
    """Tokens with a loss (weight > 0) after the causal shift; weights (B, T)."""
    return (weights[:, 1:] > 0).sum()


def weighted_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor,
    normalizer: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Weighted next-token cross-entropy (see module docstring).

    logits (B, T, V); labels (B, T) with the token at t predicted from positions < t (the usual
    causal shift is applied here); weights (B, T), aligned with labels, 0 where not trained.
    `normalizer`: the trained-token count to divide by (the optimizer step's, in training);
    None: this batch's own count.
    """
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    shift_w = weights[:, 1:].float()
    ce = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1).clamp(min=0),
        reduction="none",
    ).view_as(shift_w)
    if normalizer is None:
        normalizer = trained_tokens(weights)
    return (ce * shift_w).sum() / torch.as_tensor(normalizer, dtype=ce.dtype).clamp(min=1)


# -- samples --------------------------------------------------------------------------------
def encode_sample(
    tok,
    messages: list[dict[str, str]],
    explanation: str,
    recommendations: list[str],
    lambda_r: float,
    lambda_o: float,
) -> dict[str, list]:
    """Token ids, labels and weights of one chat sample: prompt (weight 0), then the answer's
    segments tokenized one by one as the decoder writes them (`gr2_core.decoding`): the
    explanation lambda_r, the fixed segments, SIDs and EOS lambda_o."""
    ids = prompt_ids(tok, messages)
    kinds: list[str | None] = [None] * len(ids)
    answer, answer_kinds = answer_ids(tok, explanation, recommendations)
    ids += answer
    kinds += answer_kinds
    weights = token_weights(kinds, lambda_r, lambda_o)
    labels = [t if k is not None else -100 for t, k in zip(ids, kinds, strict=True)]
    return {"input_ids": ids, "labels": labels, "weights": weights}


class WeightedCollator:
    """Right-pads input_ids, labels (-100) and weights (0) of a batch."""

    def __init__(self, pad_id: int):
        self.pad = pad_id

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        out = {
            "input_ids": torch.full((len(rows), width), self.pad, dtype=torch.long),
            "labels": torch.full((len(rows), width), -100, dtype=torch.long),
            "weights": torch.zeros((len(rows), width), dtype=torch.float32),
            "attention_mask": torch.zeros((len(rows), width), dtype=torch.long),
        }
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            out["input_ids"][i, :n] = torch.tensor(r["input_ids"])
            out["labels"][i, :n] = torch.tensor(r["labels"])
            out["weights"][i, :n] = torch.tensor(r["weights"], dtype=torch.float32)
            out["attention_mask"][i, :n] = 1
        return out


def weighted_sft_trainer_class():
    """TRL's SFTTrainer with the decoupled-weight loss (imported lazily: TRL is heavy)."""
    from trl import SFTTrainer

    class WeightedSFTTrainer(SFTTrainer):
        """SFTTrainer whose loss is `weighted_lm_loss` over the batch's `weights`, normalised
        by the optimizer step's trained tokens on all processes (`num_items_in_batch`)."""

        # our loss already divides by the whole step's token count: no division by grad_accum
        loss_is_scaled_for_ga = True

        def _get_num_items_in_batch(self, batch_samples, device):
            count = sum(trained_tokens(b["weights"]) for b in batch_samples)
            count = torch.as_tensor(count, device=device)
            if self.args.world_size > 1:
                count = self.accelerator.gather(count).sum()
            return count

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            weights = inputs.pop("weights")
            labels = inputs.pop("labels")
            outputs = model(
                input_ids=inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
                use_cache=False,
            )
            loss = weighted_lm_loss(outputs.logits, labels, weights, num_items_in_batch)
            if num_items_in_batch is not None:  # DDP averages gradients over processes
                loss = loss * self.accelerator.num_processes
            return (loss, outputs) if return_outputs else loss

    return WeightedSFTTrainer


@distributed.relaunched("cfg")
def train_sft(
    model_dir,
    rows: list[dict],
    out_dir,
    cfg,
    tok,
    report_to: tuple[str, ...] = (),
    callbacks: tuple = (),
):
    """SFT with resume from the newest checkpoint in `out_dir/checkpoints`.

    `cfg`: an `SFTConfig`. Returns (model, log history). With `cfg.processes > 1` the same call
    runs in that many torchrun processes (`gr2_core.distributed`).
    """
    from datasets import Dataset
    from trl import SFTConfig as TRLConfig

    from gr2_core.training import common_args, load_trainable, resume_point

    model = load_trainable(model_dir, cfg.num_threads)
    ckpt = out_dir / "checkpoints"
    args = TRLConfig(
        output_dir=str(ckpt),
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        lr_scheduler_type="cosine",
        warmup_steps=cfg.lr_warmup_ratio,  # < 1: a fraction of the steps
        logging_steps=cfg.logging_steps,
        gradient_checkpointing=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        max_length=None,
        **common_args(cfg.seed, cfg.save_steps, report_to),
    )
    trainer = weighted_sft_trainer_class()(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        data_collator=WeightedCollator(tok.pad_token_id),
        processing_class=tok,
        callbacks=list(callbacks),
    )
    distributed.check_world(trainer.args.world_size, cfg.processes)
    trainer.train(resume_from_checkpoint=resume_point(ckpt))
    distributed.finish(trainer)
    return model, trainer.state.log_history


# -- evaluation -----------------------------------------------------------------------------
@dataclass(frozen=True)
class SFTInputs:
    mode: str  # the trace set: targeted or rejection
    traces: Path  # the traces stage's accepted `mode` traces
    attempts: Path  # the traces stage's `mode` attempts (named in the error when none passed)
    model: Path  # the midtrain stage's model folder
    items: Path  # the data stage's items
    sid_map: Path  # the semantic-ID stage's SID map
    sequences: Path  # the split stage's sequences (co-watch notes)
    prompt: PromptConfig  # the student prompt's settings


def run(
    inputs: SFTInputs,
    cfg: SFTConfig,
    out: Path,
    report_to: Sequence[str] = (),
    log: Log = LOG,
) -> StageOutput:
    """Stage `sft_<mode>`: decoupled-weight SFT of the mid-trained student on the accepted traces,
    each written as the student prompt and the teacher's answer; resumes from its newest
    checkpoint."""
    from transformers import AutoTokenizer

    mode = inputs.mode
    accepted = pl.read_parquet(inputs.traces)
    if accepted.is_empty():
        attempts = pl.scan_parquet(inputs.attempts).select(pl.len()).collect().item()
        raise ValueError(
            f"sft_{mode}: the teacher produced no accepted {mode} trace ({attempts} attempts, "
            f"file {inputs.attempts}); raise teacher.max_attempts or teacher.slates, or use a "
            "stronger teacher (teacher.base_url)"
        )
    tok = AutoTokenizer.from_pretrained(inputs.model)
    cat = Catalogue.build(pl.read_parquet(inputs.items), pl.read_parquet(inputs.sid_map))
    prompt = inputs.prompt
    cowatch = CoWatch(pl.read_parquet(inputs.sequences)) if prompt.cowatch_notes else None
    rows, dropped, cut, over_budget = [], 0, 0, 0
    prompt_lengths, explanation_lengths = [], []
    budget = prompt.max_explanation_tokens
    for r in accepted.iter_rows(named=True):
        explanation = fit_explanation(tok, r["explanation"], budget)
        if explanation is None:
            over_budget += 1
            continue
        cut += explanation != r["explanation"].strip()
        messages = student_messages(
            r["history"], r["candidates"], cat, prompt, cowatch, r["user_id"]
        )
        sample = encode_sample(
            tok, messages, explanation, r["recommendations"], cfg.lambda_r, cfg.lambda_o
        )
        if len(sample["input_ids"]) > cfg.max_length:
            dropped += 1
            continue
        rows.append(sample)
        body = tok(explanation_body(explanation), add_special_tokens=False)["input_ids"]
        explanation_lengths.append(len(body))
        prompt_lengths.append(
            sample["labels"].index(next(t for t in sample["labels"] if t != -100))
        )
    if not rows:
        raise ValueError(
            f"sft_{mode}: no trace left ({over_budget} with no sentence end within the "
            f"{budget}-token reasoning budget, {dropped} longer than sft.max_length); raise "
            "prompt.max_explanation_tokens or sft.max_length"
        )
    lengths = [len(r["input_ids"]) for r in rows]
    log.info(
        "sft_%s: %d samples (%d cut to the %d-token reasoning budget at a sentence end, %d "
        "dropped with no sentence end within it, %d dropped as too long), mean %.0f tokens "
        "(prompt %.0f); lambda_r %.2f, lambda_o %.2f",
        mode,
        len(rows),
        cut,
        budget,
        over_budget,
        dropped,
        sum(lengths) / len(lengths),
        sum(prompt_lengths) / len(prompt_lengths),
        cfg.lambda_r,
        cfg.lambda_o,
    )
    sample_text = tok.decode(rows[0]["input_ids"], skip_special_tokens=False)
    model, history = train_sft(inputs.model, rows, out, cfg, tok, report_to=tuple(report_to))
    model.save_pretrained(out / "model", safe_serialization=True)
    tok.save_pretrained(out / "model")
    (out / "log_history.json").write_text(json.dumps(history, indent=1))
    metrics = {"samples": float(len(rows)), "dropped_too_long": float(dropped)}
    metrics |= {"cut_to_budget": float(cut), "dropped_over_budget": float(over_budget)}
    metrics["tokens"] = float(sum(lengths))
    for name, values in (
        ("prompt_tokens", prompt_lengths),
        ("explanation_tokens", explanation_lengths),
    ):
        metrics[f"{name}_p50"] = float(np.percentile(values, 50))
        metrics[f"{name}_max"] = float(max(values))
    final = [r for r in history if "train_runtime" in r]
    if final:
        metrics["train_seconds"] = final[-1]["train_runtime"]
    losses = [r["loss"] for r in history if "loss" in r]
    if losses:
        metrics["first_train_loss"], metrics["final_train_loss"] = losses[0], losses[-1]
    return StageOutput(
        {"model": "model", "log_history": "log_history.json"},
        metrics,
        scratch=["checkpoints"],
        texts={"sample_0.txt": sample_text},
    )
