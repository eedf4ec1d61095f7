#!/usr/bin/env bash
# Create the `gr2-process` work pool (if missing) and apply infra/prefect.yaml's deployments
# to the Prefect API in PREFECT_API_URL. Idempotent; `make ui` runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${VENV:-.venv}/bin
POOL=${GR2_WORK_POOL:-gr2-process}
: "${PREFECT_API_URL:?set PREFECT_API_URL to the API of the Prefect server, e.g. http://127.0.0.1:4200/api}"
export GR2_HOME=${GR2_HOME:-$PWD}
if ! "$BIN/prefect" work-pool inspect "$POOL" >/dev/null 2>&1; then
  "$BIN/prefect" work-pool create "$POOL" --type process >/dev/null
  echo "created work pool $POOL"
fi
"$BIN/prefect" --no-prompt deploy --all --prefect-file infra/prefect.yaml
