"""Registry flows: promotion on its own, and scheduled retraining.

`gr2_promote` decides on a registered version (default: the `challenger` alias) against the
`champion`, exactly as the pipeline's last task does: for a version registered with
`registry.promote: false` (e.g. to look at it first) or registered by another run. A version
that already carries a decision is left as it is. `gr2_retrain` is the pipeline for a schedule: new
interactions in the data files are picked up (the data stage hashes its inputs), the semantic-ID
tokenizer of the current champion is reused so existing items keep their SIDs (new items get
codes from its frozen codebooks), and promotion runs at the end.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task

from data_contracts.config import PipelineConfig, load_profile
from flows.gr2_pipeline import gr2_pipeline
from tasks.registry import CHALLENGER, CHAMPION, Registered, alias_version, client_for, promote
from tasks.report import RunResult
from tasks.setup import start_tracking
from tasks.tracking import fail_parent_hook, finish_parent, resolve_uri

DEMO = load_profile("demo")


@task(name="resolve-version")
def resolve_version(config: PipelineConfig, version: str) -> Registered:
    """The registered version to decide on: `version`, else the `challenger` alias."""
    name = config.registry.model_name
    client = client_for(resolve_uri(config))
    mv = client.get_model_version(name, version) if version else None
    if mv is None:
        mv = alias_version(client, name, CHALLENGER)
    if mv is None:
        raise ValueError(f"{name} has no version with alias '{CHALLENGER}'; run the pipeline first")
    return Registered(
        name=name,
        version=str(mv.version),
        run_id=mv.run_id,
        eval_set=mv.tags.get("gr2.eval_set", ""),
        created=False,
    )


@flow(name="gr2-promote", on_failure=[fail_parent_hook], on_crashed=[fail_parent_hook])
def gr2_promote(config: PipelineConfig = DEMO, version: str = "") -> str:
    """Challenger (or `version`) vs champion on the frozen evaluation set; moves `champion`
    only if the challenger is not worse. Returns the decision as markdown."""
    tracking = start_tracking(config, "gr2-promote")
    report = promote(config, resolve_version(config, version), tracking)
    finish_parent(tracking)
    return report


@task(name="pin-semantic-ids")
def pin_semantic_ids(config: PipelineConfig) -> PipelineConfig:
    """Reuse the champion's semantic-ID tokenizer (`semantic_ids.base`) unless one is set."""
    log = get_run_logger()
    if config.semantic_ids.base:
        log.info("semantic_ids.base already set to %s", config.semantic_ids.base)
        return config
    champion = alias_version(client_for(resolve_uri(config)), config.registry.model_name, CHAMPION)
    folder = champion.tags.get("gr2.semantic_ids_dir", "") if champion else ""
    if not folder or not Path(folder, "sid_map.parquet").exists():
        log.info("no champion semantic-ID folder to reuse (%r): SIDs are trained afresh", folder)
        return config
    log.info("reusing champion version %s's semantic IDs from %s", champion.version, folder)
    section = config.semantic_ids.model_copy(update={"base": folder})
    return config.model_copy(update={"semantic_ids": section})


@flow(name="gr2-retrain")
def gr2_retrain(config: PipelineConfig = DEMO) -> RunResult:
    """Retraining for a schedule: the pipeline on the current data with the champion's SIDs
    kept, ending with registration and promotion."""
    return gr2_pipeline(pin_semantic_ids(config))
