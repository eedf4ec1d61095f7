"""Evaluation of a generative reranker's answers on conditional slates (target in the slate).

For each slate the answer text goes through the strict parser and filter (no target rule): a
valid answer gives the target's rank in the answer's order; an invalid one counts as a miss
(rank 0), so invalid outputs lower R@K/NDCG@K instead of leaving the sample. The identity rate
is the share of valid answers that repeat the input order (the reward-hacking signature).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from data_contracts.config import EngineConfig, EvalConfig, PromptConfig, SFTConfig
from gr2_core.catalogue import Catalogue
from gr2_core.metrics import bootstrap_ci, per_sample_metrics, rank_of
from gr2_core.output import Log, StageOutput
from gr2_core.prompts import CoWatch, check_answer, student_messages
from gr2_core.report import to_markdown

if TYPE_CHECKING:
    from gr2_core.generation import MapShards

LOG = logging.getLogger(__name__)


def eval_slates(slates: pl.DataFrame, split: str, count: int | None, seed: int) -> pl.DataFrame:
    """Up to `count` slates of `split` that contain their target (None: all), drawn with `seed`.
    The draw is a prefix of one seeded shuffle, so a smaller count's slates are among a larger
    one's: methods answered on different numbers of slates stay paired on the common ones."""
    pool = slates.filter((pl.col("split") == split) & pl.col("target_rank").is_not_null())
    if count is not None and pool.height > count:
        shuffled = pool.sort("user_id", "position").sample(fraction=1.0, shuffle=True, seed=seed)
        pool = shuffled.head(count)
    return pool.sort("user_id", "position")


def score_answers(
    texts: Sequence[str], slates: pl.DataFrame, cat: Catalogue
) -> dict[str, np.ndarray]:
    """Per slate: target rank (0 if invalid), invalid flag, identity flag, rejection reason."""
    valid = frozenset(cat.sid.values())
    ranks, invalid, identity, reasons = [], [], [], []
    for text, row in zip(texts, slates.iter_rows(named=True), strict=True):
        slate = [cat.sid[c] for c in row["candidates"]]
        verdict = check_answer(text, slate, valid)
        reasons.append(verdict.reason)
        if verdict.accepted:
            recs = verdict.answer.recommendations
            ranks.append(rank_of(cat.sid[row["target"]], recs) or 0)
            invalid.append(0.0)
            identity.append(float(recs == slate))
        else:
            ranks.append(0)
            invalid.append(1.0)
            identity.append(0.0)
    return {
        "ranks": np.array(ranks, dtype=np.int64),
        "invalid": np.array(invalid),
        "identity": np.array(identity),
        "reasons": np.array(reasons, dtype=object),
    }


def coverage(slates: pl.DataFrame, split: str) -> tuple[float, int]:
    """(share of `split`'s slates that contain their target, number of slates)."""
    pool = slates.filter(pl.col("split") == split)
    if pool.is_empty():
        return 0.0, 0
    return float(pool["target_rank"].is_not_null().mean()), pool.height


def end_to_end_ci(
    values: np.ndarray, share: float, total: int, samples: int, confidence: float, seed: int
) -> tuple[float, float, float]:
    """(value, low, high) of an end-to-end metric: coverage x its conditional mean, where the
    conditional values come from the decoded slates and the coverage from all `total` slates of
    the split. Both are resampled (the decoded slates with replacement, the covered count as a
    binomial draw, i.e. a bootstrap of the covered flags of every slate), so the interval holds
    the uncertainty of both instead of treating the coverage as exact."""
    if len(values) == 0 or total == 0:
        return (float("nan"),) * 3
    rng = np.random.default_rng(seed + 1)
    idx = rng.integers(0, len(values), size=(samples, len(values)))  # (samples, n)
    conditional = values[idx].mean(axis=1)
    covered = rng.binomial(total, share, size=samples) / total
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(conditional * covered, [alpha, 1 - alpha])
    return share * float(values.mean()), float(lo), float(hi)


