"""A PostgreSQL server for the Prefect and MLflow servers of `make ui DB=postgres` and the scale
tests: a cluster in a folder of its own, listening on 127.0.0.1 only, with one database per
server (`prefect`, `mlflow`).

It uses the PostgreSQL installed on the machine (Debian's `postgresql` package, or any whose
`pg_ctl` is on PATH). PostgreSQL refuses to run as root; as root, the cluster belongs to the
`postgres` system user the package creates, and its commands run as that user.

    python infra/postgres.py start var/postgres 5432   # init (first time), start, create dbs
    python infra/postgres.py stop var/postgres
    python infra/postgres.py url var/postgres 5432 prefect   # the SQLAlchemy URL of a database
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import sys
import time
from pathlib import Path

DATABASES = ("prefect", "mlflow")
USER = "gr2"  # the role the servers connect as (trust authentication on 127.0.0.1 only)
DRIVERS = {"prefect": "postgresql+asyncpg", "mlflow": "postgresql+psycopg"}


class PostgresError(RuntimeError):
    pass


def bindir() -> Path:
    """Folder of PostgreSQL's server programs (initdb, pg_ctl, postgres)."""
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent  # e.g. a link to /usr/lib/postgresql/15/bin
    debian = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=_version)
    if debian:
        return Path(debian[-1]).parent
    raise PostgresError(
        "no PostgreSQL server found (pg_ctl is neither on PATH nor under /usr/lib/postgresql); "
        "install it, e.g. `apt-get install postgresql`"
    )


def _version(path: str) -> int:
    part = Path(path).parts[-3]
    return int(part) if part.isdigit() else 0


def _as_owner(cmd: list[str]) -> list[str]:
    """`cmd` as the cluster's owner: the `postgres` user when running as root."""
    if os.geteuid() != 0:
        return cmd
    return ["runuser", "-u", "postgres", "--", *cmd]


def _run(cmd: list[str], what: str, log: Path | None = None) -> str:
    done = subprocess.run(_as_owner(cmd), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr)[-2000:]
        hint = f"; server log: {log}" if log else ""
        raise PostgresError(f"{what} failed (exit {done.returncode}){hint}:\n{tail}")
    return done.stdout


def url(port: int, database: str) -> str:
    """SQLAlchemy URL of `database` with the driver its server uses."""
    return f"{DRIVERS[database]}://{USER}@127.0.0.1:{port}/{database}"


def start(folder: Path, port: int, timeout_s: float = 60) -> None:
    """Initialise the cluster in `folder` (first time), start it on 127.0.0.1:`port`, create the
    role and the databases that are missing. Idempotent: a running cluster is left running."""
    folder = Path(folder).resolve()
    data, log = folder / "data", folder / "postgres.log"
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        owner = pwd.getpwnam("postgres")
        os.chown(folder, owner.pw_uid, owner.pw_gid)
    bins = bindir()
    if not (data / "PG_VERSION").exists():
        _run(
            [str(bins / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
            f"initdb in {data}",
        )
    if not running(folder):
        opts = f"-c listen_addresses=127.0.0.1 -p {port} -k {folder}"
        _run(
            [str(bins / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", opts, "-w", "start"],
            f"starting PostgreSQL on 127.0.0.1:{port}",
            log,
        )
    psql = [str(bins / "psql"), "-h", "127.0.0.1", "-p", str(port), "-U"]
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            _run([*psql, "postgres", "-tAc", "SELECT 1"], "connecting")
            break
        except PostgresError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    roles = _run([*psql, "postgres", "-tAc", f"SELECT 1 FROM pg_roles WHERE rolname='{USER}'"], "")
    if not roles.strip():
        _run([*psql, "postgres", "-c", f"CREATE ROLE {USER} LOGIN"], f"creating role {USER}")
    for db in DATABASES:
        have = _run(
            [*psql, "postgres", "-tAc", f"SELECT 1 FROM pg_database WHERE datname='{db}'"], ""
        )
        if not have.strip():
            _run([*psql, "postgres", "-c", f"CREATE DATABASE {db} OWNER {USER}"], f"creating {db}")


def running(folder: Path) -> bool:
    data = Path(folder).resolve() / "data"
    if not (data / "PG_VERSION").exists():
        return False
    done = subprocess.run(
        _as_owner([str(bindir() / "pg_ctl"), "-D", str(data), "status"]),
        capture_output=True,
        check=False,
    )
    return done.returncode == 0


def stop(folder: Path) -> None:
    """Stop the cluster in `folder` (fast shutdown: open sessions are closed); no-op if down."""
    if running(folder):
        data = Path(folder).resolve() / "data"
        _run([str(bindir() / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"], "stopping")


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] in ("start", "stop", "url"):
        try:
            if argv[0] == "start" and len(argv) == 3:
                start(Path(argv[1]), int(argv[2]))
                return 0
            if argv[0] == "stop" and len(argv) == 2:
                stop(Path(argv[1]))
                return 0
            if argv[0] == "url" and len(argv) == 4:
                print(url(int(argv[2]), argv[3]))
                return 0
        except PostgresError as exc:
            print(f"postgres: {exc}", file=sys.stderr)
            return 1
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
