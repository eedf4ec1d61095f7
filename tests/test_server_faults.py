"""A server that goes away in the middle of a run, with real servers (an MLflow tracking server,
a Prefect server): the run stops with one message naming the server (exit code 2), and once the
server is back the same command resumes without redoing the stages that had finished."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gr2_core.serving import ManagedServer, free_port
from tasks.stage import computed_stages

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CHECKPOINT = "*.partial/checkpoints/checkpoint-*/trainer_state.json"
SETS = [
    "teacher.modes=[]",
    "rl.variants=[]",
    "registry.enabled=false",
    "data.max_users=120",
]
# mid-training long enough to lose the server in; with the Prefect API lost, the running stage
# goes on to its end, so a shorter one there
MIDTRAIN_STEPS = {"mlflow": 30, "prefect": 9}


def _mlflow(tmp_path: Path, port: int) -> tuple[list[str], dict, tuple[str, ...]]:
    cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    cmd += ["--artifacts-destination", str(tmp_path / "mlartifacts"), "--workers", "1"]
    return cmd, {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, ("/health",)


def _prefect(tmp_path: Path, port: int) -> tuple[list[str], dict, tuple[str, ...]]:
    cmd = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    home = tmp_path / "prefect-server"
    home.mkdir(exist_ok=True)
    env = {"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    return cmd, env, ("/api/health",)


@pytest.mark.parametrize("kind", ["mlflow", "prefect"])
def test_a_server_lost_mid_run_is_named_and_the_rerun_resumes(kind, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd, env, health = (_mlflow if kind == "mlflow" else _prefect)(tmp_path, port)

    def server(log: str) -> ManagedServer:
        return ManagedServer(
            cmd, port, tmp_path / log, env=env, start_timeout_s=120, health_paths=health
        )

    root = tmp_path / "artifacts"
    run = [str(BIN / "gr2"), "run", "--profile", "ci", "--set", f"artifacts_root={root}"]
    if kind == "mlflow":
        run += ["--set", f"tracking.tracking_uri={url}"]
        expected = f"MLflow tracking server at {url} (tracking.tracking_uri) is not reachable"
    else:
        run += ["--set", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]
        expected = f"Prefect API at {url}/api (PREFECT_API_URL) is not reachable"
    for item in [*SETS, f"midtrain.max_steps={MIDTRAIN_STEPS[kind]}"]:
        run += ["--set", item]
    run_env = os.environ | {
        "PREFECT_HOME": str(tmp_path / "prefect-client"),
        "OMP_NUM_THREADS": "1",
        # the clients' own retries, shortened for the test
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        "PREFECT_CLIENT_MAX_RETRIES": "1",
    }
    run_env.pop("PREFECT_API_URL", None)  # mlflow: the run's own temporary Prefect API
    if kind == "prefect":
        run_env["PREFECT_API_URL"] = f"{url}/api"
    first = server(f"{kind}-1.log").start()
    try:
        with (tmp_path / "run-1.log").open("w") as out:
            proc = subprocess.Popen(run, cwd=ROOT, env=run_env, stdout=out, stderr=out)
            deadline = time.monotonic() + 600
            while not list((root / "midtrain").glob(CHECKPOINT)):
                assert proc.poll() is None, (tmp_path / "run-1.log").read_text()[-3000:]
                assert time.monotonic() < deadline
                time.sleep(0.2)
            first.kill()  # the server dies while mid-training runs
            said = None  # when the run named the lost server
            while proc.poll() is None:
                assert time.monotonic() < deadline
                if said is None and "stopped answering" in (tmp_path / "run-1.log").read_text():
                    said = time.monotonic()
                time.sleep(0.2)
            code, ended = proc.returncode, time.monotonic()
    finally:
        first.stop()
    text = (tmp_path / "run-1.log").read_text()
    assert code == 2, text[-3000:]
    # once it has said so, the command ends (Prefect's event worker does not hold it up for
    # each event it can no longer deliver)
    assert ended - (said or ended) < 15, f"{ended - said:.0f} s between the message and the exit"
    assert expected in text and "stopped answering during the run" in text, text[-3000:]
    assert f"kept under {root}" in text
    finished = {p.parent.parent.name for p in root.glob("*/*/manifest.json")}
    assert {"data", "split", "preranker", "student"} <= finished
    if kind == "mlflow":  # the stage logging to the lost server failed; without the Prefect
        assert "midtrain" not in finished  # API, a stage's own work may still finish

    with server(f"{kind}-2.log"):  # back, on the same store
        again = subprocess.run(
            run, cwd=ROOT, env=run_env, capture_output=True, text=True, timeout=900
        )
    log = again.stdout + again.stderr
    assert again.returncode == 0, log[-3000:]
    redone = set(computed_stages(log))
    assert not redone & finished, redone & finished
    if "midtrain" not in finished:  # the stage that failed ran again, from its checkpoint
        assert "midtrain" in redone and "resuming training from" in log
