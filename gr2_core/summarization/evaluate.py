"""Score summarizers on one test condition: ROUGE-1/2/L F1, order preservation, speed.

A system is a callable (document, aspect) -> summary, run one document at a time so the
seconds per summary are its latency; summaries/s is the count over the summed seconds.

Confidence intervals are cluster bootstraps over documents: the pairs of one document (ACLSum's
three aspect summaries of a paper) share its source text, and Lead-N's output is the same for
all of them, so they are not independent; a resample draws whole documents with all their pairs.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from gr2_core.metrics import bootstrap_ci
from gr2_core.output import Log, StageOutput
from gr2_core.shards import batch_ranges
from gr2_core.summarization.baselines import lead_n, lead_words, timed, truncated
from gr2_core.summarization.ctc import DecodeOptions, Summarizer, from_config
from gr2_core.summarization.data import SummaryPair, asr_noise, cap_pairs, read_pairs
from gr2_core.summarization.metrics import order_score, rouge_scores

if TYPE_CHECKING:
    from data_contracts.ctc import CTCEvalConfig

System = Callable[[str, str], str]
SCORES = ("rouge1", "rouge2", "rougeL", "order")


def score_system(
    name: str,
    system: System,
    pairs: Sequence[SummaryPair],
    sources: Sequence[str],
    condition: str,
    level: str = "word",
) -> pl.DataFrame:
    """One row per pair: prediction, ROUGE F1s, order score (NaN: < 2 matched tokens), seconds.
    `sources` are the documents exactly as the system read them (truncated, noised)."""
    run = timed(lambda i: system(sources[i], pairs[i].aspect), range(len(pairs)), name)
    rouge = rouge_scores([p.summary for p in pairs], run.outputs, level)
    order = [order_score(out, src, level) for out, src in zip(run.outputs, sources, strict=True)]
    return pl.DataFrame(
        {
            "condition": [condition] * len(pairs),
            "system": [name] * len(pairs),
            "id": [p.id for p in pairs],
            "doc_id": [p.doc_id for p in pairs],
            "prediction": run.outputs,
            "rouge1": rouge["rouge1"],
            "rouge2": rouge["rouge2"],
            "rougeL": rouge["rougeL"],
            "order": [None if np.isnan(o) else o for o in order],
            "seconds": run.seconds,
        },
        schema_overrides={"order": pl.Float64},
    )


def summary_table(scores: pl.DataFrame, samples: int, seed: int = 0) -> pl.DataFrame:
    """Per (condition, system): mean and 95% cluster-bootstrap CI (documents resampled) of each
    score, pairs (`n`) and documents, summaries/s, mean latency. The order score averages over
    pairs with at least two matched tokens."""
    rows = []
    for (condition, system), part in scores.group_by(["condition", "system"], maintain_order=True):
        values = {k: part[k].to_numpy().astype(float) for k in ("rouge1", "rouge2", "rougeL")}
        ci = bootstrap_ci(values, samples, 0.95, seed, part["doc_id"].to_list())
        ordered = part.filter(pl.col("order").is_not_null())
        order = ordered["order"].to_numpy().astype(float)
        order_docs = ordered["doc_id"].to_list()
        order_ci = bootstrap_ci({"order": order}, samples, 0.95, seed, order_docs)["order"]
        secs = float(part["seconds"].sum())
        row = {"condition": condition, "system": system, "n": part.height}
        row["documents"] = part["doc_id"].n_unique()
        for k in ("rouge1", "rouge2", "rougeL"):
            row[k], row[f"{k}_low"], row[f"{k}_high"] = ci[k]
        row["order"], row["order_low"], row["order_high"] = order_ci
        row["order_n"] = len(order)
        row["summaries_per_s"] = part.height / secs if secs > 0 else float("nan")
        row["latency_ms"] = 1000 * secs / max(part.height, 1)
        rows.append(row)
    return pl.DataFrame(rows)


def to_markdown_rows(table: pl.DataFrame) -> pl.DataFrame:
    """Display form: 'mean [low, high]' cells; `n` shown as `pairs`."""

    def cell(k: str) -> pl.Expr:
        return pl.format(
            "{} [{}, {}]",
            pl.col(k).round(3),
            pl.col(f"{k}_low").round(3),
            pl.col(f"{k}_high").round(3),
        ).alias(k)

    return table.select(
        "condition",
        "system",
        pl.col("n").alias("pairs"),
        "documents",
        *(cell(k) for k in ("rouge1", "rouge2", "rougeL", "order")),
        pl.col("summaries_per_s").round(2),
        pl.col("latency_ms").round(1),
    )


def pick_by_rouge_l(
    candidates: Sequence[Hashable],
    make_system: Callable[[Any], System],
    pairs: Sequence[SummaryPair],
    sources: Sequence[str],
    level: str = "word",
) -> tuple[Any, dict[Any, float]]:
    """The candidate setting (e.g. an output length) whose system scores the best mean ROUGE-L
    on `pairs` (the validation split), with every candidate's score; the first candidate when
    there are no pairs."""
    scores: dict[Any, float] = {}
    if not pairs:
        return candidates[0], scores
    refs = [p.summary for p in pairs]
    for c in dict.fromkeys(candidates):
        system = make_system(c)
        preds = [system(src, p.aspect) for p, src in zip(pairs, sources, strict=True)]
        scores[c] = float(rouge_scores(refs, preds, level)["rougeL"].mean())
    return max(scores, key=scores.get), scores


def paired_differences(
    scores: pl.DataFrame, baseline: str, metric: str = "rougeL", samples: int = 1000, seed: int = 0
) -> pl.DataFrame:
    """Per condition and system: mean of (system - baseline) `metric` over the pairs both
    scored, with a 95% paired cluster-bootstrap CI that resamples documents with all their
    pairs (an interval excluding 0 separates the two)."""
    rows = []
    for (condition,), part in scores.group_by(["condition"], maintain_order=True):
        base = part.filter(pl.col("system") == baseline).select("id", pl.col(metric).alias("base"))
        for system in part["system"].unique(maintain_order=True):
            if system == baseline:
                continue
            joined = part.filter(pl.col("system") == system).join(base, on="id")
            diff = (joined[metric] - joined["base"]).to_numpy().astype(float)
            docs = joined["doc_id"].to_list()
            mean, lo, hi = bootstrap_ci({"d": diff}, samples, 0.95, seed, docs)["d"]
            rows.append(
                {
                    "condition": condition,
                    "system": system,
                    "versus": baseline,
                    "pairs": len(diff),
                    "documents": len(set(docs)),
                    f"{metric}_difference": f"{mean:.3f} [{lo:.3f}, {hi:.3f}]",
                }
            )
    return pl.DataFrame(rows)


def ctc_system(summarizer: Summarizer, opts: DecodeOptions, encoded: dict | None = None) -> System:
    """(document, aspect) -> summary. Without `encoded` the encoder runs inside the call, so its
    time counts in the latency; with it (tuning on valid), documents encoded beforehand."""

    def summarize(document: str, aspect: str) -> str:
        enc = encoded[document] if encoded is not None else summarizer.encoder.encode([document])[0]
        return summarizer.decode(enc, aspect, opts)

    return summarize


def lead_system(n_words: int) -> System:
    return lambda document, aspect: lead_n(document, n_words)


@dataclass
class Tuned:
    """Settings picked on the validation split, with every candidate's ROUGE-L."""

    length: int
    span: int
    bonus: float
    lead_words: int
    scores: dict[str, dict] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        out = {f"valid_rougeL/ctc_len{n}_span{k}": v for (n, k), v in self.scores["ctc"].items()}
        out |= {f"valid_rougeL/beam_bonus_{b:g}": v for b, v in self.scores["beam"].items()}
        out |= {f"valid_rougeL/lead_{n}": v for n, v in self.scores["lead"].items()}
        return out | {
            "ctc_length": self.length,
            "ctc_span": self.span,
            "beam_bonus": self.bonus,
            "lead_words": self.lead_words,
        }


