#!/usr/bin/env bash
# The docs' screenshots (docs/img/), taken by headless Chromium (Debian's `chromium` package:
# `apt-get install chromium`) from the servers `make ui` started, after a `make run` registered
# a model: the Prefect run form of the gr2-pipeline deployment, the MLflow registered-model page and
# the champion version's page.
set -euo pipefail
cd "$(dirname "$0")/.."
PREFECT=http://127.0.0.1:${PREFECT_PORT:-4200}
MLFLOW=http://127.0.0.1:${MLFLOW_PORT:-5000}
MODEL=${GR2_MODEL_NAME:-gr2-reranker}
OUT=docs/img
command -v chromium >/dev/null || { echo "needs chromium: apt-get install chromium" >&2; exit 1; }
mkdir -p "$OUT"

shot() {  # url, file, [height]
  local profile
  profile=$(mktemp -d)
  chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --user-data-dir="$profile" --hide-scrollbars --window-size="1440,${3:-1000}" \
    --virtual-time-budget=20000 --screenshot="$2" "$1" 2>/dev/null
  rm -rf "$profile"
  echo "wrote $2 ($1)"
}

deployment=$(curl -fsS -X POST "$PREFECT/api/deployments/filter" -H 'Content-Type: application/json' \
  -d '{"deployments": {"name": {"any_": ["gr2-pipeline"]}}}' |
  python3 -c 'import json, sys; print(json.load(sys.stdin)[0]["id"])')
shot "$PREFECT/deployments/deployment/$deployment/run" "$OUT/prefect_deployment_form.png" 1100
shot "$MLFLOW/#/models/$MODEL" "$OUT/mlflow_model_page.png" 900
champion=$(curl -fsS "$MLFLOW/api/2.0/mlflow/registered-models/alias?name=$MODEL&alias=champion" |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["model_version"]["version"])')
shot "$MLFLOW/#/models/$MODEL/versions/$champion" "$OUT/mlflow_model_version.png" 1000
