"""Reporting, in one module: what a finished run shows in Prefect and MLflow, and the docs.

- `publish` / `ctc_publish` (each flow's last task, never cached): Prefect table artifacts, the
  rerankers' table and plots on the parent MLflow run, and the parent run's tags naming every
  stage's output folder. They return a `RunResult`: the stages' manifests and where the run was
  tracked; the flow returns it.
- `read_run` gets a `RunResult` (and the run's config) back from MLflow for any finished run.
- `pipeline_report` / `ctc_report` turn a `RunResult` into markdown read from the manifests'
  files; `write_docs` puts them into docs sections, `write_timings` puts the run's measured wall
  times into the one page that holds timings (docs/timings.md). The CLI only dispatches here.

Not a stage: its code shapes no stage output, so it is no stage's cache key; editing it re-keys
nothing.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from mlflow.tracking import MlflowClient
from prefect import task
from prefect.artifacts import create_table_artifact
from pydantic import BaseModel

from data_contracts.config import PipelineConfig
from data_contracts.ctc import CTCFlowConfig, FlowConfig
from data_contracts.manifest import Manifest
from data_contracts.rerankers import (
    RL_VARIANTS,
    TRAINED_EVAL_STAGES,
    compared_variants,
    rl_stage,
    sft_stage,
)
from gr2_core.baselines import format_table
from gr2_core.promotion import paired_differences
from gr2_core.report import method_label, replace_section, rl_training_table, to_markdown
from tasks.inputs import read
from tasks.stage import require
from tasks.tracking import Tracking, finish_parent

STAGE_TAG = "gr2.stage.{}.dir"  # parent-run tag: a stage's output folder (its manifest inside)
STAGES_TAG = "gr2.stages"  # parent-run tag: the run's stages in flow order
COMMAND_TAG = "gr2.command"  # parent-run tag: the CLI command that started the run, if any


class RunResult(BaseModel):
    """What a flow returns: its stages' manifests in flow order and where the run is tracked."""

    flow: str
    profile: str
    stages: dict[str, Manifest]
    tracking_uri: str
    experiment_id: str
    mlflow_run_id: str
    promotion: str = ""  # the registry's decision (pipeline)
    model_version: str = ""  # the registered version (CTC)

    def get(self, stage: str) -> Manifest | None:
        return self.stages.get(stage)


def _finish(config: FlowConfig, flow: str, tracking: Tracking, stages: list[Manifest]) -> RunResult:
    """Tag the parent run with every stage's key, run and folder, close it; the result."""
    tags = {STAGES_TAG: ",".join(m.stage for m in stages)}
    for m in stages:
        tags[f"gr2.stage.{m.stage}.key"] = m.key
        tags[f"gr2.stage.{m.stage}.run_id"] = m.mlflow_run_id or ""
        tags[STAGE_TAG.format(m.stage)] = m.directory
    finish_parent(tracking, tags=tags)  # after the parent run's own artifacts
    return RunResult(
        flow=flow,
        profile=config.profile,
        stages={m.stage: m for m in stages},
        tracking_uri=tracking.tracking_uri,
        experiment_id=tracking.experiment_id,
        mlflow_run_id=tracking.parent_run_id or "",
    )


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
def publish(config: PipelineConfig, tracking: Tracking, stages: list[Manifest]) -> RunResult:
    """Every run (cached or not): table artifacts in Prefect, the rerankers' table and plots on
    the parent run, stage links on the parent run."""
    for m in stages:  # a stage Prefect's cache returned may have been deleted since
        require(m)
    baselines = next(m for m in stages if m.stage == "baselines")
    create_table_artifact(
        format_table(read(baselines, "metrics")).to_dicts(),
        key="gr2-baselines",
        description=f"Baselines on {config.data.dataset} ({config.profile}): value [95% CI]",
    )
    midtrain_eval = next((m for m in stages if m.stage == "midtrain_eval"), None)
    if midtrain_eval is not None:
        create_table_artifact(
            format_table(read(midtrain_eval, "metrics")).to_dicts(),
            key="gr2-midtrain",
            description=f"Student next-item retrieval (constrained beam search) vs the pre-ranker "
            f"on {config.data.dataset} ({config.profile}): value [95% CI]",
        )
    evaluations = [m for m in stages if m.stage in TRAINED_EVAL_STAGES]
    if evaluations:
        table, wide = reranker_tables(evaluations)
        description = (
            f"Every trained reranker vs the pre-ranker order, {config.data.dataset} "
            f"({config.profile}): conditional (target in the slate) and end to end, "
            "value [95% bootstrap CI]"
        )
        create_table_artifact(wide.to_dicts(), key="gr2-rerankers", description=description)
        log_evaluation(tracking, table, wide, description)
    return _finish(config, "gr2-pipeline", tracking, stages)