def tune(
    summarizer: Summarizer, valid: Sequence[SummaryPair], train: Sequence[SummaryPair], cfg, words
) -> Tuned:
    """CTC length and span, beam length bonus and Lead-N: the configured value, or the best
    validation ROUGE-L among the candidates (`cfg` is the flow's evaluation config, `words` the
    source truncation)."""
    sources = truncated([p.document for p in valid], words)
    cache = dict(zip(sources, summarizer.encoder.encode(sources), strict=True))
    median = summarizer.median_summary_tokens
    lengths = (
        [cfg.length] if cfg.length else [max(1, round(median * f)) for f in cfg.length_factors]
    )
    spans = [cfg.span] if cfg.span is not None else cfg.spans
    (length, span), ctc = pick_by_rouge_l(
        [(n, k) for n in lengths for k in spans],
        lambda c: ctc_system(summarizer, DecodeOptions(length=c[0], span=c[1]), cache),
        valid,
        sources,
        cfg.level,
    )
    bonuses = [cfg.length_bonus] if cfg.length_bonus is not None else cfg.length_bonuses
    bonus, beam = pick_by_rouge_l(
        bonuses,
        lambda b: ctc_system(
            summarizer, from_config(DecodeOptions, cfg, method="beam", length_bonus=b), cache
        ),
        valid,
        sources,
        cfg.level,
    )
    n_words = lead_words([p.summary for p in train])
    n_lead, lead = pick_by_rouge_l(
        [max(1, round(n_words * f)) for f in cfg.length_factors],
        lead_system,
        valid,
        sources,
        cfg.level,
    )
    return Tuned(length, span, bonus, n_lead, {"ctc": ctc, "beam": beam, "lead": lead})


