#!/usr/bin/env bash
# The whole crash matrix on the ci profile (pre-ranker, mid-training, traces, SFT, RL, CTC
# training): each stage killed with SIGKILL mid-way, rerun, compared with an uninterrupted run.
# Writes its table to docs/reliability.md; exit code 1 if a row fails. About 15 minutes here.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 DO_NOT_TRACK=1
export PREFECT_HOME="${PREFECT_HOME:-$PWD/var/prefect}" MLFLOW_DISABLE_TELEMETRY=true
mkdir -p "$PREFECT_HOME"
exec .venv/bin/python infra/crash_matrix.py --doc docs/reliability.md "$@"
