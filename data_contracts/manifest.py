"""The manifest a stage writes last: its presence means the stage output is complete."""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path

from pydantic import BaseModel, Field

CACHE_NEUTRAL = True  # the record of an output, written after it: never shapes one

MANIFEST_NAME = "manifest.json"


class FileEntry(BaseModel):
    """One output file: path relative to the stage folder, content hash, row count if a table."""

    path: str
    sha256: str
    bytes: int
    rows: int | None = None


class Manifest(BaseModel):
    """What a stage produced, from what, with which code; tasks pass these, never frames."""

    stage: str
    key: str = Field(description="hash(stage config, upstream keys, code version)")
    config_hash: str
    upstream: dict[str, str] = Field(default_factory=dict, description="stage -> key")
    code_version: str
    schema_version: str
    directory: str
    files: dict[str, FileEntry] = Field(default_factory=dict)
    metrics: dict[str, float] = Field(default_factory=dict)
    mlflow_run_id: str | None = None
    created_at: str = Field(default_factory=lambda: dt.datetime.now(dt.UTC).isoformat())

    def path(self, name: str) -> Path:
        """Absolute path of output `name`."""
        return Path(self.directory) / self.files[name].path

    def write(self, folder: Path) -> Path:
        out = folder / MANIFEST_NAME
        tmp = out.with_suffix(".tmp")
        tmp.write_text(self.model_dump_json(indent=2))
        tmp.replace(out)
        return out

    @classmethod
    def read(cls, folder: Path) -> Manifest | None:
        path = Path(folder) / MANIFEST_NAME
        return cls.model_validate_json(path.read_text()) if path.exists() else None


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_path(path: Path) -> tuple[str, int]:
    """(content hash, bytes) of a file, or of a folder (its files' relative paths and hashes)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path), path.stat().st_size
    h, size = hashlib.sha256(), 0
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path).as_posix()}\0{sha256_file(f)}\n".encode())
        size += f.stat().st_size
    return h.hexdigest(), size
