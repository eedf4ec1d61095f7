"""Verifiable ranking rewards for RL (SPEC section 5), as TRL reward functions.

Notation, for one completion on slate D (|D| candidates, the user's next item among them):
  r_D  the target's 1-based rank in the input slate (the pre-ranker's order),
  r_o  its 1-based rank in the answer's `recommendations`.

  R_rank = (r_D - r_o) / |D|                    rank improvement, in (-1, 1)
  R_fmt  = 1 if the answer is rankable else 0   strict JSON contract, a permutation of D
  unconditional:  R = R_rank + alpha * R_fmt
  conditional:    R = R_rank + alpha * R_fmt   if R_rank > 0, or r_D = r_o = 1
                  R = R_rank                   otherwise
  R = -1 when the answer is not rankable: broken JSON, text around it, the wrong schema, a list
  that is not a permutation of D (duplicate, missing, extra or unknown SIDs), or output cut off
  at the length limit. A list that is not a permutation has no r_o, and scoring it any higher
  than -1 would pay for partial lists (e.g. only the target), so it is treated like broken JSON.

The unconditional form pays alpha for copying the input order (R_rank = 0, valid format), which
is the reward hack the paper reports; the conditional form pays the format bonus only with an
improvement, or when the target already leads and stays first (keeping it there is the right
answer). Paying it whenever r_D = 1, whatever the answer does, would make demoting a correct
top-1 cost only 1/|D| - alpha: on MovieLens slates, where the pre-ranker's first candidate is
the target about twice as often as its second, a blind "swap the first two" policy then earns
more than copying the input while it lowers NDCG (tests/test_rewards.py measures both).

Each reward is a picklable callable class following TRL's contract: called with `completions`
(strings or chat messages), the dataset columns `slate` (candidate SIDs, input order) and
`target` (the target's SID) as lists, optionally `completion_ids`, and returns one float per
completion. None of them raises on any completion text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gr2_core.prompts import check_answer

TRUNCATED = "truncated"


@dataclass(frozen=True)
class Judgement:
    """What one completion says about its slate: rankable or why not, and the two ranks."""

    reason: str  # "ok", "truncated", or the filter's rejection reason (see prompts.REASONS)
    input_rank: int  # r_D (0 if the target is not in the slate)
    output_rank: int  # r_o (0 if not rankable)
    identity: bool  # rankable and equal to the input order
    size: int  # |D|

    @property
    def rankable(self) -> bool:
        return self.reason == "ok"


def completion_text(completion) -> str:
    """The text of a completion: a string, or the last message of a chat completion."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    return str(completion)


def judge(
    text: str,
    slate: Sequence[str],
    target: str,
    truncated: bool = False,
    known_sids: frozenset[str] | None = None,
) -> Judgement:
    """Check `text` with the teacher filter's rules (`prompts.check_answer`, no top-1 rule) and
    place the target.

    `known_sids` given: every SID listed or cited must be a known item, as in the filter.

    >>> judge('{"explanation": "", "recommendations": ["b", "a", "c"]}', ["a", "b", "c"], "b")
    Judgement(reason='ok', input_rank=2, output_rank=1, identity=False, size=3)
    >>> judge('{"explanation": "", "recommendations": ["b", "b"]}', ["a", "b"], "b").reason
    'duplicate'
    """
    slate = list(slate)
    r_d = slate.index(target) + 1 if target in slate else 0
    if truncated:
        return Judgement(TRUNCATED, r_d, 0, False, len(slate))
    verdict = check_answer(text, slate, known_sids)  # the teacher filter's rules, no top-1 rule
    if not verdict.accepted:
        return Judgement(verdict.reason, r_d, 0, False, len(slate))
    recs = verdict.answer.recommendations
    r_o = recs.index(target) + 1 if target in recs else 0
    return Judgement("ok", r_d, r_o, recs == slate, len(slate))


def rank_reward(j: Judgement) -> float:
    """R_rank = (r_D - r_o) / |D| for a rankable answer with the target in the slate, else 0.

    >>> rank_reward(Judgement("ok", 4, 1, False, 10))
    0.3
    """
    if not j.rankable or j.input_rank == 0 or j.size == 0:
        return 0.0
    return (j.input_rank - j.output_rank) / j.size


def format_reward(j: Judgement) -> float:
    """R_fmt = 1 for a rankable answer, else 0.

    >>> format_reward(Judgement("broken_json", 4, 0, False, 10))
    0.0
    """
    return 1.0 if j.rankable else 0.0


