"""The deployment test once more, with the Prefect server and the MLflow tracking server on a real
PostgreSQL server (infra/postgres.py; artifacts through MLflow's proxied artifact store), as a team
runs them: deploy, trigger, register, promote, refuse, roll back, serve."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from gr2_core.serving import free_port
from infra import postgres
from tests.test_deployments import servers
from tests.test_deployments import test_deploy_trigger_promote_rollback_and_serve as _deployment

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def database():
    folder = Path(tempfile.mkdtemp(prefix="gr2-pg-", dir="/tmp"))  # the postgres user reads it
    port = free_port()
    postgres.start(folder, port)
    try:
        yield port
    finally:
        postgres.stop(folder)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def stack(database, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pgstack")
    yield from servers(
        tmp, postgres.url(database, "mlflow"), prefect_db=postgres.url(database, "prefect")
    )


def _rows(port: int, database: str, table: str) -> int:
    import psycopg

    dsn = f"host=127.0.0.1 port={port} user={postgres.USER} dbname={database}"
    with psycopg.connect(dsn) as conn:
        return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def test_the_stores_are_postgresql(stack, database):
    assert _rows(database, "mlflow", "experiments") >= 1
    assert _rows(database, "prefect", "deployment") >= 4


def test_deploy_trigger_promote_rollback_and_serve_on_postgresql(stack, database):
    _deployment(stack)
    assert _rows(database, "mlflow", "model_versions") >= 2  # promoted, then a refused worse one
    assert _rows(database, "prefect", "flow_run") >= 3