def reranker_table(
    method: str,
    split: str,
    ranks: np.ndarray,
    extra: dict[str, np.ndarray],
    samples: int,
    confidence: float,
    seed: int,
    cover: tuple[float, int] | None = None,
) -> pl.DataFrame:
    """Long table (method, split, mode, metric, value, ci_low, ci_high, n): R@1/5/10,
    NDCG@5/10 and the per-slate `extra` rates (invalid, identity, latency), with bootstrap CIs,
    on conditional slates; with `cover` = (coverage, slates of the split) also end to end.

    A slate without its target scores 0 whatever the reranker does, so the end-to-end value of
    a ranking metric is coverage x its conditional value (`end_to_end_ci`: both resampled). `n`
    is the number of slates decoded in both modes; the end-to-end rows also carry the coverage
    of the split's slates with its own interval."""
    values = per_sample_metrics(ranks, (1, 5, 10), (5, 10))
    values.pop("mrr")
    ranking = list(values)
    values |= extra
    stats = bootstrap_ci(values, samples, confidence, seed)
    n = len(ranks)
    rows = [(method, split, "conditional", m, *v, n) for m, v in stats.items()]
    if cover is not None:
        share, total = cover
        rows += [
            (
                method,
                split,
                "end_to_end",
                m,
                *end_to_end_ci(values[m], *cover, samples, confidence, seed),
                n,
            )
            for m in ranking
        ]
        alpha = (1 - confidence) / 2
        draws = np.random.default_rng(seed + 1).binomial(total, share, size=samples) / total
        lo, hi = np.quantile(draws, [alpha, 1 - alpha]) if total else (float("nan"),) * 2
        rows.append((method, split, "end_to_end", "coverage", share, float(lo), float(hi), n))
    return pl.DataFrame(
        rows,
        schema=["method", "split", "mode", "metric", "value", "ci_low", "ci_high", "n"],
        orient="row",
    )


METRICS = ["recall@1", "recall@5", "recall@10", "ndcg@5", "ndcg@10"]
METRICS += ["invalid_rate", "identity_rate", "seconds", "coverage"]


@dataclass(frozen=True)
class RerankEvalInputs:
    model: Path  # the reranker's Hugging Face folder (model and tokenizer)
    items: Path  # the data stage's items
    sid_map: Path  # the semantic-ID stage's SID map
    sequences: Path  # the split stage's sequences (co-watch notes)
    slates: Path  # the candidates stage's slates
    label: str  # the reranker's method name in the tables (`method_label`)
    title: str  # the report's heading
    prompt: PromptConfig  # the prompt the reranker was trained with
    bootstrap: EvalConfig  # interval settings (`evaluation` section)


def _answer_rows(split: str, method: str, rows: pl.DataFrame, texts, reasons, ranks) -> list:
    return [
        {
            "split": split,
            "method": method,
            "job": f"{r['user_id']}:{r['position']}",
            "text": t,
            "reason": reason,
            "rank": int(k),
        }
        for r, t, reason, k in zip(rows.iter_rows(named=True), texts, reasons, ranks, strict=True)
    ]


def run(
    inputs: RerankEvalInputs,
    cfg: SFTConfig,
    out: Path,
    log: Log = LOG,
    engine_cfg: EngineConfig | None = None,
    map_shards: MapShards | None = None,
    shards: int = 1,
) -> StageOutput:
    """A generative reranker's evaluation stage (`sft_eval_<mode>`, `rl_eval_<variant>`,
    `midtrain_rerank_eval`): answers by each of `cfg.eval_methods` against the pre-ranker order
    on the same valid/test slates (conditional: target in the slate; end to end: coverage x
    conditional). The methods that decode (free, constrained, scored_explained; explanations
    budget-forced, `gr2_core.generation`) answer `cfg.eval_slates` slates per split from the
    engine of `engine_cfg` (a vLLM server where installed, else transformers; None: transformers
    in this process); `scored` answers `cfg.scored_slates` (a superset) with transformers in this
    process, on the GPU when there is one: one forward pass a slate, no decoding for a server to
    speed up (on a 2-core CPU with native bf16 the tree-masked forward is about 2.5x faster
    than scoring through vLLM's one-token requests, docs/generation.md). With `map_shards` and
    `shards` > 1, the transformers engine's answers are computed in that many shards through
    `map_shards` (the stage's task runner: Ray tasks), with the same answers."""
    from transformers import AutoTokenizer

    from gr2_core.generation import ShardedEngine, backend_of, open_engine

    tok = AutoTokenizer.from_pretrained(inputs.model)
    engine_cfg = engine_cfg or EngineConfig(backend="transformers")
    decoding = [m for m in cfg.eval_methods if m != "scored"]
    local = EngineConfig(backend="transformers")
    with ExitStack() as stack:
        engines = {}

        def engine_for(ecfg: EngineConfig, log_name: str):
            if map_shards is not None and shards > 1 and backend_of(ecfg) == "transformers":
                batch, threads = cfg.eval_batch_size, cfg.num_threads
                return ShardedEngine(inputs.model, tok, batch, threads, shards, map_shards)
            return stack.enter_context(
                open_engine(
                    inputs.model, tok, ecfg, out / log_name, cfg.eval_batch_size, cfg.num_threads
                )
            )

        if decoding:
            engine = engine_for(engine_cfg, "engine.log")
            engines |= dict.fromkeys(decoding, engine)
        if "scored" in cfg.eval_methods:
            shared = decoding and backend_of(engine_cfg) == "transformers"
            engines["scored"] = engines[decoding[0]] if shared else engine_for(local, "scorer.log")
        for method, engine in engines.items():
            log.info("%s eval: %s answers from %s", inputs.label, method, engine.describe(method))
        return _evaluate(inputs, cfg, out, log, engines)


