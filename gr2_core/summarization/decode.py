"""CTC decoding: the collapse rule, greedy best path, and prefix beam search with length control.

Inputs are per-position log-probabilities `(T, C)` over a vocabulary whose index `blank` is the
CTC blank. A label sequence y is read off an alignment by merging repeated labels and then
dropping blanks; P(y) sums over every alignment that collapses to y. Greedy decoding takes the
best alignment (argmax per position); prefix beam search keeps, for each candidate prefix, the
probability of all alignments ending in blank and in non-blank, so it ranks label sequences by
(an approximation of) P(y) rather than by their single best alignment.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

NEG_INF = float("-inf")


def collapse(alignment: Sequence[int], blank: int = 0) -> list[int]:
    """Merge repeats, then drop blanks.

    >>> collapse([1, 1, 0, 1, 2, 2, 0, 0, 3], blank=0)
    [1, 1, 2, 3]
    """
    out: list[int] = []
    prev = None
    for a in alignment:
        if a != prev and a != blank:
            out.append(int(a))
        prev = a
    return out


def position_scores(log_probs: np.ndarray, blank: int = 0, span: int = 0) -> np.ndarray:
    """How likely each position is to emit a label (1 - P(blank)); with `span` > 0, half of it
    is the mean over the 2 * span + 1 positions around, which favours contiguous phrases."""
    p = 1 - np.exp(log_probs[:, blank])
    if span > 0:
        kernel = np.ones(2 * span + 1) / (2 * span + 1)
        p = 0.5 * p + 0.5 * np.convolve(p, kernel, mode="same")
    return p


def select_positions(
    log_probs: np.ndarray, length: int, blank: int = 0, span: int = 0
) -> list[int]:
    """Length control: the `length` positions most likely to emit a label, in input order."""
    order = np.argsort(-position_scores(log_probs, blank, span), kind="stable")
    return sorted(int(t) for t in order[:length])


def greedy(
    log_probs: np.ndarray,
    blank: int = 0,
    max_len: int | None = None,
    length: int | None = None,
    span: int = 0,
) -> list[int]:
    """Best-path decoding. With `max_len`, a longer output keeps the `max_len` labels whose
    emitting positions were most confident, in their original order. With `length` (length
    control), the output has up to `length` labels: the best non-blank label of each position
    chosen by `select_positions`, in input order (adjacent repeats merge).

    >>> lp = np.log(np.array([[0.6, 0.3, 0.1], [0.9, 0.05, 0.05], [0.4, 0.1, 0.5]]))
    >>> greedy(lp), greedy(lp, length=2)
    ([2], [1, 2])
    """
    if length is not None:
        nonblank = np.delete(log_probs, blank, axis=1)
        best = np.delete(np.arange(log_probs.shape[1]), blank)[nonblank.argmax(axis=1)]
        alignment = [blank] * log_probs.shape[0]
        for t in select_positions(log_probs, length, blank, span):
            alignment[t] = int(best[t])
        return collapse(alignment, blank)
    best = log_probs.argmax(axis=1)
    labels, scores = [], []
    prev = None
    for t, a in enumerate(best):
        if a != prev and a != blank:
            labels.append(int(a))
            scores.append(float(log_probs[t, a]))
        prev = a
    if max_len is not None and len(labels) > max_len:
        keep = sorted(np.argsort(scores)[::-1][:max_len])
        labels = [labels[i] for i in keep]
    return labels


def _lse(a: float, b: float) -> float:
    if a == NEG_INF:
        return b
    if b == NEG_INF:
        return a
    m = max(a, b)
    return m + math.log(math.exp(a - m) + math.exp(b - m))


def prefix_beam_search(
    log_probs: np.ndarray,
    beam: int = 8,
    blank: int = 0,
    prune: float = -12.0,
    top_k: int = 8,
    max_len: int | None = None,
    min_len: int = 0,
    length_bonus: float = 0.0,
) -> list[tuple[list[int], float]]:
    """CTC prefix beam search. Returns up to `beam` (labels, log P) pairs, best first, where
    log P is the summed probability of all alignments of the prefix that the beam kept (exact
    when no prefix was pruned).

    Per position only labels with log-prob above `prune` and among the `top_k` best are tried.
    Length control: prefixes never grow past `max_len`; the final ranking adds `length_bonus`
    per label (negative values favour shorter outputs) and puts outputs shorter than `min_len`
    after all others.
    """
    T, C = log_probs.shape
    # prefix -> (log P ending in blank, log P ending in non-blank)
    beams: dict[tuple[int, ...], tuple[float, float]] = {(): (0.0, NEG_INF)}
    for t in range(T):
        row = log_probs[t]
        k = min(top_k, C)
        cand = np.argpartition(-row, k - 1)[:k]
        cand = [int(c) for c in cand if row[c] >= prune or c == blank]
        if blank not in cand:
            cand.append(blank)
        nxt: dict[tuple[int, ...], list[float]] = defaultdict(lambda: [NEG_INF, NEG_INF])
        for prefix, (pb, pnb) in beams.items():
            total = _lse(pb, pnb)
            for c in cand:
                lp = float(row[c])
                if c == blank:
                    e = nxt[prefix]
                    e[0] = _lse(e[0], total + lp)
                    continue
                last = prefix[-1] if prefix else None
                if c == last:
                    # a repeat continues the prefix unless a blank separated it
                    e = nxt[prefix]
                    e[1] = _lse(e[1], pnb + lp)
                    if max_len is None or len(prefix) < max_len:
                        e2 = nxt[prefix + (c,)]
                        e2[1] = _lse(e2[1], pb + lp)
                elif max_len is None or len(prefix) < max_len:
                    e2 = nxt[prefix + (c,)]
                    e2[1] = _lse(e2[1], total + lp)
        alive = [kv for kv in nxt.items() if _lse(*kv[1]) > NEG_INF]  # impossible prefixes out
        ranked = sorted(alive, key=lambda kv: _lse(*kv[1]), reverse=True)[:beam]
        beams = {p: (v[0], v[1]) for p, v in ranked}

    def final(item):
        prefix, (pb, pnb) = item
        short = len(prefix) < min_len
        return (not short, _lse(pb, pnb) + length_bonus * len(prefix))

    ranked = sorted(beams.items(), key=final, reverse=True)
    return [(list(p), _lse(pb, pnb)) for p, (pb, pnb) in ranked]


def sequence_log_prob(log_probs: np.ndarray, labels: Sequence[int], blank: int = 0) -> float:
    """Exact log P(labels) by the CTC forward algorithm (used to check the beam search)."""
    T = log_probs.shape[0]
    ext = [blank]
    for lab in labels:
        ext += [lab, blank]
    S = len(ext)
    alpha = [NEG_INF] * S
    alpha[0] = float(log_probs[0, blank])
    if S > 1:
        alpha[1] = float(log_probs[0, ext[1]])
    for t in range(1, T):
        new = [NEG_INF] * S
        for s in range(S):
            a = alpha[s]
            if s >= 1:
                a = _lse(a, alpha[s - 1])
            if s >= 2 and ext[s] != blank and ext[s] != ext[s - 2]:
                a = _lse(a, alpha[s - 2])
            new[s] = a + float(log_probs[t, ext[s]]) if a != NEG_INF else NEG_INF
        alpha = new
    return _lse(alpha[-1], alpha[-2]) if S > 1 else alpha[-1]