def score_conditions(
    summarizer: Summarizer,
    llm: System,
    test: Sequence[SummaryPair],
    llm_pairs: Sequence[SummaryPair],
    tuned: Tuned,
    cfg,
    words: int,
    seed: int,
    conditions: dict[str, float],
    on_condition: Callable[[str], None] | None = None,
    vocabulary: list[str] | None = None,
) -> pl.DataFrame:
    """Every system on every test condition (name -> simulated ASR noise rate): plain greedy,
    length-controlled greedy and beam CTC, Lead-N on all test pairs, the LLM on `llm_pairs`
    (none: not scored). The noise draws its words from `vocabulary` (default: the test
    documents'; a shard of them passes every document's)."""
    systems = {
        "ctc-greedy": ctc_system(summarizer, DecodeOptions("greedy", max_len=cfg.max_len)),
        f"ctc-len{tuned.length}-span{tuned.span}": ctc_system(
            summarizer, DecodeOptions(length=tuned.length, span=tuned.span)
        ),
        f"ctc-beam{cfg.beam}": ctc_system(
            summarizer, from_config(DecodeOptions, cfg, method="beam", length_bonus=tuned.bonus)
        ),
        f"lead-{tuned.lead_words}": lead_system(tuned.lead_words),
    }
    frames = []
    docs = truncated([p.document for p in test], words)
    vocab = vocabulary if vocabulary is not None else words_of(docs)
    for name, rate in conditions.items():
        sources = [asr_noise(doc, rate, seed, vocab) for doc in docs]
        for system, fn in systems.items():
            frames.append(score_system(system, fn, test, sources, name, cfg.level))
        if llm_pairs:
            by_id = dict(zip([p.id for p in test], sources, strict=True))
            llm_sources = [by_id[p.id] for p in llm_pairs]
            frames.append(
                score_system("llm-zero-shot", llm, llm_pairs, llm_sources, name, cfg.level)
            )
        if on_condition:
            on_condition(name)
    return pl.concat(frames)


def words_of(documents: Sequence[str]) -> list[str]:
    """The distinct words of `documents`, sorted: the simulated ASR noise's vocabulary."""
    return sorted({w for doc in documents for w in doc.split()})


@dataclass(frozen=True)
class CTCEvalShard:
    """Test pairs scored in a task of their own (a Ray task): every system on every condition,
    with the settings tuned on valid and the noise vocabulary of all test documents."""

    pairs: Path  # the ctc_data stage's pairs
    model: Path  # the ctc_train stage's model folder
    ids: list[str]  # this shard's test pairs, in test order
    llm_ids: list[str]  # those of them the LLM summarizes
    vocabulary: list[str]
    tuned: Tuned
    cfg: Any  # CTCEvalConfig
    words: int
    seed: int
    index: int


def score_shard(shard: CTCEvalShard) -> pl.DataFrame:
    """`score_conditions` on one shard's pairs; its rows carry the shard's index (`shard`)."""
    from gr2_core.summarization.baselines import LLMSummarizer

    mine, llm_ids = set(shard.ids), set(shard.llm_ids)
    test = [p for p in read_pairs(shard.pairs, "test") if p.id in mine]
    llm_pairs = [p for p in test if p.id in llm_ids]
    cfg = shard.cfg
    llm = None  # a shard without the LLM's pairs does not load it
    if llm_pairs:
        llm = LLMSummarizer(cfg.llm_source, cfg.llm_max_new_tokens, cfg.num_threads)
    frame = score_conditions(
        Summarizer.load(shard.model),
        llm,
        test,
        llm_pairs,
        shard.tuned,
        cfg,
        shard.words,
        shard.seed,
        conditions(cfg.noise_rates),
        vocabulary=shard.vocabulary,
    )
    return frame.with_columns(pl.lit(shard.index).alias("shard"))


def merge_shards(frames: Sequence[pl.DataFrame], names: Sequence[str]) -> pl.DataFrame:
    """The shards' scores in the order one pass writes them: by condition (in `names` order),
    system (in the order they were scored), then shard; each shard's pairs in test order."""
    scores = pl.concat(frames)
    systems = scores["system"].unique(maintain_order=True).to_list()
    rank = {
        "c": pl.col("condition").replace_strict({c: i for i, c in enumerate(names)}),
        "s": pl.col("system").replace_strict({c: i for i, c in enumerate(systems)}),
    }
    return (
        scores.with_columns(**rank)
        .sort("c", "s", "shard", maintain_order=True)
        .drop("c", "s", "shard")
    )


