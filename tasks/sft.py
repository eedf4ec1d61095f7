"""Stages `sft_<mode>` (decoupled-weight SFT on one trace set) and `sft_eval_<mode>`.

The student is the mid-trained model; its prompt is the teacher's rejection variant (no target)
with the same KP setting, so SFT teaches it to produce the teacher's accepted answers.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import get_run_logger, task

import gr2_core.sft
import gr2_core.training
from data_contracts.config import PipelineConfig
from data_contracts.manifest import Manifest
from gr2_core.prompts import CoWatch, student_messages
from tasks.inputs import catalogue, prompt_identity, read
from tasks.stage import Stage, StageResult
from tasks.tracking import StageRun, Tracking, mlflow_env

SFT = {
    m: Stage(
        f"sft_{m}",
        lambda c: c.sft,
        __name__,
        prompt_identity,
    )
    for m in ("targeted", "rejection")
}


@task(
    name="sft",
    task_run_name="sft_{mode}",
    cache_key_fn=lambda ctx, p: SFT[p["mode"]].cache_key_fn(ctx, p),
    persist_result=True,
)
def sft(
    config: PipelineConfig,
    mode: str,
    data: Manifest,
    split: Manifest,
    semantic_ids: Manifest,
    traces: Manifest,
    midtrain: Manifest,
    tracking: Tracking,
) -> Manifest:
    """Fine-tune the mid-trained student on the accepted `mode` traces."""
    cfg = config.sft
    log = get_run_logger()

    def body(work: Path, run: StageRun) -> StageResult:
        from transformers import AutoTokenizer

        accepted = read(traces, f"{mode}_traces")
        if accepted.is_empty():
            raise ValueError(
                f"sft_{mode}: the teacher produced no accepted {mode} trace "
                f"({traces.metrics.get(f'{mode}/attempts', 0):.0f} attempts, file "
                f"{traces.path(f'{mode}_attempts')}); raise teacher.max_attempts or "
                "teacher.slates, or use a stronger teacher (teacher.base_url)"
            )
        tok = AutoTokenizer.from_pretrained(midtrain.path("model"))
        cat = catalogue(data, semantic_ids)
        prompt = config.prompt
        cowatch = CoWatch(read(split, "sequences")) if prompt.cowatch_notes else None
        rows, dropped = [], 0
        for r in accepted.iter_rows(named=True):
            sample = gr2_core.sft.encode_sample(
                tok,
                student_messages(r["history"], r["candidates"], cat, prompt, cowatch, r["user_id"]),
                r["explanation"],
                r["recommendations"],
                cfg.lambda_r,
                cfg.lambda_o,
            )
            if len(sample["input_ids"]) > cfg.max_length:
                dropped += 1
                continue
            rows.append(sample)
        if not rows:
            raise ValueError(f"sft_{mode}: every sample is longer than sft.max_length")
        lengths = [len(r["input_ids"]) for r in rows]
        log.info(
            "sft_%s: %d samples (%d dropped as too long), mean %.0f tokens; lambda_r %.2f, "
            "lambda_o %.2f",
            mode,
            len(rows),
            dropped,
            sum(lengths) / len(lengths),
            cfg.lambda_r,
            cfg.lambda_o,
        )
        run.log_text(tok.decode(rows[0]["input_ids"], skip_special_tokens=False), "sample_0.txt")
        with mlflow_env(tracking, run.run_id):
            model, history = gr2_core.sft.train_sft(
                midtrain.path("model"), rows, work, cfg, tok, report_to=("mlflow",)
            )
        model.save_pretrained(work / "model", safe_serialization=True)
        tok.save_pretrained(work / "model")
        (work / "log_history.json").write_text(json.dumps(history, indent=1))
        metrics = {"samples": float(len(rows)), "dropped_too_long": float(dropped)}
        metrics["tokens"] = float(sum(lengths))
        final = [r for r in history if "train_runtime" in r]
        if final:
            metrics["train_seconds"] = final[-1]["train_runtime"]
        losses = [r["loss"] for r in history if "loss" in r]
        if losses:
            metrics["first_train_loss"], metrics["final_train_loss"] = losses[0], losses[-1]
        files = {"model": "model", "log_history": "log_history.json"}
        return StageResult(files, metrics, scratch=["checkpoints"])

    return SFT[mode].run(config, [data, split, semantic_ids, traces, midtrain], tracking, body)