def combined_reward(j: Judgement, alpha: float, conditional: bool) -> float:
    """R from the module docstring: -1 if not rankable, else R_rank plus the (conditional)
    format bonus.

    >>> combined_reward(Judgement("ok", 3, 3, True, 10), 0.2, conditional=False)
    0.2
    >>> combined_reward(Judgement("ok", 3, 3, True, 10), 0.2, conditional=True)
    0.0
    >>> round(combined_reward(Judgement("ok", 3, 1, False, 10), 0.2, conditional=True), 10)
    0.4
    >>> combined_reward(Judgement("ok", 1, 2, False, 10), 0.2, conditional=True)  # top-1 demoted
    -0.1
    """
    if not j.rankable:
        return -1.0
    r = rank_reward(j)
    if not conditional or r > 0 or kept_top1(j):
        r += alpha
    return r


def kept_top1(j: Judgement) -> bool:
    """The target led the input slate and leads the (rankable) answer too."""
    return j.rankable and j.input_rank == 1 and j.output_rank == 1


def demoted_top1(j: Judgement) -> bool:
    """The target led the input slate and the (rankable) answer moved it down."""
    return j.rankable and j.input_rank == 1 and j.output_rank != 1


@dataclass
class _SlateReward:
    """Shared call logic: judge every completion against its row's slate and target."""

    known_sids: frozenset[str] | None = None
    eos_token_ids: tuple[int, ...] = ()

    def judgements(self, completions, slate, target, completion_ids=None) -> list[Judgement]:
        out = []
        for i, completion in enumerate(completions):
            ids = completion_ids[i] if completion_ids is not None else None
            truncated = (
                bool(self.eos_token_ids)
                and ids is not None
                and (len(ids) == 0 or ids[-1] not in self.eos_token_ids)
            )
            try:
                out.append(
                    judge(
                        completion_text(completion),
                        slate[i],
                        target[i],
                        truncated,
                        self.known_sids,
                    )
                )
            except Exception:  # a reward must never stop training; count it as unrankable
                out.append(Judgement("error", 0, 0, False, len(slate[i] or ())))
        return out

    def score(self, j: Judgement) -> float:  # pragma: no cover - overridden
        raise NotImplementedError

    def __call__(self, completions, slate, target, completion_ids=None, **kwargs) -> list[float]:
        return [self.score(j) for j in self.judgements(completions, slate, target, completion_ids)]


@dataclass
class RankReward(_SlateReward):
    """R_rank per completion (0 when not rankable).

    >>> RankReward()(['{"explanation": "", "recommendations": ["b", "a"]}'], [["a", "b"]], ["b"])
    [0.5]
    """

    __name__ = "rank"

    def score(self, j: Judgement) -> float:
        return rank_reward(j)


@dataclass
class FormatReward(_SlateReward):
    """R_fmt per completion.

    >>> FormatReward()(['{"explanation": "", "recommendations": ["a"]}'], [["a", "b"]], ["b"])
    [0.0]
    """

    __name__ = "format"

    def score(self, j: Judgement) -> float:
        return format_reward(j)


@dataclass
class RerankReward(_SlateReward):
    """The training reward R: conditional (GR2) or unconditional (the ablation), alpha = 0.2.

    >>> RerankReward()(['{"explanation": "", "recommendations": ["a", "b"]}'], [["a", "b"]], ["b"])
    [0.0]
    >>> RerankReward(conditional=False)(
    ...     ['{"explanation": "", "recommendations": ["a", "b"]}'], [["a", "b"]], ["b"])
    [0.2]
    >>> RerankReward()(["not json"], [["a", "b"]], ["b"])
    [-1.0]
    """

    alpha: float = 0.2
    conditional: bool = True
    __name__ = "rerank"

    def score(self, j: Judgement) -> float:
        return combined_reward(j, self.alpha, self.conditional)


def monitor(judgements: Sequence[Judgement]) -> dict[str, float]:
    """Hacking and health monitors over a batch (each a share of all answers): identity
    permutations, invalid and truncated outputs, rankable answers that moved the target up or
    down, and answers that demoted a target the input already had first."""
    n = max(len(judgements), 1)
    ok = [j for j in judgements if j.rankable]
    return {
        "identity_rate": sum(j.identity for j in judgements) / n,
        "invalid_rate": 1 - len(ok) / n,
        "truncated_rate": sum(j.reason == TRUNCATED for j in judgements) / n,
        "improved_rate": sum(rank_reward(j) > 0 for j in ok) / n,
        "worsened_rate": sum(rank_reward(j) < 0 for j in ok) / n,
        "top1_demoted_rate": sum(demoted_top1(j) for j in ok) / n,
    }
