"""How an answer is written token by token: the fixed segments, budget forcing, the slate list.

An answer is one JSON object, written as fixed text segments around what the model chooses:

    OPEN  explanation  CLOSE  SID  SEP  SID ... SID  END  EOS
    {"explanation": "  ...  ", "recommendations": ["  <SID>  ", "  ...  "]}

SFT tokenizes every segment on its own (`answer_ids`), so the tokens that open, close and
punctuate an answer are the same in every training sample, and a decoder can recognise and
write them. `AnswerMachine` is that decoder's state for one sequence, whatever engine samples
the tokens (an HF logits processor here, `AnswerProcessor`; requests to a server elsewhere). It
says, before each token, which tokens may come next, and learns each chosen token:

- OPEN is written for the model;
- the explanation is the model's, except that it cannot end the answer inside it (EOS is
  banned); it ends when the model writes CLOSE's first token (`",`), or, once it holds
  `budget` tokens, CLOSE is written for it (budget forcing), so every answer reaches its list;
- free list: the model writes the list and its END (`"]}`), then EOS is written for it (END
  closes the JSON, so nothing after it could belong to the answer); after `list_budget` tokens
  END and EOS are written for it, so even a rambling list ends in parseable JSON;
- slate list (`slate` given): only SIDs of the slate not yet listed, punctuation written, so the
  list is a permutation of the slate (the constrained method);
- citations (`cite` given): a SID the explanation starts must be one of `cite` (the constrained
  method passes the slate and the history shown), and the budget never closes the explanation
  inside one; with `cite`, tokens that would break the JSON string (a quote, a backslash, a
  control character) are banned from the explanation too, so the answer is always valid;
- `stop_after_close`: the answer stops once the list is opened (scoring mode ranks the slate by
  the probability of each SID in that position instead of decoding the list).

Each position where exactly one token was allowed is recorded as forced (`forced`): the
machine, not the model, chose it, and RL masks it out of the loss.
"""

from __future__ import annotations

import json
import re
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from gr2_core.constrained import ConstraintError, SIDTrie
from gr2_core.semantic_ids.sidmap import SID_BEGIN

OPEN = '{"explanation": "'
CLOSE = '", "recommendations": ["'
SEP = '", "'
END = '"]}'
# kinds of the answer's tokens, for SFT's loss weights
REASONING, ANSWER = "reasoning", "answer"
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def explanation_body(explanation: str) -> str:
    """The explanation as it sits between the JSON quotes (escaped)."""
    return json.dumps(explanation, ensure_ascii=False)[1:-1]


def answer_segments(explanation: str, recommendations: Sequence[str]) -> list[tuple[str, str]]:
    """The answer as (text, kind) segments, tokenized one by one; they concatenate to the
    compact JSON `json.dumps` writes. The explanation is reasoning, the rest answer."""
    if not recommendations:
        raise ValueError("an answer lists at least one SID")
    segments = [(OPEN, ANSWER), (explanation_body(explanation), REASONING), (CLOSE, ANSWER)]
    for i, sid in enumerate(recommendations):
        segments += [(sid, ANSWER), (SEP if i + 1 < len(recommendations) else END, ANSWER)]
    return [(text, kind) for text, kind in segments if text]


def answer_text(explanation: str, recommendations: Sequence[str]) -> str:
    return "".join(text for text, _ in answer_segments(explanation, recommendations))


@dataclass(frozen=True)
class AnswerTokens:
    """The fixed segments' token ids under one tokenizer, and EOS."""

    open: tuple[int, ...]
    close: tuple[int, ...]
    sep: tuple[int, ...]
    end: tuple[int, ...]
    eos: int
    sid_begin: int | None = None  # the token that starts a SID, if the tokenizer has SIDs
    # tokens whose text would end or break a JSON string: a quote, a backslash, a control char
    unsafe: frozenset[int] = frozenset()

    @classmethod
    def of(cls, tok) -> AnswerTokens:
        key = (tok.name_or_path, len(tok), tok.eos_token_id)
        if key not in _FORMATS:
            _FORMATS[key] = cls._build(tok)
        return _FORMATS[key]

    @classmethod
    def _build(cls, tok) -> AnswerTokens:
        if tok.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token to end an answer with")
        texts = tok.batch_decode([[i] for i in range(len(tok))])  # about 0.4 s for 50k
        unsafe = frozenset(
            i for i, t in enumerate(texts) if '"' in t or "\\" in t or any(ord(c) < 32 for c in t)
        )

        def ids(text: str) -> tuple[int, ...]:
            return tuple(tok(text, add_special_tokens=False)["input_ids"])

        begin = tok.convert_tokens_to_ids(SID_BEGIN)
        begin = None if begin is None or begin == tok.unk_token_id else int(begin)
        return cls(ids(OPEN), ids(CLOSE), ids(SEP), ids(END), int(tok.eos_token_id), begin, unsafe)


