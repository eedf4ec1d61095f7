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

import polars as pl
from prefect import get_run_logger, task

import gr2_core.prompts
import gr2_core.rerank_eval
import gr2_core.rewards
import gr2_core.rl
import gr2_core.traces as tr
import gr2_core.training
from data_contracts.config import PipelineConfig
from data_contracts.manifest import Manifest
from gr2_core.plots import rl_curves
from tasks.data import read
from tasks.midtrain import _catalogue, mlflow_env
from tasks.sft import _messages, _prompt_settings
from tasks.stage import Stage, StageResult
from tasks.tracking import StageRun, Tracking

VARIANTS = ("rejection", "targeted", "unconditional")

RL = {
    v: Stage(
        f"rl_{v}",
        lambda c: c.rl,
        (gr2_core.rl, gr2_core.rewards, gr2_core.prompts, gr2_core.training),
        _prompt_settings,
    )
    for v in VARIANTS
}


def training_rows(config: PipelineConfig, slates: pl.DataFrame, cat, cowatch) -> list[dict]:
    """Up to `rl.slates` training slates with their target: prompt, slate SIDs, target SID."""
    cfg = config.rl
    pool = gr2_core.rerank_eval.eval_slates(slates, "train", cfg.slates, cfg.seed)
    return [
        {
            "prompt": _messages(r, cat, config, cowatch),
            "slate": [cat.sid[c] for c in r["candidates"]],
            "target": cat.sid[r["target"]],
            "prompt_index": k,
        }
        for k, r in enumerate(pool.iter_rows(named=True))
    ]


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
        cat = _catalogue(data, semantic_ids)
        cowatch = tr.CoWatch(read(split, "sequences")) if config.teacher.cowatch_notes else None
        rows = training_rows(config, read(candidates, "slates"), cat, cowatch)
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
