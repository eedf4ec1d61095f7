"""Stages `student` (export + SID vocabulary), `midtrain` (four tasks) and `midtrain_eval`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import polars as pl
from prefect import get_run_logger, task

import gr2_core.constrained
import gr2_core.midtrain as mt
import gr2_core.models
import gr2_core.sid_eval
import gr2_core.training
from data_contracts.config import PipelineConfig
from data_contracts.manifest import Manifest, sha256_file
from gr2_core import plots
from gr2_core.baselines import format_table
from gr2_core.metrics import metrics_table
from gr2_core.models import default_student, export_student
from gr2_core.report import to_markdown
from gr2_core.semantic_ids import tokenizer as tok_core
from tasks.inputs import catalogue, read
from tasks.stage import Stage, StageResult
from tasks.tracking import StageRun, Tracking, mlflow_env


def _source_fingerprint(config: PipelineConfig) -> dict[str, str]:
    src = config.student.source
    if src is None:
        folder, gguf = default_student()
        return {"gguf": sha256_file(folder / gguf)}
    path = Path(src)
    if path.is_dir():
        weights = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
        return {w.name: str(w.stat().st_size) for w in weights}
    return {"hub_id": src}


STUDENT = Stage("student", lambda c: c.student, __name__, _source_fingerprint)
MIDTRAIN = Stage("midtrain", lambda c: c.midtrain, __name__)
EVAL = Stage(
    "midtrain_eval",
    lambda c: c.midtrain,
    __name__,
    lambda c: {"evaluation": c.evaluation.digest()},
)


@task(name="student", cache_key_fn=STUDENT.cache_key_fn, persist_result=True)
def provision_student(
    config: PipelineConfig, semantic_ids: Manifest, tracking: Tracking
) -> Manifest:
    """Export the student to a plain safetensors folder with one token per SID code."""
    cfg = config.student

    def body(work: Path, run: StageRun) -> StageResult:
        _, sid_cfg = tok_core.load(Path(semantic_ids.directory))
        sizes = [sid_cfg.codebook_size] * sid_cfg.levels + [sid_cfg.last_level_size]
        tiny = (cfg.tiny_hidden_size, cfg.tiny_layers, cfg.seed) if cfg.tiny else None
        get_run_logger().info(
            "student: exporting %s%s with %d SID levels",
            cfg.source or "packaged SmolLM2-135M-Instruct (GGUF)",
            " as a tiny random model" if tiny else "",
            len(sizes),
        )
        out = export_student(work / "model", cfg.source, len(sizes), sizes, tiny)
        from safetensors import safe_open
        from transformers import AutoConfig, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(out)
        n_params = 0
        for shard in out.glob("*.safetensors"):
            with safe_open(shard, "pt") as f:
                n_params += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118
        metrics = {
            "vocab_size": float(len(tok)),
            "sid_tokens": float(2 + sum(sizes)),
            "parameters_m": n_params / 1e6,
        }
        (work / "sid_levels.json").write_text(json.dumps({"sizes": sizes}))
        run.log_text(AutoConfig.from_pretrained(out).to_json_string(), "model_config.json")
        return StageResult({"model": "model", "sid_levels": "sid_levels.json"}, metrics)

    return STUDENT.run(config, [semantic_ids], tracking, body)


@task(name="midtrain", cache_key_fn=MIDTRAIN.cache_key_fn, persist_result=True)
def midtrain(
    config: PipelineConfig,
    data: Manifest,
    split: Manifest,
    semantic_ids: Manifest,
    student: Manifest,
    tracking: Tracking,
) -> Manifest:
    """Build the four-task mixture from the training split and mid-train the student."""
    cfg = config.midtrain
    log = get_run_logger()

    def body(work: Path, run: StageRun) -> StageResult:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(student.path("model"))
        cat = catalogue(data, semantic_ids)
        users = read(data, "users") if "users" in data.files else None
        sequences = read(split, "sequences")
        general = mt.aclsum_train_texts()
        common = dict(
            sequences=sequences,
            users=users,
            cat=cat,
            ratios=cfg.mixture,
            history_items=cfg.history_items,
            caption_holdout=cfg.caption_holdout,
            general_texts=general,
            general_chars=cfg.general_chars,
        )
        mix = mt.build_mixture(total=cfg.total_samples, seed=cfg.seed, **common)
        table = mt.to_table(mix, tok, cfg.max_length)
        eval_sets = mt.heldout_loss_sets(
            common, cfg.eval_samples_per_task, cfg.seed + 1, table, tok, cfg.max_length
        )
        table.write_parquet(work / "train.parquet")
        mt.save_json(mix.heldout_items, work / "heldout_items.json")
        counts = table.group_by("task").len()
        tokens = table.select(pl.col("input_ids").list.len().sum()).item()
        trained = table.select(
            pl.col("labels").list.eval(pl.element() != mt.IGNORE).list.sum().sum()
        ).item()
        log.info(
            "midtrain: %d samples %s, %d tokens (%d trained), %d steps (%d token warm-up)",
            table.height,
            dict(counts.iter_rows()),
            tokens,
            trained,
            cfg.max_steps,
            cfg.warmup_steps,
        )
        run.log_text(
            "\n\n".join(
                f"[{t}]\n{x}" for t, x in table.head(12).select("task", "text").iter_rows()
            ),
            "sample_texts.txt",
        )
        sizes = json.loads(student.path("sid_levels").read_text())["sizes"]
        first_new = len(tok) - (2 + sum(sizes))  # the SID tokens are the last rows
        settings = gr2_core.training.TrainSettings.from_config(cfg, report_to=("mlflow",))
        with mlflow_env(tracking, run.run_id):
            model, history = gr2_core.training.train(
                student.path("model"),
                table,
                eval_sets,
                work,
                settings,
                first_new,
                tok.pad_token_id,
            )
        model.save_pretrained(work / "model", safe_serialization=True)
        tok.save_pretrained(work / "model")
        (work / "log_history.json").write_text(json.dumps(history, indent=1))
        run.log_figure(
            plots.midtrain_curves(history, cfg.warmup_steps, work / "curves.png"), "curves.png"
        )
        run.client.log_artifacts(run.run_id, str(work / "model"), "model")
        final = [r for r in history if "train_runtime" in r]
        metrics = {"samples": float(table.height), "tokens": float(tokens)}
        metrics["trained_tokens"] = float(trained)
        if final:
            metrics["train_seconds"] = final[-1]["train_runtime"]
            metrics["tokens_per_second"] = tokens / max(final[-1]["train_runtime"], 1e-9)
        for r in reversed(history):
            if "loss" in r:
                metrics["final_train_loss"] = r["loss"]
                break
        files = {
            "model": "model",
            "train": "train.parquet",
            "heldout_items": "heldout_items.json",
            "log_history": "log_history.json",
            "plot": "curves.png",
        }
        return StageResult(files, metrics, scratch=["checkpoints"])

    return MIDTRAIN.run(config, [data, split, semantic_ids, student], tracking, body)


@task(name="midtrain_eval", cache_key_fn=EVAL.cache_key_fn, persist_result=True)
def evaluate_midtrain(
    config: PipelineConfig,
    data: Manifest,
    split: Manifest,
    semantic_ids: Manifest,
    candidates: Manifest,
    midtrain: Manifest,
    tracking: Tracking,
) -> Manifest:
    """Next-item R@K/NDCG@K by constrained beam search vs the pre-ranker; caption accuracy."""
    cfg, ev = config.midtrain, config.evaluation
    log = get_run_logger()

    def body(work: Path, run: StageRun) -> StageResult:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(cfg.num_threads)
        model_dir = midtrain.path("model")
        tok = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        if torch.cuda.is_available():
            model = model.to("cuda", dtype=torch.bfloat16)
        cat = catalogue(data, semantic_ids)
        sequences = read(split, "sequences")
        slates = read(candidates, "slates")
        tables, metrics = [], {}
        ks = [k for k in (1, 5, 10) if k <= cfg.num_beams]
        ndcg_ks = [k for k in (5, 10) if k <= cfg.num_beams]
        for split_name in ("valid", "test"):
            rows = mt.eval_prompts(
                sequences, split_name, cfg.history_items, cfg.eval_users, cfg.seed
            )

            def progress(done: int, total: int, s: str = split_name) -> None:
                if done % max(1, total // 5) < cfg.eval_batch_size or done == total:
                    log.info("midtrain_eval %s: %d/%d users", s, done, total)

            out = gr2_core.sid_eval.next_item_ranks(
                model, tok, cat, rows, cfg.num_beams, cfg.eval_batch_size, cfg.max_length, progress
            )
            metrics[f"{split_name}/invalid_rate"] = out["invalid_rate"]
            metrics[f"{split_name}/duplicate_rate"] = out["duplicate_rate"]
            student_ranks = gr2_core.sid_eval.rank_array(out["ranks"])
            pre_ranks = gr2_core.sid_eval.preranker_ranks(rows, slates, split_name)
            for method, ranks in (
                (f"student beam{cfg.num_beams}", student_ranks),
                ("preranker (SASRec)", pre_ranks),
            ):
                t = metrics_table(
                    method,
                    split_name,
                    ranks,
                    ks,
                    ndcg_ks,
                    ev.bootstrap_samples,
                    ev.confidence,
                    ev.seed,
                ).filter((pl.col("mode") == "end_to_end") & (pl.col("metric") != "coverage"))
                tables.append(t)
        table = pl.concat(tables)
        heldout = json.loads(midtrain.path("heldout_items").read_text())[: cfg.caption_eval_items]
        seen = sorted(set(cat.sid) - set(heldout))[: len(heldout)]
        captions = []
        for name, items in (("heldout", heldout), ("trained", seen)):
            if not items:
                continue
            acc, rows_out = gr2_core.sid_eval.caption_accuracy(
                model, tok, cat, items, cfg.eval_batch_size
            )
            metrics[f"caption_accuracy/{name}"] = acc
            captions += [r | {"set": name} for r in rows_out]
        for r in table.iter_rows(named=True):
            metrics[f"{r['split']}/{r['method'].split()[0]}.{r['metric']}"] = r["value"]
        table.write_parquet(work / "metrics.parquet")
        pl.DataFrame(captions).write_parquet(work / "captions.parquet")
        pretty = format_table(table)
        title = (
            f"Next-item retrieval over the whole catalogue, {config.data.dataset} "
            f"({config.profile})"
        )
        caption_line = ", ".join(
            f"{k.split('/')[1]} {v:.3f}" for k, v in metrics.items() if k.startswith("caption")
        )
        markdown = (
            f"# {title}\n\nvalue [95% bootstrap CI]; {cfg.eval_users} sampled users per split; "
            f"invalid-SID rate {metrics['test/invalid_rate']:.3f}, duplicate-beam rate "
            f"{metrics['test/duplicate_rate']:.3f}; caption exact-title accuracy: "
            f"{caption_line}\n\n{to_markdown(pretty)}\n"
        )
        (work / "metrics.md").write_text(markdown)
        run.log_text(markdown, "metrics.md")
        run.log_table(pl.DataFrame(captions), "captions.csv")
        log.info("midtrain_eval:\n%s", markdown)
        files = {
            "metrics": "metrics.parquet",
            "captions": "captions.parquet",
            "report": "metrics.md",
        }
        return StageResult(files, metrics)

    return EVAL.run(config, [data, split, semantic_ids, candidates, midtrain], tracking, body)
