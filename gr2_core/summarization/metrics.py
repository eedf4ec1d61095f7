"""Summary quality and order: ROUGE-1/2/L F1 (word level, or character level for Chinese) and an
order-preservation score.

ROUGE comes from Google's `rouge-score` package. Its default tokenizer keeps only [a-z0-9]
(Chinese text would vanish), so the character mode passes a tokenizer that keeps every
non-space character as a token.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
from rouge_score import rouge_scorer
from rouge_score.tokenizers import Tokenizer

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
_WORD = re.compile(r"[a-z0-9]+")


class CharTokenizer(Tokenizer):
    """Every non-space character is a token (Chinese ROUGE is computed on characters)."""

    def tokenize(self, text: str) -> list[str]:
        return [c for c in text.lower() if not c.isspace()]


def rouge_scores(
    references: Sequence[str], predictions: Sequence[str], level: str = "word"
) -> dict[str, np.ndarray]:
    """Per-pair F1 of ROUGE-1/2/L. `level`: "word" (English, Porter stemming as in the usual
    setup) or "char" (Chinese and other unsegmented scripts).

    >>> r = rouge_scores(["the cat sat"], ["the cat ran"])
    >>> round(float(r["rouge1"][0]), 4), round(float(r["rouge2"][0]), 4)
    (0.6667, 0.5)
    """
    if len(references) != len(predictions):
        raise ValueError(f"{len(references)} references but {len(predictions)} predictions")
    if level == "word":
        scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    elif level == "char":
        scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), tokenizer=CharTokenizer())
    else:
        raise ValueError(f"unknown ROUGE level {level!r}; expected 'word' or 'char'")
    out = {t: np.zeros(len(references)) for t in ROUGE_TYPES}
    for i, (ref, pred) in enumerate(zip(references, predictions, strict=True)):
        scores = scorer.score(ref, pred)
        for t in ROUGE_TYPES:
            out[t][i] = scores[t].fmeasure
    return out


def kendall_tau(positions: Sequence[int]) -> float:
    """Kendall's tau-a between list order (0, 1, 2, ...) and `positions`: +1 when the positions
    increase along the list, -1 when they decrease; NaN for fewer than two items.

    >>> kendall_tau([1, 5, 9]), kendall_tau([9, 5, 1]), kendall_tau([3])
    (1.0, -1.0, nan)
    """
    p = np.asarray(positions, dtype=float)
    n = len(p)
    if n < 2:
        return float("nan")
    diff = np.sign(p[None, :] - p[:, None])  # diff[i, j] = sign(p_j - p_i)
    upper = np.triu(diff, k=1)
    return float(upper.sum() / (n * (n - 1) / 2))


def tokens(text: str, level: str = "word") -> list[str]:
    """Lower-cased alphanumeric words, or characters in the "char" level."""
    if level == "char":
        return [c for c in text.lower() if not c.isspace()]
    return _WORD.findall(text.lower())


def matched_positions(summary: str, source: str, level: str = "word") -> list[int]:
    """Source position of each summary token found in the source, in summary order: the nearest
    unused occurrence at or after the previous match, else the first unused one anywhere (so an
    in-order copy maps to increasing positions and a reordering shows up as an inversion)."""
    src = tokens(source, level)
    where: dict[str, list[int]] = {}
    for i, tok in enumerate(src):
        where.setdefault(tok, []).append(i)
    used: set[int] = set()
    out: list[int] = []
    last = -1
    for tok in tokens(summary, level):
        free = [i for i in where.get(tok, []) if i not in used]
        if not free:
            continue
        after = [i for i in free if i > last]
        pos = after[0] if after else free[0]
        used.add(pos)
        out.append(pos)
        last = pos
    return out


def order_score(summary: str, source: str, level: str = "word") -> float:
    """Kendall tau between a summary's token order and the source positions of its matched
    tokens (NaN when fewer than two tokens match)."""
    return kendall_tau(matched_positions(summary, source, level))
