"""The artifact store: one folder per (stage, key), complete only once its manifest exists.

A stage writes into `<root>/<stage>/<key>.partial/`, writes `manifest.json` there last, then
renames the folder to `<root>/<stage>/<key>/` in one step. So a folder without `.partial` always
holds a complete output, a crash leaves only a `.partial` folder (which a rerun with the same key
reuses, e.g. to resume training from its checkpoint), and no later run can mistake half-written
output for a finished one.

Two runs that reach the same (stage, key) at once, from one machine or several sharing the
root, compute it once: `StageDir.lock` is an exclusive lock file under `<root>/.locks/`, held
while the stage runs. The second run waits on it, then finds the manifest and reuses the output.
The lock is the operating system's (`filelock`, fcntl on POSIX), so a run killed with SIGKILL
releases it, and the next run resumes from the `.partial` folder.

`key` = sha256(stage, stage config, upstream keys, code version); it is also the Prefect cache key
and the `gr2.stage_key` tag of the stage's MLflow run, so the three always agree.

The code version is computed, not listed: `code_closure` follows the imports of a stage's task
module (at any depth, including imports inside functions) through the project's packages, and
`code_version` hashes every module it reaches. So editing any function a stage can call re-keys
that stage, and its dependants through their upstream keys. A module that only moves files,
logs or records outputs, and so never shapes one, declares `CACHE_NEUTRAL = True` at its top
level; the walk neither hashes nor follows it. Config models are not neutral: derived settings
(RL batch sizes, say) are code, so editing `data_contracts/config.py` re-keys every stage.
"""

from __future__ import annotations

import ast
import hashlib
import json
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import polars as pl
from filelock import FileLock, Timeout

from data_contracts.config import StageConfig
from data_contracts.manifest import FileEntry, Manifest, sha256_path
from data_contracts.tables import SCHEMA_VERSION

CACHE_NEUTRAL = True  # keys and folders: never shapes a stage's output

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = ("gr2_core", "data_contracts", "tasks")


def _module_file(name: str, root: Path) -> Path | None:
    """The source file of a project module (a package's `__init__.py`), None if not one."""
    if name.split(".")[0] not in PROJECT_PACKAGES:
        return None
    base = root.joinpath(*name.split("."))
    for path in (base / "__init__.py", base.with_suffix(".py")):
        if path.is_file():
            return path
    return None  # an attribute (`from pkg.mod import func`), not a module


def _imported(name: str, path: Path, tree: ast.Module) -> set[str]:
    """Every module name an import statement in `tree` may bring in, relative ones resolved."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package[: len(package) - node.level + 1] + [node.module or ""]
                base = ".".join(p for p in parts if p)
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _neutral(tree: ast.Module) -> bool:
    return any(
        isinstance(node, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == "CACHE_NEUTRAL" for t in node.targets)
        and isinstance(node.value, ast.Constant)
        and node.value.value is True
        for node in tree.body
    )


def code_closure(
    module: str, root: Path = PROJECT_ROOT, skip: tuple[str, ...] = ()
) -> dict[str, Path]:
    """The project modules `module` can run: itself, what it imports (transitively, parent
    packages included) inside `PROJECT_PACKAGES`, minus `CACHE_NEUTRAL` ones and the packages
    in `skip` (neither kept nor followed); name -> file."""
    if _module_file(module, root) is None:
        raise ValueError(f"{module} is not a module of the project under {root}")
    closure: dict[str, Path] = {}
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name != module and any(name == p or name.startswith(p + ".") for p in skip):
            continue
        path = _module_file(name, root)
        if path is None:
            continue
        neutral, imported = _scan(name, path)
        if name != module and neutral:
            continue
        closure[name] = path
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))
        todo.extend(imported)
    return dict(sorted(closure.items()))


_SCANNED: dict[tuple, tuple[bool, frozenset[str]]] = {}


def _scan(name: str, path: Path) -> tuple[bool, frozenset[str]]:
    """(declares CACHE_NEUTRAL, modules it imports), parsed once per file version."""
    stat = path.stat()
    memo = (name, str(path), stat.st_mtime_ns, stat.st_size)
    if memo not in _SCANNED:
        tree = ast.parse(path.read_bytes(), filename=str(path))
        _SCANNED[memo] = (_neutral(tree), frozenset(_imported(name, path, tree)))
    return _SCANNED[memo]


def stage_closure(
    module: str, root: Path = PROJECT_ROOT, core: str | None = None, siblings: tuple[str, ...] = ()
) -> dict[str, Path]:
    """The code a stage's output depends on: the closure of its task module. In a task module
    that hosts several stages, the `siblings` (the other stages' core modules) are left out of
    that closure unless the stage's own `core` reaches them: a sibling's core is not this
    stage's code, anything else the adapter calls is."""
    closure = code_closure(module, root, skip=siblings)
    return dict(sorted((closure | (code_closure(core, root) if core else {})).items()))


def code_version(
    module: str, root: Path = PROJECT_ROOT, core: str | None = None, siblings: tuple[str, ...] = ()
) -> str:
    """Hash of the source of every module in `stage_closure`, with their names."""
    h = hashlib.sha256()
    for name, path in stage_closure(module, root, core, siblings).items():
        h.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
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

    @property
    def lock_path(self) -> Path:
        return self.root / ".locks" / f"{self.stage}-{self.key}.lock"

    @contextmanager
    def lock(self, on_wait: Callable[[Path], None] | None = None) -> Iterator[None]:
        """Hold the stage's exclusive lock; `on_wait(lock file)` is called once if another run
        holds it (then this one blocks until that run ends, finished or killed)."""
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(self.lock_path)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            if on_wait is not None:
                on_wait(self.lock_path)
            lock.acquire()
        try:
            yield
        finally:
            lock.release()

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
