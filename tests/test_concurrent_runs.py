"""Two runs at once on one artifacts root: each stage is computed once, the other run waits for
it and reuses it, and no manifest is ever torn; a run killed while holding a stage's lock does
not block the next one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from data_contracts.manifest import Manifest, sha256_path
from tasks.store import StageDir

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


HOLD = """
import sys, time
from pathlib import Path
from tasks.store import StageDir
root, key, release = sys.argv[1:]
with StageDir(Path(root), "preranker", key).lock():
    print("held", flush=True)
    while not Path(release).exists():
        time.sleep(0.05)
"""


def _holder(root: Path, key: str, release: Path) -> subprocess.Popen:
    """Another process that takes the stage's lock and keeps it until `release` exists."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(root), key, str(release)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_held_stage_lock_makes_the_other_run_wait_and_a_killed_holder_frees_it(tmp_path):
    release = tmp_path / "release"
    folder = StageDir(tmp_path, "preranker", "k1")
    holder = _holder(tmp_path, "k1", release)
    waits: list[Path] = []

    def on_wait(lock: Path) -> None:
        waits.append(lock)
        threading.Timer(1.5, release.touch).start()  # the other run finishes later

    start = time.monotonic()
    with folder.lock(on_wait=on_wait):
        waited = time.monotonic() - start
    assert holder.wait(30) == 0
    assert waits == [folder.lock_path]  # told once that another run holds it
    assert waited >= 1.0  # blocked until the holder let go
    assert folder.lock_path.parent == tmp_path / ".locks"  # never among the stage folders

    # a holder killed with SIGKILL (a crash) leaves no stale lock behind
    release.unlink()
    holder = _holder(tmp_path, "k1", release)
    holder.send_signal(signal.SIGKILL)
    holder.wait(30)
    waits.clear()
    with folder.lock(on_wait=waits.append):
        pass
    assert waits == []

    # another key of the same stage is never blocked by this one
    holder = _holder(tmp_path, "k1", release)
    with StageDir(tmp_path, "preranker", "k2").lock(on_wait=waits.append):
        pass
    assert waits == []
    release.touch()
    assert holder.wait(30) == 0


@pytest.mark.slow
def test_two_pipeline_runs_at_once_compute_each_stage_once(prefect_harness, tmp_path):
    """`gr2 run --profile ci` twice at the same moment, same config, same artifacts root and
    MLflow store, against one Prefect API (as with `make ui`): both finish with the same stage
    outputs, each stage has one complete folder and was computed by one run only (one MLflow
    stage run per key), and every manifest's hashes match its files."""
    from mlflow.tracking import MlflowClient
    from prefect.settings import PREFECT_API_URL

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sets = {
        "artifacts_root": str(tmp_path / "artifacts"),
        "tracking.tracking_uri": tracking,
        "data.max_users": 120,
        "evaluation.bootstrap_samples": 50,
        "teacher.modes": "[]",
        "rl.variants": "[]",
        "registry.enabled": "false",
    }
    cmd = [str(BIN / "gr2"), "run", "--profile", "ci"]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    # the SQLite store exists before the runs start (as after any earlier run): two processes
    # creating its tables at the same moment is MLflow's own migration race on a new file
    MlflowClient(tracking).search_experiments()
    env = os.environ | {"PREFECT_API_URL": PREFECT_API_URL.value(), "OMP_NUM_THREADS": "1"}
    logs = [tmp_path / f"run{i}.log" for i in range(2)]
    procs = []
    for log in logs:
        with log.open("w") as out:
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=out))
    codes = [p.wait(900) for p in procs]
    texts = [log.read_text() for log in logs]
    assert codes == [0, 0], "\n".join(t[-3000:] for t in texts)

    root = tmp_path / "artifacts"
    stages = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name != ".locks")
    assert {"data", "split", "preranker", "candidates", "midtrain"} <= set(stages)
    client = MlflowClient(tracking)
    exp = client.get_experiment_by_name("gr2-reranker")
    for stage in stages:
        folders = list((root / stage).iterdir())
        assert [p.name.endswith(".partial") for p in folders] == [False], folders
        manifest = Manifest.read(folders[0])
        for entry in manifest.files.values():  # not torn: every file is the one hashed
            assert sha256_path(folders[0] / entry.path) == (entry.sha256, entry.bytes)
        runs = client.search_runs([exp.experiment_id], f"tags.`gr2.stage_key` = '{manifest.key}'")
        assert len(runs) == 1, (stage, [r.info.run_id for r in runs])
        assert runs[0].info.run_id == manifest.mlflow_run_id
    # each stage was written by one run; the other waited for it, or found it complete (in the
    # artifacts store, or as a Prefect cache hit)
    for stage in stages:
        writers = [t.count(f"- {stage}: key ") for t in texts]
        assert sum(writers) == 1, (stage, writers)
