"""The flow's first task: open the parent MLflow run (never cached)."""

from __future__ import annotations

from prefect import task

from data_contracts.ctc import FlowConfig
from tasks.tracking import Tracking, start_tracking_run


@task(name="start-tracking")
def start_tracking(config: FlowConfig, flow_name: str) -> Tracking:
    """Create the experiment if needed and the parent run of this flow run."""
    return start_tracking_run(config, flow_name)
