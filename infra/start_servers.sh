#!/usr/bin/env bash
# `make ui`: start a real Prefect server and a real MLflow server on 127.0.0.1, on the same
# databases that `make run` writes (var/prefect, var/mlflow.db), apply the deployments of
# infra/prefect.yaml and start a process worker on the `gr2-process` pool (so a run started
# in the UI executes), and print the URLs. `make ui-stop` (this script with `stop`) stops all.
# Ports: PREFECT_PORT (default 4200), MLFLOW_PORT (default 5000).
# DB=postgres (`make ui DB=postgres`): both servers on a PostgreSQL server in var/postgres on
# 127.0.0.1:PG_PORT (default 5432; infra/postgres.py, needs the `scale` extra) instead of SQLite.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${VENV:-.venv}/bin
VAR=$PWD/var
RUN=$VAR/ui
PREFECT_PORT=${PREFECT_PORT:-4200}
MLFLOW_PORT=${MLFLOW_PORT:-5000}
mkdir -p "$RUN" "$VAR/mlartifacts"
export PREFECT_HOME=${PREFECT_HOME:-$VAR/prefect}

DB=${DB:-sqlite}
PG_PORT=${PG_PORT:-5432}
PREFECT_DB=""
MLFLOW_STORE="sqlite:///$VAR/mlflow.db"

stop() {
  for name in worker prefect mlflow; do
    if [ -f "$RUN/$name.pid" ]; then
      pid=$(cat "$RUN/$name.pid")
      kill -- -"$pid" 2>/dev/null || kill "$pid" 2>/dev/null || true
      for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
      if kill -0 "$pid" 2>/dev/null; then  # still there after 10 s: not waiting any longer
        kill -KILL -- -"$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
      fi
      rm -f "$RUN/$name.pid"
      echo "stopped $name ($pid)"
    fi
  done
  if [ -d "$VAR/postgres/data" ]; then "$BIN/python" infra/postgres.py stop "$VAR/postgres"; fi
}

wait_for() {  # url, name, seconds
  for _ in $(seq "$3"); do
    if curl -fsS "$1" >/dev/null 2>&1; then return 0; fi
    sleep 1
  done
  echo "$2 did not answer at $1 within $3 s; see $RUN/$2.log" >&2
  return 1
}

if [ "${1:-start}" = stop ]; then stop; exit 0; fi

if [ "$DB" = postgres ]; then
  "$BIN/python" infra/postgres.py start "$VAR/postgres" "$PG_PORT"
  PREFECT_DB=$("$BIN/python" infra/postgres.py url "$VAR/postgres" "$PG_PORT" prefect)
  export PREFECT_API_DATABASE_CONNECTION_URL=$PREFECT_DB  # the Prefect server's database
  MLFLOW_STORE=$("$BIN/python" infra/postgres.py url "$VAR/postgres" "$PG_PORT" mlflow)
elif [ "$DB" != sqlite ]; then
  echo "DB=$DB: use sqlite (default) or postgres" >&2; exit 2
fi

if ! curl -fsS "http://127.0.0.1:$PREFECT_PORT/api/health" >/dev/null 2>&1; then
  setsid "$BIN/prefect" server start --host 127.0.0.1 --port "$PREFECT_PORT" \
    >"$RUN/prefect.log" 2>&1 < /dev/null &
  echo $! > "$RUN/prefect.pid"
fi
if ! curl -fsS "http://127.0.0.1:$MLFLOW_PORT/health" >/dev/null 2>&1; then
  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false setsid "$BIN/mlflow" server \
    --backend-store-uri "$MLFLOW_STORE" \
    --artifacts-destination "$VAR/mlartifacts" \
    --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
    >"$RUN/mlflow.log" 2>&1 < /dev/null &
  echo $! > "$RUN/mlflow.pid"
fi
wait_for "http://127.0.0.1:$PREFECT_PORT/api/health" prefect 90
wait_for "http://127.0.0.1:$MLFLOW_PORT/health" mlflow 90
export PREFECT_API_URL=http://127.0.0.1:$PREFECT_PORT/api
bash infra/deploy.sh > "$RUN/deploy.log" 2>&1 || { echo "deploy failed; see $RUN/deploy.log" >&2; exit 1; }
if ! { [ -f "$RUN/worker.pid" ] && kill -0 "$(cat "$RUN/worker.pid")" 2>/dev/null; }; then
  GR2_HOME=$PWD setsid "$BIN/prefect" worker start --pool gr2-process --type process \
    >"$RUN/worker.log" 2>&1 < /dev/null &
  echo $! > "$RUN/worker.pid"
fi
cat <<TXT
Prefect UI: http://127.0.0.1:$PREFECT_PORT   (deployments gr2-pipeline, gr2-retrain-weekly, gr2-promote, gr2-ctc; flow runs, table artifacts)
MLflow UI:  http://127.0.0.1:$MLFLOW_PORT   (experiment gr2-reranker: parent run per flow run, child run per stage)
Databases:  $DB${PREFECT_DB:+ (PostgreSQL on 127.0.0.1:$PG_PORT, cluster in $VAR/postgres)}
Worker:     pool gr2-process (log $RUN/worker.log): Run a deployment from the UI and it executes here
To send new runs through the servers: export PREFECT_API_URL=http://127.0.0.1:$PREFECT_PORT/api
Stop all: make ui-stop
TXT
