"""Decoupled-weight SFT loss: reasoning tokens weighted lambda_r, answer tokens lambda_o.

The assistant message is the answer JSON. Its tokens split into reasoning (the JSON up to and
including the explanation) and answer (from `"recommendations"` to the end, plus EOS); prompt
tokens are not trained. With per-token weights w_t (lambda_r, lambda_o, or 0):

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
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import torch
import torch.nn.functional as F

from data_contracts.config import PromptConfig, SFTConfig
from gr2_core.catalogue import Catalogue
from gr2_core.output import Log, StageOutput
from gr2_core.prompts import CoWatch, student_messages

LOG = logging.getLogger(__name__)

REASONING, ANSWER = "reasoning", "answer"


def answer_segments(explanation: str, recommendations: list[str]) -> list[tuple[str, str]]:
    """The assistant JSON as (text, kind) segments that concatenate to the compact JSON."""
    head = '{"explanation": ' + json.dumps(explanation, ensure_ascii=False) + ", "
    tail = '"recommendations": ' + json.dumps(recommendations, ensure_ascii=False) + "}"
    return [(head, REASONING), (tail, ANSWER)]


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
    """Token ids, labels and weights of one chat sample: prompt (weight 0), then the assistant
    JSON (reasoning segment lambda_r, answer segment lambda_o) and EOS (answer weight)."""
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    kinds: list[str | None] = [None] * len(ids)
    for text, kind in answer_segments(explanation, recommendations):
        seg = tok(text, add_special_tokens=False)["input_ids"]
        ids += seg
        kinds += [kind] * len(seg)
    ids.append(tok.eos_token_id)
    kinds.append(ANSWER)
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

    `cfg`: an `SFTConfig`. Returns (model, log history).
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
    trainer.train(resume_from_checkpoint=resume_point(ckpt))
    return model, trainer.state.log_history


# -- evaluation -----------------------------------------------------------------------------
def generate_answers(
    model,
    tok,
    prompts: list[list[dict]],
    batch_size: int,
    max_new_tokens: int,
    progress=None,
) -> tuple[list[str], list[float]]:
    """Greedy answers for chat prompts in left-padded batches; seconds per prompt (batch time /
    batch size)."""
    import time

    side = tok.padding_side
    tok.padding_side = "left"
    texts, seconds = [], []
    try:
        for b in range(0, len(prompts), batch_size):
            chunk = [
                tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
                for m in prompts[b : b + batch_size]
            ]
            enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(model.device) for k, v in enc.items()}
            start = time.perf_counter()
            with torch.no_grad():
                out = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tok.pad_token_id,
                )
            took = (time.perf_counter() - start) / len(chunk)
            for row in out[:, enc["input_ids"].shape[1] :]:
                texts.append(
                    tok.decode(row, skip_special_tokens=False)
                    .split(tok.eos_token)[0]
                    .replace(tok.pad_token or "", "")
                )
                seconds.append(took)
            if progress:
                progress(len(texts), len(prompts))
    finally:
        tok.padding_side = side
    return texts, seconds


EXPLANATION_RE = re.compile(r'\{\s*"explanation"\s*:\s*"((?:[^"\\]|\\.)*)"')


def _explanation(text: str) -> str:
    """The explanation string of a (possibly unfinished) answer, or '' if there is none."""
    m = EXPLANATION_RE.search(text)
    if not m:
        return ""
    try:
        return json.loads(f'"{m.group(1)}"')
    except json.JSONDecodeError:
        return m.group(1)


def constrained_answer_list(model, tok, prefix_ids: list[int], slate: list[str]) -> list[str]:
    """Greedy decoding of the recommendations, constrained to a permutation of `slate`.

    `prefix_ids` ends just before the first SID (the answer's `"recommendations": ["`). At each
    step only tokens that continue a SID of the slate not yet chosen are allowed (a trie over
    their token ids); after a SID the separator tokens are appended as the training data had
    them (`", "`, or `"]}` after the last). Returns the chosen SIDs in order.
    """
    from gr2_core.constrained import SIDTrie

    sid_ids = {s: tok(s, add_special_tokens=False)["input_ids"] for s in slate}
    sep = tok('", "', add_special_tokens=False)["input_ids"]
    device = model.device
    with torch.no_grad():
        out = model(torch.tensor([prefix_ids], device=device), use_cache=True)
        past, logits = out.past_key_values, out.logits[0, -1]
        left, chosen = list(slate), []
        while left:
            trie = SIDTrie(sid_ids[s] for s in left)
            got: list[int] = []
            while True:
                allowed = trie.allowed(got)
                if not allowed:
                    break
                mask = torch.full_like(logits, float("-inf"))
                mask[allowed] = 0
                t = int((logits + mask).argmax())
                got.append(t)
                out = model(
                    torch.tensor([[t]], device=device), past_key_values=past, use_cache=True
                )
                past, logits = out.past_key_values, out.logits[0, -1]
            sid = next(s for s in left if sid_ids[s] == got)
            chosen.append(sid)
            left.remove(sid)
            if left:
                out = model(
                    torch.tensor([sep], device=device), past_key_values=past, use_cache=True
                )
                past, logits = out.past_key_values, out.logits[0, -1]
    return chosen


def constrained_answers(
    model, tok, prompts: list[list[dict]], slates: list[list[str]], free_texts: list[str]
) -> tuple[list[str], list[float]]:
    """Answers whose recommendation list is decoded constrained to the slate's SIDs.

    The explanation is the one of the free answer (`free_texts`, from `generate_answers`; empty
    if it has none); the list is then decoded by `constrained_answer_list` after the canonical
    answer prefix, so every answer is a permutation of its slate. Returns (texts, seconds of the
    constrained part per slate).
    """
    import time

    texts, seconds = [], []
    for messages, slate, free in zip(prompts, slates, free_texts, strict=True):
        start = time.perf_counter()
        explanation = _explanation(free)
        prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        head = answer_segments(explanation, [])[0][0]
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        ids += tok(head, add_special_tokens=False)["input_ids"]
        ids += tok('"recommendations": ["', add_special_tokens=False)["input_ids"]
        recs = constrained_answer_list(model, tok, ids, slate)
        answer = {"explanation": explanation, "recommendations": recs}
        texts.append(json.dumps(answer, ensure_ascii=False))
        seconds.append(time.perf_counter() - start)
    return texts, seconds


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
    rows, dropped = [], 0
    for r in accepted.iter_rows(named=True):
        sample = encode_sample(
            tok,
            student_messages(r["history"], r["candidates"], cat, prompt, cowatch, r["user_id"]),
            r["explanation"],
            r["recommendations"],
            cfg.lambda_r,
            cfg.lambda_o,
        )
        if len(sample["input_ids"]) > cfg.max_length:
            dropped += 1
            continue
        rows.append(sample)
    if not rows:
        raise ValueError(f"sft_{mode}: every sample is longer than sft.max_length")
    lengths = [len(r["input_ids"]) for r in rows]
    log.info(
        "sft_%s: %d samples (%d dropped as too long), mean %.0f tokens; lambda_r %.2f, "
        "lambda_o %.2f",
        mode,
        len(rows),
        dropped,
        sum(lengths) / len(lengths),
        cfg.lambda_r,
        cfg.lambda_o,
    )
    sample_text = tok.decode(rows[0]["input_ids"], skip_special_tokens=False)
    model, history = train_sft(inputs.model, rows, out, cfg, tok, report_to=tuple(report_to))
    model.save_pretrained(out / "model", safe_serialization=True)
    tok.save_pretrained(out / "model")
    (out / "log_history.json").write_text(json.dumps(history, indent=1))
    metrics = {"samples": float(len(rows)), "dropped_too_long": float(dropped)}
    metrics["tokens"] = float(sum(lengths))
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