@task(name="ctc_publish")
def ctc_publish(config: CTCFlowConfig, tracking: Tracking, stages: list[Manifest]) -> RunResult:
    """Every run (cached or not): the results table in Prefect, stage links on the parent run."""
    from gr2_core.summarization.evaluate import to_markdown_rows

    scored = next(m for m in stages if m.stage == "ctc_eval")
    create_table_artifact(
        to_markdown_rows(read(scored, "table")).to_dicts(),
        key="gr2-ctc",
        description=f"CTC summarizer vs baselines, {config.data.source} test "
        f"({config.profile}): mean [95% CI, documents resampled], summaries/s one document at "
        "a time",
    )
    return _finish(config, "ctc-summarization", tracking, stages)


def reranker_tables(evaluations: list[Manifest]):
    """Every reranker evaluation's metrics (long) and the wide value [CI] table."""
    import polars as pl

    from gr2_core.rerank_eval import METRICS

    table = pl.concat([read(m, "metrics") for m in evaluations]).unique(
        ["method", "split", "mode", "metric"], keep="first", maintain_order=True
    )
    wide = format_table(table, METRICS).sort(
        "split", "mode", "method", descending=[True, False, False]
    )
    return table, wide


def read_run(tracking_uri: str, run_id: str) -> tuple[RunResult, dict]:
    """A finished run read back from MLflow: its stages' manifests (from the folders its
    parent run names) and its resolved config (the run's `config.json`)."""
    client = MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    tags = run.data.tags
    folders = {
        k.removeprefix("gr2.stage.").removesuffix(".dir"): Path(v)
        for k, v in tags.items()
        if k.startswith("gr2.stage.") and k.endswith(".dir")
    }
    if not folders:
        raise ValueError(
            f"MLflow run {run_id} at {tracking_uri} is not a finished GR2 flow run (no stage "
            "tags); pass the parent run of `gr2 run` or `gr2 ctc`"
        )
    stages = {}
    for folder in folders.values():
        manifest = Manifest.read(folder)
        if manifest is None:
            raise FileNotFoundError(f"run {run_id}: no manifest in {folder} (artifacts deleted?)")
        stages[manifest.stage] = manifest
    if STAGES_TAG in tags:  # flow order
        stages = {name: stages[name] for name in tags[STAGES_TAG].split(",")}
    else:  # runs from before the tag: a stage's manifest is written after its upstream's
        stages = dict(
            sorted(stages.items(), key=lambda i: (folders[i[0]] / "manifest.json").stat().st_mtime)
        )
    with tempfile.TemporaryDirectory() as tmp:  # through this client: `--tracking-uri` holds
        config = json.loads(Path(client.download_artifacts(run_id, "config.json", tmp)).read_text())
    result = RunResult(
        flow=tags.get("gr2.flow", ""),
        profile=tags.get("gr2.profile", ""),
        stages=stages,
        tracking_uri=tracking_uri,
        experiment_id=run.info.experiment_id,
        mlflow_run_id=run_id,
    )
    return result, config


def latest_run(tracking_uri: str, experiment: str, profile: str) -> str:
    """The newest finished flow run of `profile` in `experiment` (its parent run id)."""
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    runs = (
        client.search_runs(
            [exp.experiment_id],
            f"tags.`gr2.profile` = '{profile}' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
        )
        if exp
        else []
    )
    runs = [r for r in runs if any(t.startswith("gr2.stage.") for t in r.data.tags)]
    if not runs:
        raise ValueError(
            f"no finished run of profile {profile!r} in experiment {experiment!r} at "
            f"{tracking_uri}; run it first (`gr2 run --profile {profile}`)"
        )
    return runs[0].info.run_id


