"""Constrained SID decoding: a trie of valid SIDs as a logits processor for (beam) search.

At every step each beam may only continue with a token that keeps its generated suffix a prefix
of some valid SID; after a complete SID only EOS is allowed. When a beam has no allowed token
(its prefix is not in the trie, e.g. a forced or corrupted prefix), the processor raises
`ConstraintError` instead of silently letting the model decode unconstrained, a bug seen in
other implementations.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch


class ConstraintError(RuntimeError):
    """A beam reached a state from which no valid SID can be completed."""


class SIDTrie:
    """Prefix tree over token-id sequences of valid SIDs."""

    END = -1

    def __init__(self, sequences: Iterable[Sequence[int]]):
        self.root: dict = {}
        self.size = 0
        for seq in sequences:
            node = self.root
            for t in seq:
                node = node.setdefault(int(t), {})
            if self.END not in node:
                node[self.END] = {}
                self.size += 1

    def allowed(self, prefix: Sequence[int]) -> list[int] | None:
        """Next token ids after `prefix` ([] when complete); None if `prefix` is off the trie."""
        node = self.root
        for t in prefix:
            node = node.get(int(t))
            if node is None:
                return None
        return [t for t in node if t != self.END]


class SIDLogitsProcessor:
    """Masks every token that cannot continue a valid SID (HF `LogitsProcessor` protocol)."""

    def __init__(self, trie: SIDTrie, prompt_length: int, eos_token_id: int, forced: int = 0):
        """`forced`: how many SID tokens after the prompt were given, not generated."""
        self.trie, self.prompt_length, self.eos = trie, prompt_length, eos_token_id
        self.forced = forced

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        mask = torch.full_like(scores, float("-inf"))  # (beams, vocab)
        for row, ids in enumerate(input_ids[:, self.prompt_length :].tolist()):
            if ids and ids[-1] == self.eos:
                mask[row, self.eos] = 0.0  # finished beam: keep it finished
                continue
            allowed = self.trie.allowed(ids)
            if allowed is None:
                if self.trie.allowed(ids[: self.forced]) is None:
                    raise ConstraintError(
                        f"prefix {ids[: self.forced]} is not a prefix of any valid SID"
                    )
                # a beam that beam search filled with a masked (-inf) token when fewer valid
                # continuations than beams existed: it is already dead, let it end
                mask[row, self.eos] = 0.0
                continue
            mask[row, allowed or [self.eos]] = 0.0
        return scores + mask


def constrained_generate(
    model,
    prompt_ids: torch.Tensor | Sequence[Sequence[int]],
    trie: SIDTrie,
    eos_token_id: int,
    num_beams: int = 10,
    max_new_tokens: int = 8,
    prefix: Sequence[int] = (),
    pad_token_id: int | None = None,
) -> list[list[int]] | list[list[list[int]]]:
    """Beam search over valid SIDs, best first.

    `prompt_ids`: one prompt as a (1, T) tensor -> its `num_beams` token sequences (no EOS); or a
    list of prompts (left-padded into one batch) -> one such list per prompt.
    """
    if num_beams > trie.size:
        raise ValueError(f"{num_beams} beams but only {trie.size} valid SIDs")
    single = isinstance(prompt_ids, torch.Tensor)
    prompts = [prompt_ids[0].tolist()] if single else [list(p) for p in prompt_ids]
    prompts = [p + list(prefix) for p in prompts]
    pad = eos_token_id if pad_token_id is None else pad_token_id
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    start = width - len(prefix)
    processor = SIDLogitsProcessor(trie, start, eos_token_id, forced=len(prefix))
    out = model.generate(
        ids.to(model.device),
        attention_mask=mask.to(model.device),
        logits_processor=[processor],
        num_beams=num_beams,
        num_return_sequences=num_beams,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos_token_id,
        pad_token_id=pad,
    )
    flat = [[t for t in seq if t != eos_token_id] for seq in out[:, start:].tolist()]
    invalid = [r for r in flat if trie.allowed(r) != []]
    if invalid:  # never hand back an unconstrained or incomplete sequence
        raise ConstraintError(f"{len(invalid)} of {len(flat)} beams are not complete SIDs")
    grouped = [flat[i : i + num_beams] for i in range(0, len(flat), num_beams)]
    return grouped[0] if single else grouped
