"""The SID map: learned prefix codes + an assigned last level, token strings, stable updates.

Assigned last level (the paper's fifth technique): within each group of items that share the
learned prefix, items get distinct last codes 0, 1, 2, ... in item-id order, so every SID is
unique by construction. A group larger than the last codebook cannot be coded and fails with the
prefix named. On retraining, existing items keep their SIDs; a new item gets its prefix from the
frozen codebooks and the smallest last code not yet taken inside that prefix.

Token format: `<|sid_begin|><s_a_97><s_b_168><s_c_137><s_d_135><|sid_end|>`, one token per
(level, code), levels lettered a, b, c, ...
"""

from __future__ import annotations

import re
import string
from collections import defaultdict

import numpy as np
import polars as pl

SID_BEGIN = "<|sid_begin|>"
SID_END = "<|sid_end|>"
_TOKEN = re.compile(r"<s_([a-z])_(\d+)>")


class PrefixOverflowError(ValueError):
    """More items share a learned prefix than the last level has codes."""


def level_letter(level: int) -> str:
    return string.ascii_lowercase[level]


def sid_tokens(levels: int, codebook_sizes: list[int]) -> list[str]:
    """Every SID token to add to a vocabulary: markers, then one per (level, code)."""
    out = [SID_BEGIN, SID_END]
    for lvl in range(levels):
        out += [f"<s_{level_letter(lvl)}_{c}>" for c in range(codebook_sizes[lvl])]
    return out


def encode_sid(codes: list[int] | np.ndarray) -> str:
    """[97, 168, 137, 135] -> '<|sid_begin|><s_a_97><s_b_168><s_c_137><s_d_135><|sid_end|>'."""
    body = "".join(f"<s_{level_letter(i)}_{int(c)}>" for i, c in enumerate(codes))
    return f"{SID_BEGIN}{body}{SID_END}"


def decode_sid(sid: str) -> list[int]:
    """Inverse of `encode_sid`; raises ValueError on anything malformed."""
    if not (sid.startswith(SID_BEGIN) and sid.endswith(SID_END)):
        raise ValueError(f"not a SID (missing markers): {sid!r}")
    body = sid[len(SID_BEGIN) : -len(SID_END)]
    tokens = _TOKEN.findall(body)
    if "".join(f"<s_{a}_{c}>" for a, c in tokens) != body or not tokens:
        raise ValueError(f"malformed SID body: {sid!r}")
    letters = [a for a, _ in tokens]
    if letters != [level_letter(i) for i in range(len(tokens))]:
        raise ValueError(f"SID levels out of order: {sid!r}")
    return [int(c) for _, c in tokens]


def assign_last_level(item_ids: list[str], prefixes: np.ndarray, last_size: int) -> np.ndarray:
    """(N, L) learned codes -> (N, L+1) codes with a distinct last code inside each prefix."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for row in np.argsort(np.asarray(item_ids, dtype=object), kind="stable"):
        groups[tuple(prefixes[row].tolist())].append(int(row))
    last = np.zeros(len(item_ids), dtype=np.int64)
    for prefix, rows in groups.items():
        if len(rows) > last_size:
            raise PrefixOverflowError(_overflow_message(prefix, len(rows), last_size))
        last[rows] = np.arange(len(rows))
    return np.concatenate([prefixes.astype(np.int64), last[:, None]], axis=1)


def _overflow_message(prefix: tuple, size: int, last_size: int) -> str:
    return (
        f"{size} items share the learned prefix {list(prefix)} but the last level has only "
        f"{last_size} codes: raise semantic_ids.last_level_size to at least {size}, or make "
        "the learned levels more discriminative (more levels, larger codebooks, EMA, "
        "dead-code reset)"
    )


def build_sid_map(item_ids: list[str], codes: np.ndarray, version: str) -> pl.DataFrame:
    """The SID map table (item_id, codes, sid, version) from full (N, L+1) codes."""
    return pl.DataFrame(
        {
            "item_id": item_ids,
            "codes": [list(map(int, c)) for c in codes],
            "sid": [encode_sid(c) for c in codes],
            "version": [version] * len(item_ids),
        },
        schema={"item_id": pl.Utf8, "codes": pl.List(pl.Int64), "sid": pl.Utf8, "version": pl.Utf8},
    )


def extend_sid_map(
    existing: pl.DataFrame, new_ids: list[str], new_prefixes: np.ndarray, last_size: int
) -> pl.DataFrame:
    """Add items to a SID map without changing any existing SID.

    `new_prefixes` (M, L) are the new items' learned codes from the frozen tokenizer. Items
    already in the map are skipped (their SID never changes).
    """
    version = existing["version"][0] if existing.height else "v1"
    known = set(existing["item_id"].to_list())
    taken: dict[tuple, set[int]] = defaultdict(set)
    for codes in existing["codes"].to_list():
        taken[tuple(codes[:-1])].add(codes[-1])
    rows_ids, rows_codes = [], []
    order = np.argsort(np.asarray(new_ids, dtype=object), kind="stable")
    for i in order:
        item = new_ids[i]
        if item in known:
            continue
        prefix = tuple(int(c) for c in new_prefixes[i])
        used = taken[prefix]
        free = next((c for c in range(last_size) if c not in used), None)
        if free is None:
            raise PrefixOverflowError(_overflow_message(prefix, len(used) + 1, last_size))
        used.add(free)
        known.add(item)
        rows_ids.append(item)
        rows_codes.append([*prefix, free])
    if not rows_ids:
        return existing
    return pl.concat([existing, build_sid_map(rows_ids, np.array(rows_codes), version)])


def code_stats(codes: np.ndarray, sizes: list[int]) -> dict[str, float]:
    """Per-level utilisation and perplexity, and uniqueness of the learned prefix."""
    out: dict[str, float] = {}
    n, levels = codes.shape
    for lvl in range(levels):
        counts = np.bincount(codes[:, lvl], minlength=sizes[lvl])
        p = counts[counts > 0] / n
        out[f"level{lvl}/utilisation"] = float((counts > 0).sum() / sizes[lvl])
        out[f"level{lvl}/perplexity"] = float(np.exp(-(p * np.log(p)).sum()))
    out["prefix_uniqueness"] = float(len({tuple(r) for r in codes.tolist()}) / n) if n else 0.0
    return out
