"""The artifact store: one folder per (stage, key), complete only once its manifest exists.

A stage writes into `<root>/<stage>/<key>.partial/`, writes `manifest.json` there last, then
renames the folder to `<root>/<stage>/<key>/` in one step. So a folder without `.partial` always
holds a complete output, a crash leaves only a `.partial` folder (which a rerun with the same key
reuses, e.g. to resume training from its checkpoint), and no later run can mistake half-written
output for a finished one.

`key` = sha256(stage, stage config, upstream keys, code version); it is also the Prefect cache key
and the `gr2.stage_key` tag of the stage's MLflow run, so the three always agree.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import polars as pl

from data_contracts.config import StageConfig
from data_contracts.manifest import FileEntry, Manifest, sha256_path
from data_contracts.tables import SCHEMA_VERSION


def code_version(modules: Sequence[ModuleType]) -> str:
    """Hash of the source of the modules a stage's output depends on."""
    h = hashlib.sha256()
    for module in modules:
        h.update(inspect.getsource(module).encode())
    return h.hexdigest()[:16]


def stage_key(
    stage: str, config: StageConfig | Mapping, upstream: Sequence[Manifest], code: str
) -> str:
    """The content address of a stage's output."""
    cfg = config.digest() if isinstance(config, StageConfig) else _digest(config)
    parts = {
        "stage": stage,
        "config": cfg,
        "upstream": sorted(m.key for m in upstream),
        "code": code,
    }
    return _digest(parts)[:20]


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class StageDir:
    """Where one stage run writes, and how it is finalised."""

    root: Path
    stage: str
    key: str

    @property
    def final(self) -> Path:
        return self.root / self.stage / self.key

    @property
    def partial(self) -> Path:
        return self.root / self.stage / f"{self.key}.partial"

    def existing(self) -> Manifest | None:
        """The manifest of a complete earlier run with this key, if any."""
        return Manifest.read(self.final) if self.final.exists() else None

    def open(self) -> Path:
        """The work folder (kept from a crashed run with the same key, for resuming)."""
        self.partial.mkdir(parents=True, exist_ok=True)
        return self.partial

    def commit(
        self,
        files: Mapping[str, str],
        config: StageConfig | Mapping,
        upstream: Sequence[Manifest],
        code: str,
        metrics: Mapping[str, float] | None = None,
        mlflow_run_id: str | None = None,
        scratch: Sequence[str] = (),
    ) -> Manifest:
        """Hash the outputs, write the manifest last, and publish the folder atomically.

        `files` maps a logical name to a file or folder relative to the work folder; `scratch`
        names files or folders (checkpoints) to delete before publishing.
        """
        for name in scratch:
            path = self.partial / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        entries = {}
        for name, rel in files.items():
            path = self.partial / rel
            rows = (
                pl.scan_parquet(path).select(pl.len()).collect().item()
                if rel.endswith(".parquet")
                else None
            )
            digest, size = sha256_path(path)
            entries[name] = FileEntry(path=rel, sha256=digest, bytes=size, rows=rows)
        cfg_hash = config.digest() if isinstance(config, StageConfig) else _digest(config)
        manifest = Manifest(
            stage=self.stage,
            key=self.key,
            config_hash=cfg_hash,
            upstream={m.stage: m.key for m in upstream},
            code_version=code,
            schema_version=SCHEMA_VERSION,
            directory=str(self.final.resolve()),
            files=entries,
            metrics=dict(metrics or {}),
            mlflow_run_id=mlflow_run_id,
        )
        manifest.write(self.partial)
        if self.final.exists():  # a complete twin appeared meanwhile (concurrent run): keep it
            shutil.rmtree(self.partial)
            return Manifest.read(self.final)  # type: ignore[return-value]
        self.partial.rename(self.final)
        return manifest