def record(result: RunResult, **tags: str) -> None:
    """Tags on the finished run's parent (`command`: the CLI command that started it)."""
    client = MlflowClient(result.tracking_uri)
    for k, v in tags.items():
        if v:
            client.set_tag(result.mlflow_run_id, f"gr2.{k}", v)


def run_seconds(result: RunResult) -> tuple[float, dict[str, float | None], set[str]]:
    """The flow's wall time (its parent run's start to end), each stage's wall time when it was
    computed, and the stages computed in this run (the others were reused from the cache)."""
    client = MlflowClient(result.tracking_uri)
    info = client.get_run(result.mlflow_run_id).info
    flow = ((info.end_time or int(time.time() * 1000)) - info.start_time) / 1000
    children = client.search_runs(
        [result.experiment_id], f"tags.mlflow.parentRunId = '{result.mlflow_run_id}'"
    )
    own = {r.info.run_id for r in children}
    computed = {s for s, m in result.stages.items() if m.mlflow_run_id in own}
    seconds = {s: m.metrics.get("wall_seconds") for s, m in result.stages.items()}
    return flow, seconds, computed


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
        label = method_label(stage)
        start = method_label(sft_stage(config.rl.sft_mode(variant)))
        # the pre-ranker, its SFT start, and the variants it is declared to be compared with
        # (GR2 against the other start, the unconditional ablation against its twin)
        rivals = [
            method_label(rl_stage(v))
            for v in compared_variants(variant, config.rl.unconditional_start)
        ]
        for ours in sorted(m for m in methods if m.startswith(label)):
            others = ["preranker", ours.replace(label, start)]
            others += [ours.replace(label, r) for r in rivals]
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


# --- reports and docs, from a finished run's manifests ----------------------------------------


class PipelineReport(BaseModel):
    """The pipeline run's tables, as markdown read from its stages' files."""

    baselines: str  # with its own title line
    midtrain: str = ""  # with its own title line
    traces: str = ""  # the teacher's acceptance per mode
    traces_digest: str = ""
    rerankers: str = ""
    rl: str = ""
    rl_histories: dict[str, list[dict]] = {}


def pipeline_report(config: PipelineConfig, result: RunResult) -> PipelineReport:
    evaluations = [m for s, m in result.stages.items() if s in TRAINED_EVAL_STAGES]
    midtrain_eval, traces = result.get("midtrain_eval"), result.get("traces")
    histories = {
        s: json.loads(m.path("log_history").read_text())
        for s, m in result.stages.items()
        if s in {rl_stage(v.name) for v in RL_VARIANTS}
    }
    return PipelineReport(
        baselines=result.stages["baselines"].path("report").read_text(),
        midtrain=midtrain_eval.path("report").read_text() if midtrain_eval else "",
        traces=traces_summary(traces.metrics) if traces else "",
        traces_digest=traces_digest(traces),
        rerankers=to_markdown(reranker_tables(evaluations)[1]) if evaluations else "",
        rl=rl_comparison(config, histories, evaluations) if histories else "",
        rl_histories=histories,
    )


def ctc_report(result: RunResult) -> str:
    return result.stages["ctc_eval"].path("report").read_text()


def console(result: RunResult, text: str) -> str:
    """What the CLI prints after a run: the tables, then where to look."""
    parts = [text]
    if result.promotion:
        parts.append(result.promotion)
    parts.append(
        f"MLflow: tracking URI {result.tracking_uri}, experiment {result.experiment_id}, run "
        f"{result.mlflow_run_id}\nBrowse runs: `make ui`, then Prefect at http://127.0.0.1:4200 "
        f"and MLflow at http://127.0.0.1:5000/#/experiments/{result.experiment_id}/runs/"
        f"{result.mlflow_run_id}\nWall times: {TIMINGS_DOC} (`--timings-doc`)"
    )
    return "\n\n".join(parts)


