"""Decoupled-weight SFT loss: reasoning tokens weighted lambda_r, answer tokens lambda_o.

The assistant message is the answer JSON. Its tokens split into reasoning (the JSON up to and
including the explanation) and answer (from `"recommendations"` to the end, plus EOS); prompt
tokens are not trained. With per-token weights w_t (lambda_r, lambda_o, or 0):

    loss = sum_t w_t * CE_t / sum_t [w_t > 0]

i.e. the mean over trained tokens of the weighted cross-entropy, so lambda_r = lambda_o = 1 is
the ordinary SFT loss on the assistant message.
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F

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


def weighted_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Weighted next-token cross-entropy (see module docstring).

    logits (B, T, V); labels (B, T) with the token at t predicted from positions < t (the usual
    causal shift is applied here); weights (B, T), aligned with labels, 0 where not trained.
    """
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    shift_w = weights[:, 1:].float()
    ce = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1).clamp(min=0),
        reduction="none",
    ).view_as(shift_w)
    trained = (shift_w > 0).sum().clamp(min=1)
    return (ce * shift_w).sum() / trained
