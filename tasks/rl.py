"""Stages `rl_<variant>`: DAPO on an SFT reranker (evaluated by `tasks.reranker_eval`).

Variants (SPEC section 5): `rejection` (GR2: DAPO from SFT-rejection, conditional reward),
`targeted` (from SFT-targeted, conditional reward), `unconditional` (the unconditional reward,
the reward-hacking ablation; from SFT-rejection, or SFT-targeted with `rl.unconditional_start`).
The policy sees the student prompt of the SFT stages; training slates are training-split slates
that contain their target.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import get_run_logger, task

import gr2_core.rewards
import gr2_core.rl
import gr2_core.training
from data_contracts.config import PipelineConfig
from data_contracts.manifest import Manifest
from gr2_core.plots import rl_curves
from gr2_core.prompts import CoWatch
from tasks.inputs import catalogue, prompt_identity, read
from tasks.stage import Stage, StageResult
from tasks.tracking import StageRun, Tracking, mlflow_env

VARIANTS = ("rejection", "targeted", "unconditional")

RL = {
    v: Stage(
        f"rl_{v}",
        lambda c: c.rl,
        __name__,
        prompt_identity,
    )
    for v in VARIANTS
}


@task(
    name="rl",
    task_run_name="rl_{variant}",
    cache_key_fn=lambda ctx, p: RL[p["variant"]].cache_key_fn(ctx, p),
    persist_result=True,
)
def rl(
    config: PipelineConfig,
    variant: str,
    data: Manifest,
    split: Manifest,
    semantic_ids: Manifest,
    candidates: Manifest,
    sft_model: Manifest,
    tracking: Tracking,
) -> Manifest:
    """DAPO with dynamic sampling from an SFT reranker; monitors logged every step."""
    cfg = config.rl
    log = get_run_logger()

    def body(work: Path, run: StageRun) -> StageResult:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(sft_model.path("model"))
        cat = catalogue(data, semantic_ids)
        cowatch = CoWatch(read(split, "sequences")) if config.prompt.cowatch_notes else None
        slates = read(candidates, "slates")
        rows = gr2_core.rl.training_rows(slates, cat, config.prompt, cfg.slates, cfg.seed, cowatch)
        if not rows:
            raise ValueError(f"rl_{variant}: no training slate contains its target")
        conditional = variant != "unconditional"
        log.info(
            "rl_%s: DAPO from %s on %d slates, %d steps x %d groups of %d, %s reward",
            variant,
            sft_model.stage,
            len(rows),
            cfg.max_steps,
            cfg.prompts_per_step,
            cfg.group_size,
            "conditional" if conditional else "unconditional",
        )
        with mlflow_env(tracking, run.run_id):
            trainer, history = gr2_core.rl.train_dapo(
                sft_model.path("model"),
                rows,
                work,
                cfg,
                tok,
                frozenset(cat.sid.values()),
                conditional=conditional,
                report_to=("mlflow",),
            )
        trainer.model.save_pretrained(work / "model", safe_serialization=True)
        tok.save_pretrained(work / "model")
        (work / "log_history.json").write_text(json.dumps(history, indent=1))
        fig = rl_curves({f"rl-{variant}": history}, work / "curves.png")
        run.log_figure(fig, "curves.png")
        rollouts = work / "completions.jsonl"
        run.log_artifact(rollouts)
        steps = [r for r in history if "monitor/identity_rate" in r]
        metrics = {"train_slates": float(len(rows)), "steps": float(trainer.state.global_step)}
        if steps:
            last = steps[-1]
            for k in ("monitor/identity_rate", "monitor/invalid_rate", "monitor/ndcg_at_5"):
                metrics[f"final_{k.split('/')[1]}"] = float(last[k])
            metrics["zero_std_before_mean"] = sum(
                r.get("dynamic/zero_std_before", 0.0) for r in steps
            ) / len(steps)
        files = {
            "model": "model",
            "log_history": "log_history.json",
            "rollouts": "completions.jsonl",
            "curves": "curves.png",
        }
        return StageResult(files, metrics, scratch=["checkpoints"])

    upstream = [data, split, semantic_ids, candidates, sft_model]
    return RL[variant].run(config, upstream, tracking, body)