_FORMATS: dict[tuple, AnswerTokens] = {}  # per tokenizer (name, size, EOS)


def answer_ids(tok, explanation: str, recommendations: Sequence[str]) -> tuple[list, list]:
    """Token ids of the answer and EOS, each segment tokenized on its own, and each token's kind."""
    ids: list[int] = []
    kinds: list[str] = []
    for text, kind in answer_segments(explanation, recommendations):
        seg = tok(text, add_special_tokens=False)["input_ids"]
        ids += seg
        kinds += [kind] * len(seg)
    return [*ids, tok.eos_token_id], [*kinds, ANSWER]


def fit_explanation(tok, explanation: str, budget: int) -> str | None:
    """The explanation cut to at most `budget` tokens (its escaped body, as SFT tokenizes it):
    itself when it fits, else its longest run of whole sentences that fits, else None (no
    sentence end early enough: the trace is dropped)."""

    def size(text: str) -> int:
        return len(tok(explanation_body(text), add_special_tokens=False)["input_ids"])

    text = explanation.strip()
    if size(text) <= budget:
        return text
    best = None
    for m in SENTENCE_END.finditer(text):
        head = text[: m.start()]
        if size(head) > budget:
            break
        best = head
    return best


class AnswerMachine:
    """Which tokens may come next in one answer (see the module docstring).

    `slate`: the SIDs' token ids, for a list constrained to a permutation of them (None: free
    list). `cite`: token ids of the SIDs the explanation may cite (None: any). `list_budget`:
    tokens a free list may take before it is closed. `allowed()` is None when any token but
    `banned()` may come, else the allowed ids; `push(token)` advances.
    """

    def __init__(
        self,
        fmt: AnswerTokens,
        budget: int,
        slate: Sequence[Sequence[int]] | None = None,
        list_budget: int = 128,
        stop_after_close: bool = False,
        cite: Sequence[Sequence[int]] | None = None,
    ):
        self.fmt = fmt
        self.budget = budget
        self.list_budget = list_budget
        self.stop_after_close = stop_after_close
        self.left = [tuple(s) for s in slate] if slate is not None else None
        self.queue: deque[int] = deque(fmt.open)
        self.phase = "explain"
        self.explained = 0  # explanation tokens so far
        self.listed = 0  # free-list tokens so far
        self.tail: deque[int] = deque(maxlen=len(fmt.end))  # the free list's last tokens
        self.sid: list[int] = []  # the slate SID being written
        self._trie: SIDTrie | None = None
        self.cite = SIDTrie(cite) if cite is not None and fmt.sid_begin is not None else None
        self.citing: list[int] | None = None  # the SID being cited in the explanation
        self._strict = (fmt.unsafe - {fmt.close[0]}) | {fmt.eos}
        self.forced_close = False  # the budget, not the model, closed the explanation
        if budget <= 0:
            self._close()

    @property
    def done(self) -> bool:
        return self.phase == "done" and not self.queue

    def max_tokens(self) -> int:
        """Tokens this answer can take at most (the engine's `max_new_tokens`)."""
        fmt = self.fmt
        head = len(fmt.open) + self.budget + len(fmt.close)
        if self.cite is not None:  # the budget can run out inside a citation
            head += 8
        if self.stop_after_close:
            return head + 1
        if self.left is None:
            return head + self.list_budget + len(fmt.end) + 1
        sids = sum(len(s) for s in self.left)
        return head + sids + (len(self.left) - 1) * len(fmt.sep) + len(fmt.end) + 1

    def banned(self) -> tuple[int, ...] | frozenset[int]:
        if self.phase != "explain" or self.queue:
            return ()
        if self.cite is None:
            return (self.fmt.eos,)
        return self._strict

    def free_run(self) -> tuple[int, tuple[int, ...]]:
        """When `allowed()` is None, for an engine that samples several tokens per call: how
        many may come before the machine intervenes, and the tokens that end the stretch (the
        machine may change state after them: the engine stops there, the token included, and
        asks again)."""
        if self.phase == "explain":
            stops = (self.fmt.close[0],)
            if self.cite is not None:
                stops += (self.fmt.sid_begin,)
            return max(self.budget - self.explained, 1), stops
        return max(self.list_budget - self.listed, 1), (self.fmt.eos, self.fmt.end[-1])

    def allowed(self) -> tuple[int, ...] | None:
        if self.queue:
            return (self.queue[0],)
        if self.phase == "done":
            return (self.fmt.eos,)
        if self.phase == "explain" and self.citing is not None:
            nxt = self.cite.allowed(self.citing)
            if not nxt:
                raise ConstraintError(f"the cited SID prefix {self.citing} leads nowhere")
            return tuple(nxt)
        if self.phase == "list" and self.left is not None:
            if self._trie is None:
                self._trie = SIDTrie(self.left)
            nxt = self._trie.allowed(self.sid)
            if not nxt:
                raise ConstraintError(f"the list's SID prefix {self.sid} leads nowhere")
            return tuple(nxt)
        return None

    def push(self, token: int) -> None:
        allowed = self.allowed()
        if (allowed is not None and token not in allowed) or token in self.banned():
            raise ConstraintError(f"token {token} was not allowed here ({self.phase})")
        if self.queue:
            self.queue.popleft()
        elif self.phase == "explain":
            if token == self.fmt.close[0] and self.citing is None:
                self._close(written=1)
                return
            self.explained += 1
            if self.cite is not None:
                if self.citing is not None:
                    self.citing.append(token)
                elif token == self.fmt.sid_begin:
                    self.citing = [token]
                if self.citing is not None and self.cite.allowed(self.citing) == []:
                    self.citing = None  # a whole SID cited
            if self.explained >= self.budget and self.citing is None:
                self.forced_close = True
                self._close()
        elif self.phase == "list" and self.left is None:
            if token == self.fmt.eos:
                self.phase = "done"
            else:
                self.listed += 1
                self.tail.append(token)
                if tuple(self.tail) == self.fmt.end:  # the model closed its list
                    self._finish(written=len(self.fmt.end))
                elif self.listed >= self.list_budget:
                    self._finish()
        elif self.phase == "list":
            self.sid.append(token)
            if self._trie.allowed(self.sid) == []:  # a whole SID
                self.left.remove(tuple(self.sid))
                self.sid, self._trie = [], None
                if self.left:
                    self.queue.extend(self.fmt.sep)
                else:
                    self._finish()

    def _close(self, written: int = 0) -> None:
        self.queue.extend(self.fmt.close[written:])
        self.phase = "done" if self.stop_after_close else "list"

    def _finish(self, written: int = 0) -> None:
        self.queue.extend((*self.fmt.end[written:], self.fmt.eos))
        self.phase = "done"


