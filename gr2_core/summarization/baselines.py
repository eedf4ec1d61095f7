"""Baselines for the CTC summarizer: Lead-N and a zero-shot instruction-tuned LLM.

Every system sees the same input: the document truncated to `max_source_words` words.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from gr2_core.summarization.data import truncate_words


def lead_n(document: str, n_words: int) -> str:
    """The first `n_words` words of the document.

    >>> lead_n("a b c d", 2)
    'a b'
    """
    return " ".join(document.split()[:n_words])


def lead_words(summaries: Sequence[str]) -> int:
    """N for Lead-N: the median length in words of the training summaries."""
    return max(1, int(np.median([len(s.split()) for s in summaries])))


ASPECT_QUESTIONS = {
    "challenge": "the problem or challenge the paper addresses",
    "approach": "the approach or method the paper proposes",
    "outcome": "the main outcome or result of the paper",
}


def llm_prompt(document: str, aspect: str) -> list[dict[str, str]]:
    what = ASPECT_QUESTIONS.get(aspect, aspect or "the text")
    return [
        {
            "role": "user",
            "content": f"{document}\n\nIn one sentence, summarize {what}.",
        }
    ]


@dataclass
class Timed:
    """Outputs with the seconds each took (one document at a time)."""

    outputs: list[str]
    seconds: list[float]


def timed(fn, items: Sequence, desc: str) -> Timed:
    outs, secs = [], []
    for item in tqdm(items, desc=desc, leave=False):
        t0 = time.perf_counter()
        outs.append(fn(item))
        secs.append(time.perf_counter() - t0)
    return Timed(outs, secs)


class LLMSummarizer:
    """Zero-shot summaries from a chat LLM (default: the packaged SmolLM2-135M-Instruct, the
    reranker pipeline's student), greedy decoding, one document at a time."""

    def __init__(self, source: str | None, max_new_tokens: int, num_threads: int):
        from gr2_core.models import load_source

        torch.set_num_threads(num_threads)
        self.model, self.tok = load_source(source)
        self.model.eval()
        self.max_new_tokens = max_new_tokens

    @torch.no_grad()
    def __call__(self, document: str, aspect: str) -> str:
        text = self.tok.apply_chat_template(
            llm_prompt(document, aspect), tokenize=False, add_generation_prompt=True
        )
        enc = self.tok(text, return_tensors="pt")
        out = self.model.generate(
            **enc,
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            pad_token_id=self.tok.pad_token_id or self.tok.eos_token_id,
        )
        reply = self.tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        return " ".join(reply.split())


def truncated(documents: Sequence[str], max_words: int) -> list[str]:
    return [truncate_words(d, max_words) for d in documents]
