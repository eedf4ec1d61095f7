"""Stage `data`: load the configured dataset, check it against the contracts, k-core filter."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from data_contracts.config import PipelineConfig
from data_contracts.manifest import Manifest, sha256_file
from gr2_core import data as core
from gr2_core.data import resolve_sources
from tasks.stage import Stage
from tasks.tracking import Tracking


def _fingerprint(config: PipelineConfig) -> dict[str, str]:
    """Content hashes of the raw files, so an edited file invalidates the stage."""
    src = resolve_sources(config.data)
    files = {"interactions": src.interactions, "items": src.items, "users": src.users}
    return {k: sha256_file(p) if p and p.exists() else "absent" for k, p in files.items()}


STAGE = Stage("data", lambda c: c.data, __name__, _fingerprint)


@task(name="data", cache_key_fn=STAGE.cache_key_fn, persist_result=True)
def data(config: PipelineConfig, tracking: Tracking) -> Manifest:
    """Read, validate and filter interactions, items and users."""

    def body(out: Path, run):
        return core.run(config.data, out, get_run_logger())

    return STAGE.run(config, [], tracking, body)
