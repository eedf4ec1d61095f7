"""The contract between a stage's core function and its Prefect task.

Every stage's work is one function `gr2_core.<stage>.run(inputs, cfg, out) -> StageOutput`: plain
inputs (paths to upstream files, settings from other config sections), the stage's own config
section, and the folder to write into. It imports neither Prefect nor MLflow; it says what the task
should record: the output files and metrics that go into the manifest, and what to attach to the
stage's MLflow run (texts, tables, files, input datasets). Per-step metrics during a long run go
through an `on_metrics(values, step)` callback, progress through a standard `logging.Logger`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import polars as pl

OnMetrics = Callable[[Mapping[str, float], int], None]
Log = logging.Logger | logging.LoggerAdapter  # a module logger, or Prefect's run logger


@dataclass(frozen=True)
class InputTable:
    """A table a stage read or derived, recorded as a dataset input of its run."""

    table: pl.DataFrame
    name: str
    source: str
    context: str  # "raw", "training", ...


@dataclass(frozen=True)
class Summary:
    """A small table for the orchestrator's UI (a Prefect table artifact): rows and a caption."""

    rows: list[dict]
    description: str


@dataclass
class StageOutput:
    """What a stage produced and what its run should show.

    files: logical name -> file or folder relative to the output folder (the manifest's entries);
    metrics: the stage's summary numbers; scratch: paths in the output folder deleted before it is
    published (checkpoints); texts: run artifact name -> text; tables: run artifact name (`.csv` or
    `.parquet`) -> table; attach: path in the output folder -> run artifact folder ("" = root),
    for figures, weights and logs; datasets: inputs recorded on the run; summaries: key -> a
    table shown in the orchestrator's UI (Prefect artifact `gr2-<key>`).
    """

    files: dict[str, str]
    metrics: dict[str, float] = field(default_factory=dict)
    scratch: list[str] = field(default_factory=list)
    texts: dict[str, str] = field(default_factory=dict)
    tables: dict[str, pl.DataFrame] = field(default_factory=dict)
    attach: dict[str, str] = field(default_factory=dict)
    datasets: list[InputTable] = field(default_factory=list)
    summaries: dict[str, Summary] = field(default_factory=dict)
