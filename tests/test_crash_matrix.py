"""Two rows of the crash matrix (`infra/crash_matrix.sh` runs all six): the pipeline killed with
SIGKILL in the middle of the pre-ranker and of mid-training, each time run again; it resumes
from the checkpoint, redoes no finished stage, and ends with outputs equal to an uninterrupted
run's (bit for bit here)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_killed_mid_stage_the_rerun_resumes_and_matches_an_uninterrupted_run(
    prefect_harness, tmp_path
):
    from prefect.settings import PREFECT_API_URL

    doc = tmp_path / "reliability.md"
    cmd = [sys.executable, "infra/crash_matrix.py", "--rows", "preranker", "midtrain"]
    cmd += ["--light", "--work", str(tmp_path / "work"), "--doc", str(doc)]
    env = os.environ | {"PREFECT_API_URL": PREFECT_API_URL.value()}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    rows = [line for line in doc.read_text().splitlines() if line.startswith("| ")][1:]
    assert [r.split(" | ")[0] for r in rows] == ["| preranker", "| midtrain"]
    preranker, midtrain = rows
    assert "checkpoint.pt" in preranker and "| epoch " in preranker  # resumed after an epoch
    assert "| checkpoint-" in midtrain  # resumed from a Trainer checkpoint
    for row in rows:
        assert "| none |" in row and "bitwise" in row and row.endswith("| True |")
