"""Stages `sft_<mode>` (decoupled-weight SFT on one trace set) and `sft_eval_<mode>`.

The student is the mid-trained model; its prompt is the teacher's rejection variant (no target)
with the same KP setting, so SFT teaches it to produce the teacher's accepted answers.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
from prefect import get_run_logger, task

import gr2_core.prompts
import gr2_core.rerank_eval as rev
import gr2_core.sft
import gr2_core.traces as tr
from data_contracts.config import PipelineConfig
from data_contracts.manifest import Manifest
from gr2_core.baselines import format_table
from gr2_core.report import to_markdown
from tasks.data import read
from tasks.midtrain import _catalogue, mlflow_env
from tasks.stage import Stage, StageResult
from tasks.tracking import StageRun, Tracking


def _prompt_settings(c: PipelineConfig) -> dict:
    t = c.teacher
    return {"knowledge": t.knowledge, "notes": t.cowatch_notes, "history": t.history_items}


SFT = {
    m: Stage(f"sft_{m}", lambda c: c.sft, (gr2_core.sft, gr2_core.prompts), _prompt_settings)
    for m in ("targeted", "rejection")
}
EVAL = {
    m: Stage(
        f"sft_eval_{m}",
        lambda c: c.sft,
        (gr2_core.sft, gr2_core.prompts, gr2_core.rerank_eval),
        lambda c: _prompt_settings(c) | {"evaluation": c.evaluation.digest()},
    )
    for m in ("targeted", "rejection")
}


def _messages(row: dict, cat, config: PipelineConfig, cowatch: tr.CoWatch | None) -> list:
    t = config.teacher
    history = row["history"][-t.history_items :]
    notes = cowatch.notes(row["user_id"], history, row["candidates"]) if cowatch else None
    return gr2_core.prompts.build_messages(history, row["candidates"], cat, t.knowledge, notes)


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
        cat = _catalogue(data, semantic_ids)
        cowatch = tr.CoWatch(read(split, "sequences")) if config.teacher.cowatch_notes else None
        rows, dropped = [], 0
        for r in accepted.iter_rows(named=True):
            sample = gr2_core.sft.encode_sample(
                tok,
                _messages(r, cat, config, cowatch),
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


@task(
    name="sft_eval",
    task_run_name="sft_eval_{mode}",
    cache_key_fn=lambda ctx, p: EVAL[p["mode"]].cache_key_fn(ctx, p),
    persist_result=True,
)
def evaluate_sft(
    config: PipelineConfig,
    mode: str,
    data: Manifest,
    split: Manifest,
    semantic_ids: Manifest,
    candidates: Manifest,
    model: Manifest,
    tracking: Tracking,
) -> Manifest:
    """R@1, R@5, NDCG@5, invalid and identity rates, latency of the SFT reranker vs the
    pre-ranker order on the same valid/test slates (conditional: target in the slate)."""
    cfg, ev = config.sft, config.evaluation
    log = get_run_logger()

    def body(work: Path, run: StageRun) -> StageResult:
        import numpy as np
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(cfg.num_threads)
        tok = AutoTokenizer.from_pretrained(model.path("model"))
        lm = AutoModelForCausalLM.from_pretrained(model.path("model")).eval()
        if torch.cuda.is_available():
            lm = lm.to("cuda", dtype=torch.bfloat16)
        cat = _catalogue(data, semantic_ids)
        cowatch = tr.CoWatch(read(split, "sequences")) if config.teacher.cowatch_notes else None
        slates = read(candidates, "slates")
        tables, answers, metrics = [], [], {}
        for split_name in ("valid", "test"):
            rows = rev.eval_slates(slates, split_name, cfg.eval_slates, cfg.seed)
            prompts = [_messages(r, cat, config, cowatch) for r in rows.iter_rows(named=True)]

            def progress(done: int, total: int, s: str = split_name) -> None:
                log.info("sft_eval_%s %s: %d/%d slates", mode, s, done, total)

            texts, seconds = gr2_core.sft.generate_answers(
                lm, tok, prompts, cfg.eval_batch_size, cfg.max_new_tokens, progress
            )
            variants = [(f"sft-{mode}", texts, seconds)]
            if cfg.constrained_answer:
                slate_sids = [
                    [cat.sid[c] for c in r["candidates"]] for r in rows.iter_rows(named=True)
                ]
                c_texts, c_secs = gr2_core.sft.constrained_answers(
                    lm, tok, prompts, slate_sids, texts
                )
                # the constrained answer costs the free generation plus its own decoding
                c_secs = [a + b for a, b in zip(seconds, c_secs, strict=True)]
                variants.append((f"sft-{mode} constrained", c_texts, c_secs))
            for method, answer_texts, secs in variants:
                scored = rev.score_answers(answer_texts, rows, cat)
                extra = {
                    "invalid_rate": scored["invalid"],
                    "identity_rate": scored["identity"],
                    "seconds": np.array(secs),
                }
                tables.append(
                    rev.reranker_table(
                        method,
                        split_name,
                        scored["ranks"],
                        extra,
                        ev.bootstrap_samples,
                        ev.confidence,
                        ev.seed,
                    )
                )
                answers += [
                    {
                        "split": split_name,
                        "method": method,
                        "job": f"{r['user_id']}:{r['position']}",
                        "text": t,
                        "reason": reason,
                        "rank": int(k),
                    }
                    for r, t, reason, k in zip(
                        rows.iter_rows(named=True),
                        answer_texts,
                        scored["reasons"],
                        scored["ranks"],
                        strict=True,
                    )
                ]
            pre = rows["target_rank"].to_numpy()
            zeros = np.zeros(len(pre))
            tables.append(
                rev.reranker_table(
                    "preranker",
                    split_name,
                    pre,
                    {"invalid_rate": zeros, "identity_rate": zeros + 1, "seconds": zeros},
                    ev.bootstrap_samples,
                    ev.confidence,
                    ev.seed,
                )
            )
        table = pl.concat(tables)
        for r in table.iter_rows(named=True):
            metrics[f"{r['split']}/{r['method']}.{r['metric']}"] = r["value"]
        table.write_parquet(work / "metrics.parquet")
        pl.DataFrame(answers).write_parquet(work / "answers.parquet")
        pretty = format_table(table, rev.METRICS)
        markdown = (
            f"# SFT-{mode} reranker vs the pre-ranker, {config.data.dataset} ({config.profile})"
            f"\n\nconditional slates (target in the slate), value [95% bootstrap CI]; invalid "
            f"answers count as misses; seconds = generation time per slate at batch "
            f"{cfg.eval_batch_size}\n\n{to_markdown(pretty)}\n"
        )
        (work / "metrics.md").write_text(markdown)
        run.log_text(markdown, "metrics.md")
        run.log_table(pl.DataFrame(answers), "answers.csv")
        log.info("sft_eval_%s:\n%s", mode, markdown)
        files = {"metrics": "metrics.parquet", "answers": "answers.parquet", "report": "metrics.md"}
        return StageResult(files, metrics)

    upstream = [data, split, semantic_ids, candidates, model]
    return EVAL[mode].run(config, upstream, tracking, body)
