"""Container work pools, checked without Docker or a cluster: the pipeline image's Dockerfile copies
what exists, and the Docker and Kubernetes deployments are accepted by a real Prefect server (which
validates their job variables against each pool's template) and render to the container / Job
that the worker would start."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL
from prefect.utilities.templating import apply_values

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
IMAGE, DATA = "registry.example.com/gr2:test", "/srv/gr2-data"


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(instruction, arguments) of a Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    lines = [
        ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")
    ]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in lines]


def test_the_dockerfile_copies_what_exists_and_installs_the_package():
    steps = _instructions(ROOT / "infra" / "docker" / "Dockerfile")
    copies = [args.split() for op, args in steps if op == "COPY"]
    assert copies
    for *sources, _dest in copies:
        for src in sources:
            assert (ROOT / src).exists(), src
    runs = " ".join(args for op, args in steps if op == "RUN")
    assert "-e '.[scale]'" in runs and "requirements-data.txt" in runs
    base = next(args for op, args in steps if op == "ARG" and args.startswith("BASE="))
    wanted = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert wanted.startswith(">=3.11") and re.search(r"python:3\.1[1-9]", base), (base, wanted)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv*", "var"} <= set(ignored)  # no databases, runs or venvs in the context


def _prefect(*args: str, env: dict) -> str:
    done = subprocess.run(
        [str(BIN / "prefect"), *args], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_docker_and_kubernetes_deployments_render_their_containers(prefect_harness, tmp_path):
    env = os.environ | {
        "PREFECT_API_URL": PREFECT_API_URL.value(),
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "GR2_IMAGE": IMAGE,
        "GR2_DATA": DATA,
    }
    template = ROOT / "infra" / "work-pools" / "kubernetes.json"
    _prefect("work-pool", "create", "gr2-docker", "--type", "docker", env=env)
    _prefect(
        "work-pool", "create", "gr2-kubernetes", "--type", "kubernetes",
        "--base-job-template", str(template), env=env,
    )  # fmt: skip
    for variant in ("docker", "kubernetes"):
        deploy = ["--no-prompt", "deploy", "--all", "--prefect-file"]
        _prefect(*deploy, f"infra/prefect-{variant}.yaml", env=env)

    with get_client(sync_client=True) as client:
        pools = {p: client.read_work_pool(p) for p in ("gr2-docker", "gr2-kubernetes")}
        deployments = {d.name: d for d in client.read_deployments() if d.work_pool_name in pools}
    assert set(deployments) == {"docker", "docker-weekly", "kubernetes", "kubernetes-weekly"}

    def rendered(name: str) -> dict:
        d = deployments[name]
        base = pools[d.work_pool_name].base_job_template
        values = {
            k: v.get("default") for k, v in base["variables"]["properties"].items()
        } | d.job_variables
        return apply_values(base["job_configuration"], values)

    docker = rendered("docker")
    assert docker["image"] == IMAGE and docker["volumes"] == [f"{DATA}:/data"]
    assert docker["env"]["HF_HUB_OFFLINE"] == "1"

    job = rendered("kubernetes")["job_manifest"]
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == IMAGE and job["metadata"]["namespace"] == "gr2"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"] == {"cpu": "8", "memory": "64Gi"}
    assert container["volumeMounts"] == [{"name": "artifacts", "mountPath": "/data"}]
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "gr2-artifacts"
    # the pool's own template: Prefect's default Job plus the claim and the GPU count
    assert json.loads(template.read_text())["variables"]["properties"]["gpus"]["default"] == 1
    weekly = deployments["kubernetes-weekly"]
    assert weekly.entrypoint == "flows/registry.py:gr2_retrain"