def _evaluate(inputs: RerankEvalInputs, cfg: SFTConfig, out: Path, log: Log, engines: dict):
    from gr2_core.baselines import format_table

    ev, label = inputs.bootstrap, inputs.label
    cat = Catalogue.build(pl.read_parquet(inputs.items), pl.read_parquet(inputs.sid_map))
    prompt = inputs.prompt
    cowatch = CoWatch(pl.read_parquet(inputs.sequences)) if prompt.cowatch_notes else None
    slates = pl.read_parquet(inputs.slates)
    counts = [cfg.slates_for(m) for m in cfg.eval_methods]
    largest = None if None in counts else max(counts)  # the pre-ranker row: every method's slates
    tables, answers, metrics = [], [], {}
    for split in ("valid", "test"):
        cover = coverage(slates, split)
        pool = eval_slates(slates, split, largest, cfg.seed)
        jobs = pool.select(pl.format("{}:{}", "user_id", "position")).to_series().to_list()
        prompts = [
            student_messages(r["history"], r["candidates"], cat, prompt, cowatch, r["user_id"])
            for r in pool.iter_rows(named=True)
        ]
        slate_sids = [[cat.sid[c] for c in r["candidates"]] for r in pool.iter_rows(named=True)]
        shown = [
            [cat.sid[h] for h in list(r["history"])[-prompt.history_items :]]
            for r in pool.iter_rows(named=True)
        ]
        where = {j: i for i, j in enumerate(jobs)}
        budget = prompt.max_explanation_tokens
        for method in cfg.eval_methods:
            rows = eval_slates(slates, split, cfg.slates_for(method), cfg.seed)
            at = [where[f"{r['user_id']}:{r['position']}"] for r in rows.iter_rows(named=True)]

            def progress(done: int, total: int, s: str = split, m: str = method) -> None:
                log.info("%s eval %s %s: %d/%d slates", label, s, m, done, total)

            done = engines[method].run(
                [prompts[i] for i in at],
                [slate_sids[i] for i in at],
                method,
                budget,
                [shown[i] for i in at],
                progress,
            )
            name = label if method == "free" else f"{label} {method}"
            metrics[f"{split}/{name}.budget_closed_rate"] = float(
                np.mean([c.forced_close for c in done])
            )
            answer_texts = [c.text for c in done]
            scored = score_answers(answer_texts, rows, cat)
            extra = {
                "invalid_rate": scored["invalid"],
                "identity_rate": scored["identity"],
                "seconds": np.array([c.seconds for c in done]),
            }
            tables.append(
                reranker_table(
                    name,
                    split,
                    scored["ranks"],
                    extra,
                    ev.bootstrap_samples,
                    ev.confidence,
                    ev.seed,
                    cover,
                )
            )
            answers += _answer_rows(
                split, name, rows, answer_texts, scored["reasons"], scored["ranks"]
            )
        pre = pool["target_rank"].to_numpy()
        zeros = np.zeros(len(pre))
        # the input order, for paired comparisons on the same slates
        answers += _answer_rows(
            split, "preranker", pool, [""] * len(pre), ["input_order"] * len(pre), pre
        )
        tables.append(
            reranker_table(
                "preranker",
                split,
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
    table.write_parquet(out / "metrics.parquet")
    answers_table = pl.DataFrame(answers)
    answers_table.write_parquet(out / "answers.parquet")
    pretty = format_table(table, METRICS)
    described = "; ".join(f"{m}: {e.describe(m)}" for m, e in engines.items())
    markdown = (
        f"# {inputs.title}\n\nconditional: slates with the target; end_to_end: all slates of the "
        f"split (coverage x conditional, both resampled for the interval); n: slates answered; "
        f"value [95% bootstrap CI]; invalid answers count as misses; seconds = answer time "
        f"per slate ({described}); explanations budget-forced at "
        f"{inputs.prompt.max_explanation_tokens} tokens\n\n{to_markdown(pretty)}\n"
    )
    (out / "metrics.md").write_text(markdown)
    log.info("%s eval:\n%s", label, markdown)
    files = {"metrics": "metrics.parquet", "answers": "answers.parquet", "report": "metrics.md"}
    return StageOutput(
        files, metrics, texts={"metrics.md": markdown}, tables={"answers.csv": answers_table}
    )
