"""Stages `sft_eval_<mode>` and `rl_eval_<variant>`: a generative reranker on valid/test slates.

One task for every trained reranker (SFT per trace mode, RL per variant): free answers, answers
whose list is decoded constrained to the slate, and the pre-ranker's order on the same slates
(`sft.eval_slates` per split, conditional: target in the slate), with bootstrap CIs.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
from prefect import get_run_logger, task

import gr2_core.prompts
import gr2_core.rerank_eval as rev
import gr2_core.sft
from data_contracts.config import PipelineConfig
from data_contracts.manifest import Manifest
from gr2_core.baselines import format_table
from gr2_core.prompts import CoWatch, student_messages
from gr2_core.report import method_label, to_markdown
from tasks.inputs import catalogue, prompt_identity, read
from tasks.stage import Stage, StageResult
from tasks.tracking import StageRun, Tracking

EVAL = {
    name: Stage(
        name,
        lambda c: c.sft,  # the evaluation settings (slates, decoding) live in the sft section
        __name__,
        lambda c: prompt_identity(c) | {"evaluation": c.evaluation.digest()},
    )
    for name in (
        "midtrain_rerank_eval",  # the mid-trained student as reranker (no SFT in the run)
        "sft_eval_targeted",
        "sft_eval_rejection",
        "rl_eval_rejection",
        "rl_eval_targeted",
        "rl_eval_unconditional",
    )
}


def evaluation_body(
    config: PipelineConfig,
    label: str,
    data: Manifest,
    split: Manifest,
    semantic_ids: Manifest,
    candidates: Manifest,
    model: Manifest,
):
    """The body of a generative reranker's evaluation stage (SFT or RL): free answers, and
    answers with the list constrained to the slate, against the pre-ranker order on the same
    valid/test slates (`sft.eval_slates` per split, conditional: target in the slate)."""
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
        cat = catalogue(data, semantic_ids)
        prompt = config.prompt
        cowatch = CoWatch(read(split, "sequences")) if prompt.cowatch_notes else None
        slates = read(candidates, "slates")
        tables, answers, metrics = [], [], {}
        for split_name in ("valid", "test"):
            rows = rev.eval_slates(slates, split_name, cfg.eval_slates, cfg.seed)
            cover = rev.coverage(slates, split_name)
            prompts = [
                student_messages(r["history"], r["candidates"], cat, prompt, cowatch, r["user_id"])
                for r in rows.iter_rows(named=True)
            ]

            def progress(done: int, total: int, s: str = split_name) -> None:
                log.info("%s eval %s: %d/%d slates", label, s, done, total)

            texts, seconds = gr2_core.sft.generate_answers(
                lm, tok, prompts, cfg.eval_batch_size, cfg.max_new_tokens, progress
            )
            variants = [(label, texts, seconds)]
            if cfg.constrained_answer:
                slate_sids = [
                    [cat.sid[c] for c in r["candidates"]] for r in rows.iter_rows(named=True)
                ]
                c_texts, c_secs = gr2_core.sft.constrained_answers(
                    lm, tok, prompts, slate_sids, texts
                )
                # the constrained answer costs the free generation plus its own decoding
                c_secs = [a + b for a, b in zip(seconds, c_secs, strict=True)]
                variants.append((f"{label} constrained", c_texts, c_secs))
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
                        cover,
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
            answers += [  # the input order, for paired comparisons on the same slates
                {
                    "split": split_name,
                    "method": "preranker",
                    "job": f"{r['user_id']}:{r['position']}",
                    "text": "",
                    "reason": "input_order",
                    "rank": int(k),
                }
                for r, k in zip(rows.iter_rows(named=True), pre, strict=True)
            ]
            tables.append(
                rev.reranker_table(
                    "preranker",
                    split_name,
                    pre,
                    {"invalid_rate": zeros, "identity_rate": zeros + 1, "seconds": zeros},
                    ev.bootstrap_samples,
                    ev.confidence,
                    ev.seed,
                    cover,
                )
            )
        table = pl.concat(tables)
        for r in table.iter_rows(named=True):
            mode = "" if r["mode"] == "conditional" else f"{r['mode']}."
            metrics[f"{r['split']}/{r['method']}.{mode}{r['metric']}"] = r["value"]
        table.write_parquet(work / "metrics.parquet")
        pl.DataFrame(answers).write_parquet(work / "answers.parquet")
        pretty = format_table(table, rev.METRICS)
        markdown = (
            f"# {label} reranker vs the pre-ranker, {config.data.dataset} ({config.profile})"
            f"\n\nconditional: slates with the target; end_to_end: all slates of the split "
            f"(coverage x conditional, both resampled for the interval); n: slates decoded; "
            f"value [95% bootstrap CI]; invalid answers count as misses; seconds = "
            f"generation time per slate at batch {cfg.eval_batch_size}\n\n{to_markdown(pretty)}\n"
        )
        (work / "metrics.md").write_text(markdown)
        run.log_text(markdown, "metrics.md")
        run.log_table(pl.DataFrame(answers), "answers.csv")
        log.info("%s eval:\n%s", label, markdown)
        files = {"metrics": "metrics.parquet", "answers": "answers.parquet", "report": "metrics.md"}
        return StageResult(files, metrics)

    return body


@task(
    name="reranker_eval",
    task_run_name="{stage}",
    cache_key_fn=lambda ctx, p: EVAL[p["stage"]].cache_key_fn(ctx, p),
    persist_result=True,
)
def evaluate_reranker(
    config: PipelineConfig,
    stage: str,
    data: Manifest,
    split: Manifest,
    semantic_ids: Manifest,
    candidates: Manifest,
    model: Manifest,
    tracking: Tracking,
) -> Manifest:
    """R@1, R@5, NDCG@5, invalid and identity rates, latency of the reranker trained by the
    `model` stage vs the pre-ranker order. `stage`: `sft_eval_<mode>`, `rl_eval_<variant>` or
    `midtrain_rerank_eval`."""
    if stage not in EVAL:
        raise ValueError(f"unknown evaluation stage {stage!r}; known: {sorted(EVAL)}")
    label = method_label(model.stage, config.prompt.knowledge)
    upstream = [data, split, semantic_ids, candidates, model]
    return EVAL[stage].run(config, upstream, tracking, evaluation_body(config, label, *upstream))