MapShards = Callable[[list[CTCEvalShard]], list[pl.DataFrame]]


def conditions(rates: Sequence[float]) -> dict[str, float]:
    """Test condition names for simulated ASR noise rates (0 is `clean`)."""
    return {("clean" if r == 0 else f"asr-noise-{r:g}"): r for r in rates}


@dataclass(frozen=True)
class CTCEvalInputs:
    pairs: Path  # the ctc_data stage's pairs
    model: Path  # the ctc_train stage's model folder
    max_source_words: int  # every system reads the documents cut to this many words
    seed: int  # ASR noise, the LLM's pair sample and the bootstrap


def run(
    inputs: CTCEvalInputs,
    cfg: CTCEvalConfig,
    out: Path,
    log: Log,
    map_shards: MapShards | None = None,
    shards: int = 1,
) -> StageOutput:
    """Stage `ctc_eval`: CTC (greedy, length-controlled greedy, beam), Lead-N and the zero-shot
    LLM on the test split, clean and with simulated ASR noise; decoding settings picked on valid;
    intervals clustered by document. With `map_shards` (the stage's task runner, e.g. Ray
    tasks) the test pairs are scored in `shards` contiguous parts (`score_shard`), each loading
    the models itself: the same scores in the same order (the seconds are each task's)."""
    from data_contracts.summaries import SUMMARY_SCORES
    from data_contracts.tables import validate
    from gr2_core.plots import close, summarizer_bars
    from gr2_core.report import to_markdown
    from gr2_core.summarization.baselines import LLMSummarizer

    test, train = read_pairs(inputs.pairs, "test"), read_pairs(inputs.pairs, "train")
    summarizer = Summarizer.load(inputs.model)
    words = inputs.max_source_words
    tuned = tune(summarizer, read_pairs(inputs.pairs, "valid"), train, cfg, words)
    log.info("ctc_eval: picked on valid by ROUGE-L: %s", tuned)
    llm_pairs = cap_pairs(test, cfg.llm_max_pairs, inputs.seed)
    if map_shards is not None and shards > 1:
        llm_ids = {p.id for p in llm_pairs}
        vocabulary = words_of(truncated([p.document for p in test], words))
        parts = [
            CTCEvalShard(
                inputs.pairs,
                inputs.model,
                [p.id for p in test[a:b]],
                [p.id for p in test[a:b] if p.id in llm_ids],
                vocabulary,
                tuned,
                cfg,
                words,
                inputs.seed,
                k,
            )
            for k, (a, b) in enumerate(batch_ranges(len(test), 1, shards))
        ]
        log.info("ctc_eval: %d test pairs in %d shards on the runner", len(test), len(parts))
        frames = merge_shards(map_shards(parts), list(conditions(cfg.noise_rates)))
    else:
        llm = LLMSummarizer(cfg.llm_source, cfg.llm_max_new_tokens, cfg.num_threads)
        frames = score_conditions(
            summarizer,
            llm,
            test,
            llm_pairs,
            tuned,
            cfg,
            words,
            inputs.seed,
            conditions(cfg.noise_rates),
            lambda name: log.info("ctc_eval: condition %s scored", name),
        )
    scores = validate(SUMMARY_SCORES, frames, "ctc_eval scores")
    table = summary_table(scores, cfg.bootstrap_samples, inputs.seed)
    scores.write_parquet(out / "scores.parquet")
    table.write_parquet(out / "table.parquet")
    lead = f"lead-{tuned.lead_words}"
    differences = paired_differences(scores, lead, "rougeL", cfg.bootstrap_samples, inputs.seed)
    differences.write_parquet(out / "differences.parquet")
    report = (
        to_markdown(to_markdown_rows(table))
        + f"\n\nROUGE-L minus {lead} on the same test pairs, mean [95% paired bootstrap CI, "
        + "clustered by document]:\n\n"
        + to_markdown(differences)
    )
    (out / "report.md").write_text(report + "\n")
    close(summarizer_bars(table, out / "results.png"))
    metrics = tuned.metrics()
    for row in table.iter_rows(named=True):
        for k in ("rouge1", "rouge2", "rougeL", "order", "summaries_per_s", "latency_ms"):
            metrics[f"{row['condition']}/{row['system']}/{k}"] = row[k]
    files = {
        "scores": "scores.parquet",
        "table": "table.parquet",
        "differences": "differences.parquet",
        "report": "report.md",
        "plot": "results.png",
    }
    return StageOutput(
        files, metrics, tables={"scores.parquet": scores}, attach={"results.png": ""}
    )