def pipeline_console(report: PipelineReport) -> str:
    parts = [report.baselines, report.midtrain]
    if report.rerankers:
        parts += [f"Teacher traces:\n{report.traces}", f"Rerankers:\n{report.rerankers}"]
    if report.rl:
        parts.append(f"DAPO:\n{report.rl}")
    return "\n\n".join(p for p in parts if p)


def traces_summary(metrics: dict[str, float]) -> str:
    """Markdown table of the teacher's acceptance per mode from the traces stage metrics."""
    modes = sorted({k.split("/")[0] for k in metrics if k.endswith("/slates")})
    lines = [
        "| mode | slates | attempts | accepted slates | slate acceptance | attempt acceptance "
        "| rejections |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in modes:
        reasons = ", ".join(
            f"{k.split('/', 2)[2]} {v:.0f}"
            for k, v in sorted(metrics.items())
            if k.startswith(f"{m}/rejected/")
        )
        lines.append(
            f"| {m} | {metrics[f'{m}/slates']:.0f} | {metrics[f'{m}/attempts']:.0f} | "
            f"{metrics[f'{m}/accepted_slates']:.0f} | {metrics[f'{m}/slate_acceptance']:.3f} | "
            f"{metrics[f'{m}/attempt_acceptance']:.3f} | {reasons or '-'} |"
        )
    return "\n".join(lines)


TIMINGS_DOC = "docs/timings.md"
TIMING_NOTE = "wall times: [timings.md](timings.md)"


def _body(markdown: str) -> str:
    """A stage report without its own title line."""
    return markdown.split("\n", 2)[2] if markdown.startswith("#") else markdown


def write_docs(
    config: PipelineConfig,
    result: RunResult,
    report: PipelineReport,
    command: str,
    doc: str | None = None,
    midtrain_doc: str | None = None,
    sft_doc: str | None = None,
    rl_doc: str | None = None,
) -> list[str]:
    """The pipeline run's sections in the given markdown files; returns what was written."""
    where = f"{config.data.dataset} (profile {config.profile})"
    note = f"Command: `{command}` (MLflow run {result.mlflow_run_id[:12]}; {TIMING_NOTE})."
    written = []

    def section(path: str, heading: str, body: str, title: str) -> None:
        replace_section(Path(path), heading, f"{note}\n\n{body.strip()}\n", title)
        written.append(f"'{heading}' of {path}")

    if doc:
        section(doc, f"Baselines, {where}", _body(report.baselines), "Results")
        if report.rerankers:
            section(
                doc,
                f"Rerankers, {where}",
                "Every trained reranker of the run and the pre-ranker order on the same slates: "
                "`sft.eval_slates` per split for the methods that decode, `sft.scored_slates` "
                "for `scored` (the smaller sets drawn from the larger; the pre-ranker row on "
                "the largest); conditional = slates that contain the target; "
                "end_to_end = all slates of the split (the pre-ranker's coverage x conditional, "
                "both resampled for the interval); n = slates answered. Value [95% bootstrap "
                "CI]; invalid answers count as misses; seconds = answer time per slate. "
                "Decoding, every explanation budget-forced (`prompt.max_explanation_tokens`): "
                "a bare name = free (the model writes the list); `constrained` = the list "
                "decoded as a permutation of the slate; `scored` = the slate ordered by each "
                "SID's probability as the first list item, no list decoded; `scored_explained` "
                "= scored after an explanation. The registered model serves `sft.serve_method`."
                f"\n\n{report.rerankers}",
                "Results",
            )
    if midtrain_doc and report.midtrain:
        section(
            midtrain_doc,
            f"Student next-item retrieval, {where}",
            _body(report.midtrain),
            "Benchmarks",
        )
    if sft_doc and report.rerankers:
        section(
            sft_doc,
            f"Teacher traces and SFT rerankers, {where}",
            "Teacher acceptance (a slate is accepted when one attempt passes the filter with the "
            f"target first):\n\n{report.traces}\n\nTeacher outputs: {report.traces_digest}.\n\n"
            "Rerankers on conditional slates, value [95% bootstrap CI]; invalid answers count "
            f"as misses; seconds = generation time per slate:\n\n{report.rerankers}",
            "Benchmarks",
        )
    if rl_doc and report.rl:
        from gr2_core.plots import close, rl_curves

        figure = Path(rl_doc).parent / "img" / f"rl_{config.data.dataset}_{config.profile}.png"
        figure.parent.mkdir(parents=True, exist_ok=True)
        close(rl_curves({method_label(s): h for s, h in report.rl_histories.items()}, figure))
        rl = config.rl
        sampling = f"on ({rl.max_sampling_rounds} extra rounds)" if rl.dynamic_sampling else "off"
        section(
            rl_doc,
            f"DAPO runs, {where}",
            f"{rl.max_steps} optimizer steps: {rl.max_steps // rl.steps_per_rollout} rollout "
            f"batches of {rl.prompts_per_step} groups x {rl.group_size} rollouts, each driving "
            f"{rl.steps_per_rollout} steps ({rl.mini_batches} mini-batches x "
            f"{rl.num_iterations} passes), "
            f"lr {rl.lr:g}, temperature {rl.temperature:g}, up to {rl.max_completion_length} "
            f"completion tokens, dynamic sampling {sampling}, {rl.slates} training slates.\n\n"
            f"![DAPO curves]({figure.relative_to(Path(rl_doc).parent).as_posix()})\n\n"
            f"{report.rl}",
            "DAPO",
        )
    return written


def write_ctc_doc(
    config: CTCFlowConfig, result: RunResult, command: str, doc: str, variant: str = ""
) -> str:
    """The CTC run's results section of `doc`; `variant` (its --set overrides) names it."""
    source = config.data.source if config.data.source == "jsonl" else "ACLSum"
    heading = f"CTC summarization, {source} test (profile {config.profile}{variant})"
    note = (
        f"Command: `{command}` (MLflow run {result.mlflow_run_id[:12]}; {TIMING_NOTE}). Mean "
        "[95% bootstrap CI] over test pairs; the intervals are clustered by document: each "
        "resample draws documents (papers) with all their pairs (aspects), which are not "
        "independent; order = Kendall tau between summary order and the source positions of its "
        "words; summaries/s and latency one document at a time. Simulated ASR noise: word "
        "deletions, substitutions and insertions at the given rate (seeded), not real ASR."
    )
    replace_section(Path(doc), heading, f"{note}\n\n{ctc_report(result)}", "Results")
    return f"'{heading}' of {doc}"


def write_timings(
    result: RunResult, command: str, variant: str = "", path: str = TIMINGS_DOC
) -> str:
    """The run's wall times as one section of the timings page: the flow's, then each stage's
    (measured when the stage was computed; a stage reused from the cache says so)."""
    flow, seconds, computed = run_seconds(result)
    client = MlflowClient(result.tracking_uri)
    run = client.get_run(result.mlflow_run_id)
    commit = run.data.tags.get("mlflow.source.git.commit", "unknown")[:7]
    cpus = run.data.tags.get("gr2.host_cpus") or str(os.cpu_count())
    day = time.strftime("%Y-%m-%d", time.gmtime(run.info.start_time / 1000))
    rows = [
        f"| {s} | {_duration(v)} | {'this run' if s in computed else 'reused from the cache'} |"
        for s, v in seconds.items()
    ]
    body = (
        f"Command: `{command}`, commit {commit}, {day}, {cpus} CPU cores, MLflow run "
        f"{result.mlflow_run_id[:12]}. Flow wall time {_duration(flow)} "
        f"({len(computed)} of {len(seconds)} stages computed in this run).\n\n"
        "| stage | wall time | computed |\n|---|---|---|\n" + "\n".join(rows)
    )
    # a rerun that only found cached stages keeps a section of its own beside the cold run's
    rerun = "" if computed else ", every stage from the cache"
    heading = f"{result.flow}, profile {result.profile}{variant}{rerun}"
    replace_section(Path(path), heading, body, "Timings")
    return f"'{heading}' of {path}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"