class AnswerProcessor:
    """HF `LogitsProcessor` driving one `AnswerMachine` per row of the generation batch (rows =
    prompts x samples per prompt). `forced[row]` lists, per generated position, whether only one
    token was allowed there."""

    def __init__(self, machines: Sequence[AnswerMachine]):
        self.machines = list(machines)
        self.calls = 0
        self.forced: list[list[bool]] = [[] for _ in self.machines]

    def __call__(self, input_ids, scores):
        if input_ids.shape[0] != len(self.machines):
            raise ValueError(f"{input_ids.shape[0]} rows for {len(self.machines)} answers")
        last = input_ids[:, -1].tolist()
        for row, m in enumerate(self.machines):
            if self.calls and not m.done:
                m.push(last[row])
            if m.done:  # finished rows are padded by generate; keep them on EOS
                allowed: tuple[int, ...] | None = (m.fmt.eos,)
            else:
                allowed = m.allowed()
                self.forced[row].append(allowed is not None and len(allowed) == 1)
            if allowed is None:
                banned = list(m.banned())
                if banned:
                    scores[row, banned] = float("-inf")
            else:
                keep = scores[row, list(allowed)].clone()
                scores[row] = float("-inf")
                scores[row, list(allowed)] = keep
        self.calls += 1
        return scores
