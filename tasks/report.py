"""The run's report (never cached): Prefect table artifacts, the parent MLflow run's evaluation
tables and plots, and the sections the CLI writes into docs (`publish`, the flow's last task).

Not a stage: its code shapes no stage output, so it is no stage's cache key; editing it re-keys
nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task
from prefect.artifacts import create_table_artifact

from data_contracts.config import PipelineConfig
from data_contracts.manifest import Manifest
from gr2_core.baselines import format_table
from gr2_core.promotion import paired_differences
from gr2_core.report import rl_training_table, to_markdown
from tasks.inputs import read
from tasks.tracking import Tracking, finish_parent


def log_evaluation(tracking: Tracking, table, wide, description: str) -> None:
    """The rerankers' table (long CSV, wide markdown) and bar plots on the flow's parent run."""
    import tempfile

    import matplotlib.pyplot as plt
    from mlflow.tracking import MlflowClient

    from gr2_core.plots import reranker_bars

    if not tracking.parent_run_id:
        return
    client = MlflowClient(tracking.tracking_uri)
    run_id = tracking.parent_run_id
    client.log_text(run_id, f"{description}\n\n{to_markdown(wide)}\n", "evaluation/rerankers.md")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rerankers.csv"
        table.write_csv(path)
        client.log_artifact(run_id, str(path), "evaluation")
        for split in ("valid", "test"):
            fig = reranker_bars(table, Path(tmp) / f"rerankers_{split}.png", split)
            client.log_artifact(run_id, str(Path(tmp) / f"rerankers_{split}.png"), "evaluation")
            plt.close(fig)


@task(name="publish")
def publish(config: PipelineConfig, tracking: Tracking, stages: list[Manifest]) -> dict[str, str]:
    """Every run (cached or not): table artifact in Prefect, stage links on the parent run."""
    baselines = next(m for m in stages if m.stage == "baselines")
    table = format_table(read(baselines, "metrics"))
    create_table_artifact(
        table.to_dicts(),
        key="gr2-baselines",
        description=f"Baselines on {config.data.dataset} ({config.profile}): value [95% CI]",
    )
    tags = {}
    for m in stages:
        tags[f"gr2.stage.{m.stage}.key"] = m.key
        tags[f"gr2.stage.{m.stage}.run_id"] = m.mlflow_run_id or ""
        tags[f"gr2.stage.{m.stage}.dir"] = m.directory
    midtrain_eval = next((m for m in stages if m.stage == "midtrain_eval"), None)
    if midtrain_eval is not None:
        create_table_artifact(
            format_table(read(midtrain_eval, "metrics")).to_dicts(),
            key="gr2-midtrain",
            description=f"Student next-item retrieval (constrained beam search) vs the pre-ranker "
            f"on {config.data.dataset} ({config.profile}): value [95% CI]",
        )
    reranker_evals = [m for m in stages if m.stage.startswith(("sft_eval_", "rl_eval_"))]
    reranker_report = ""
    if reranker_evals:
        import polars as pl

        from gr2_core.rerank_eval import METRICS

        table = pl.concat([read(m, "metrics") for m in reranker_evals]).unique(
            ["method", "split", "mode", "metric"], keep="first", maintain_order=True
        )
        wide = format_table(table, METRICS).sort(
            "split", "mode", "method", descending=[True, False, False]
        )
        reranker_report = to_markdown(wide)
        description = (
            f"Every trained reranker vs the pre-ranker order, {config.data.dataset} "
            f"({config.profile}): conditional (target in the slate) and end to end, "
            "value [95% bootstrap CI]"
        )
        create_table_artifact(wide.to_dicts(), key="gr2-rerankers", description=description)
        log_evaluation(tracking, table, wide, description)
    rl_histories = {
        m.stage: json.loads(m.path("log_history").read_text())
        for m in stages
        if m.stage.startswith("rl_") and not m.stage.startswith("rl_eval_")
    }
    rl_report = rl_comparison(config, rl_histories, reranker_evals) if rl_histories else ""
    finish_parent(tracking, tags=tags)  # after the parent run's own artifacts
    traces = next((m for m in stages if m.stage == "traces"), None)
    return {
        "reranker_report": reranker_report,
        "rl_report": rl_report,
        "rl_histories": rl_histories,
        "traces": {k: v for k, v in (traces.metrics if traces else {}).items() if "/" in k},
        "traces_digest": traces_digest(traces),
        "report": baselines.path("report").read_text(),
        "midtrain_report": midtrain_eval.path("report").read_text() if midtrain_eval else "",
        "stage_seconds": {m.stage: m.metrics.get("wall_seconds") for m in stages},
        "tracking_uri": tracking.tracking_uri,
        "experiment_id": tracking.experiment_id,
        "mlflow_run_id": tracking.parent_run_id or "",
    }


def traces_digest(traces: Manifest | None) -> str:
    """Which teacher outputs a published table comes from: the traces stage key and the
    sha256 (first 12 hex digits) of each mode's accepted traces. The stage is cached, so a
    rerun of the same command reuses these files and reproduces the table; a fresh teacher run
    (another machine, another batching on the server) shows up as another digest."""
    if traces is None:
        return ""
    files = sorted((n, f) for n, f in traces.files.items() if n.endswith("_traces"))
    hashes = ", ".join(f"{n} {f.sha256[:12]} ({f.rows} rows)" for n, f in files)
    return f"traces stage {traces.key[:12]}: {hashes}"


RL_COMPARED = ("recall@1", "recall@5", "ndcg@5")


def rl_comparison(
    config: PipelineConfig, histories: dict[str, list[dict]], evaluations: list[Manifest]
) -> str:
    """Markdown: each RL run's monitors (first -> last steps), every reranker's test metrics,
    then on test the paired differences of every RL reranker with the pre-ranker order, its
    SFT start, and RL-rejection with RL-targeted and RL-unconditional with its conditional twin
    (same slates, same decoding; value [95% paired bootstrap CI])."""
    import polars as pl

    ev = config.evaluation
    parts = [
        "Training (rollouts of each step; first -> last: mean of the first and the last 3 "
        "steps):\n\n"
        + to_markdown(rl_training_table({s.replace("_", "-", 1): h for s, h in histories.items()}))
    ]
    metrics = pl.concat([read(m, "metrics") for m in evaluations]).unique(
        ["method", "split", "mode", "metric"], keep="first", maintain_order=True
    )
    test = metrics.filter((pl.col("split") == "test") & (pl.col("mode") == "conditional"))
    shown = [*RL_COMPARED, "invalid_rate", "identity_rate"]
    wide = format_table(test.filter(pl.col("metric").is_in(shown)), shown).sort("method")
    parts.append(
        "Test, conditional slates (target in the slate), value [95% bootstrap CI]; invalid "
        "answers count as misses:\n\n" + to_markdown(wide)
    )
    table = pl.concat(
        [read(m, "answers").select("split", "method", "job", "rank") for m in evaluations]
    )
    table = table.unique(["split", "method", "job"], keep="first", maintain_order=True)
    methods = set(table["method"])
    pairs = []
    for stage in histories:
        variant = stage.removeprefix("rl_")
        start = config.rl.sft_mode(variant)
        for ours in sorted(m for m in methods if m.startswith(f"rl-{variant}")):
            others = ["preranker", ours.replace(f"rl-{variant}", f"sft-{start}")]
            if variant == "rejection":  # GR2 against the other start
                others.append(ours.replace("rl-rejection", "rl-targeted"))
            if variant == "unconditional":  # the ablation against its conditional twin
                others.append(ours.replace("rl-unconditional", f"rl-{start}"))
            pairs += [(ours, o) for o in others if o in methods]
    diffs = paired_differences(
        table, "test", pairs, RL_COMPARED, ev.bootstrap_samples, ev.confidence, ev.seed
    )
    if diffs.is_empty():
        return "\n\n".join(parts)
    wide = diffs.with_columns(
        pl.format(
            "{} [{}, {}]", *(pl.col(c).round(4) for c in ("diff", "ci_low", "ci_high"))
        ).alias("value")
    ).pivot("metric", index=["method", "baseline", "n"], values="value")
    parts.append(
        "Test, paired differences (method - baseline) on the same conditional slates, "
        "[95% paired bootstrap CI]; a CI above 0 means the method is better:\n\n"
        + to_markdown(wide)
    )
    return "\n\n".join(parts)
