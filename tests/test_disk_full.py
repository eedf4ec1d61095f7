"""A full disk under the artifacts root, for real (a 4 MiB tmpfs mounted for the test): the run
stops with one message naming the root and what to do (exit code 2), the stage that was writing
leaves only its `.partial` folder, and every published folder is complete."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_contracts.manifest import Manifest, sha256_path

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "small"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_full_disk_is_named_and_no_half_stage_is_published(prefect_harness, small_disk, tmp_path):
    from prefect.settings import PREFECT_API_URL

    root = small_disk / "artifacts"
    cmd = [str(BIN / "gr2"), "run", "--profile", "ci", "--set", f"artifacts_root={root}"]
    for item in (
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "data.max_users=120",
        "teacher.modes=[]",
        "rl.variants=[]",
        "registry.enabled=false",
    ):
        cmd += ["--set", item]
    env = os.environ | {"PREFECT_API_URL": PREFECT_API_URL.value(), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"artifacts_root: the disk under {root} is full" in done.stderr
    assert "finished stages are kept" in done.stderr
    assert "Traceback" not in done.stderr.split("gr2 run: ")[-1]
    partial = [p for p in root.glob("*/*.partial")]
    assert len(partial) == 1, partial  # the stage that was writing, unpublished
    published = [p for p in root.glob("*/*") if p.is_dir() and not p.name.endswith(".partial")]
    assert published  # the stages before it
    for folder in published:
        manifest = Manifest.read(folder)
        assert manifest is not None, folder
        for entry in manifest.files.values():
            assert sha256_path(folder / entry.path) == (entry.sha256, entry.bytes)
