"""Stage `data`: load the configured dataset, check it against the contracts, k-core filter."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from data_contracts.config import PipelineConfig
from data_contracts.manifest import Manifest, sha256_file
from data_contracts.tables import INTERACTIONS, ITEMS, USERS, validate
from gr2_core.data import load_tables, preprocess, resolve_sources
from tasks.stage import Stage, StageResult
from tasks.tracking import StageRun, Tracking


def _fingerprint(config: PipelineConfig) -> dict[str, str]:
    """Content hashes of the raw files, so an edited file invalidates the stage."""
    src = resolve_sources(config.data)
    files = {"interactions": src.interactions, "items": src.items, "users": src.users}
    return {k: sha256_file(p) if p and p.exists() else "absent" for k, p in files.items()}


STAGE = Stage("data", lambda c: c.data, __name__, _fingerprint)


@task(name="data", cache_key_fn=STAGE.cache_key_fn, persist_result=True)
def load_data(config: PipelineConfig, tracking: Tracking) -> Manifest:
    """Read, validate and filter interactions, items and users."""

    def body(work: Path, run: StageRun) -> StageResult:
        src = resolve_sources(config.data)
        raw = load_tables(src)
        tables = preprocess(raw, config.data, str(src.interactions))
        inter = validate(INTERACTIONS, tables.interactions, "interactions (filtered)")
        items = validate(ITEMS, tables.items, "items (filtered)")
        inter.drop("source_row").write_parquet(work / "interactions.parquet")
        items.write_parquet(work / "items.parquet")
        files = {"interactions": "interactions.parquet", "items": "items.parquet"}
        if tables.users is not None:
            validate(USERS, tables.users, "users (filtered)").write_parquet(work / "users.parquet")
            files["users"] = "users.parquet"
        run.log_dataset(
            raw.interactions.drop("source_row"),
            f"{config.data.dataset}-interactions",
            str(src.interactions),
            "raw",
        )
        run.log_dataset(
            inter.drop("source_row"), f"{config.data.dataset}-filtered", str(work), "training"
        )
        n_users, n_items = inter["user_id"].n_unique(), items.height
        metrics = {
            "raw_interactions": raw.interactions.height,
            "interactions": inter.height,
            "users": n_users,
            "items": n_items,
            "density": inter.height / max(n_users * n_items, 1),
            "mean_sequence_length": inter.height / max(n_users, 1),
        }
        get_run_logger().info("data: %s", {k: round(v, 4) for k, v in metrics.items()})
        return StageResult(files, metrics)

    return STAGE.run(config, [], tracking, body)
