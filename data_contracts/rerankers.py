"""The trained rerankers, declared once: SFT per teacher trace mode, DAPO per RL variant.

Everything that names them derives from these declarations: the config's allowed values
(`teacher.modes`, `rl.variants`, `registry.candidate`), the stage names and their evaluation
stages, the RL variant's reward and start, the registry's preference order and the pairs the RL
report compares. Adding an RL variant is one `RLVariant` line here (plus its reward in
`gr2_core.rewards` if it needs a new one) and its documentation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# SPEC section 4's two teacher modes, then `grounded`: rationales composed from the prompt's facts
# (gr2_core.grounded), the ablation of issue 21; the teacher runs them in this order
TRACE_MODES = ("targeted", "rejection", "grounded")
LLM_TRACE_MODES = ("targeted", "rejection")  # the modes a teacher model answers (the default)
TWIN = "twin"  # in `RLVariant.compare_with`: the conditional variant with the same SFT start


@dataclass(frozen=True)
class RLVariant:
    """One DAPO run: its reward, the SFT model it starts from, what the report pairs it with."""

    name: str
    conditional: bool  # the conditional reward; False: the unconditional ablation (SPEC 5)
    start: str | None  # the trace mode of its SFT start; None: `rl.unconditional_start`
    compare_with: tuple[str, ...] = ()  # RL variants (or TWIN) in its paired differences
    registrable: bool = True  # may be the run's registered reranker (`registry.candidate: auto`)
    summary: str = ""


RL_VARIANTS: tuple[RLVariant, ...] = (
    RLVariant(
        "rejection",
        True,
        "rejection",
        compare_with=("targeted",),
        summary="GR2: DAPO from SFT-rejection with the conditional reward",
    ),
    RLVariant("targeted", True, "targeted", summary="DAPO from SFT-targeted"),
    RLVariant(
        "unconditional",
        False,
        None,
        compare_with=(TWIN,),
        registrable=False,
        summary="the unconditional reward (the reward-hacking ablation)",
    ),
)
VARIANTS = {v.name: v for v in RL_VARIANTS}

# the registry's preference when `registry.candidate` is auto: the most trained model first
REGISTRY_PREFERENCE = ("rejection", "targeted")  # among RL variants, then SFT modes, this order

TraceMode = Literal[TRACE_MODES]  # type: ignore[valid-type]
VariantName = Literal[tuple(VARIANTS)]  # type: ignore[valid-type]


def sft_stage(mode: str) -> str:
    return f"sft_{mode}"


def rl_stage(variant: str) -> str:
    return f"rl_{variant}"


def eval_stage(model_stage: str) -> str:
    """The evaluation stage of a trained reranker stage: sft_targeted -> sft_eval_targeted."""
    kind, name = model_stage.split("_", 1)
    return f"{kind}_eval_{name}"


MIDTRAIN_RERANK_EVAL = "midtrain_rerank_eval"  # the mid-trained student as reranker (no SFT)
RERANKER_STAGES = tuple(sft_stage(m) for m in TRACE_MODES) + tuple(
    rl_stage(v.name) for v in RL_VARIANTS
)
TRAINED_EVAL_STAGES = tuple(eval_stage(s) for s in RERANKER_STAGES)  # the reranker table's
EVAL_STAGES = (MIDTRAIN_RERANK_EVAL, *TRAINED_EVAL_STAGES)
CandidateName = Literal[("auto", "midtrain", *RERANKER_STAGES)]  # type: ignore[valid-type]


def registry_order() -> list[str]:
    """Reranker stages in the order `registry.candidate: auto` prefers them: registrable RL
    variants (preferred ones first), then SFT models, both in `REGISTRY_PREFERENCE` order."""
    names = [v for v in REGISTRY_PREFERENCE if v in VARIANTS and VARIANTS[v].registrable]
    names += [v.name for v in RL_VARIANTS if v.registrable and v.name not in names]
    modes = [m for m in REGISTRY_PREFERENCE if m in TRACE_MODES]
    modes += [m for m in TRACE_MODES if m not in modes]
    return [rl_stage(v) for v in names] + [sft_stage(m) for m in modes]


def sft_mode(variant: str, unconditional_start: str) -> str:
    """The trace mode of the SFT model RL `variant` starts from."""
    start = VARIANTS[variant].start
    return start if start is not None else unconditional_start


def compared_variants(variant: str, unconditional_start: str) -> list[str]:
    """The RL variants the report pairs `variant` with (TWIN resolved to the conditional variant
    that starts from the same SFT model)."""
    out = []
    for other in VARIANTS[variant].compare_with:
        if other == TWIN:
            start = sft_mode(variant, unconditional_start)
            twins = [v.name for v in RL_VARIANTS if v.conditional and v.start == start]
            out += twins[:1]
        else:
            out.append(other)
    return out
