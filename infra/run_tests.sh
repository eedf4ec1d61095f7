#!/usr/bin/env bash
# The default test suite, as `make test` and CI run it. Extra arguments go to pytest; the 15
# slowest tests are listed at the end (`--durations=0` lists all).
# Isolated Prefect home and MLflow store under a temporary folder; one thread per op
# (tiny-model training on 2 cores runs up to 100x slower with 2 threads and another process busy),
# so the suite runs in GR2_TEST_WORKERS pytest-xdist workers (0 = in this process, e.g. for -s or
# a debugger), each taking one test file at a time (a file's servers and module fixtures stay in
# one worker). Default 3 on 2 cores: the flow tests spend much of their time waiting on servers
# and subprocesses (`GR2_TEST_WORKERS=2 bash infra/run_tests.sh` kept 1.3 of the 2 cores busy and
# took 19 min 8 s here; 3 workers, with the deployment test polling faster, 17 min 40 s; a clean
# clone's `make test`: docs/timings.md).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
export PREFECT_HOME="$tmp/prefect" OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TQDM_DISABLE=1
unset PREFECT_API_URL MLFLOW_TRACKING_URI
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=90
export DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false MLFLOW_DISABLE_TELEMETRY=true
export HF_HUB_OFFLINE=1
set +e
workers=${GR2_TEST_WORKERS:-3}
xdist=()
if [ "$workers" != "0" ]; then
  xdist=(-n "$workers" --dist loadfile)
fi
"$VENV/bin/python" -m pytest "${xdist[@]}" --durations=15 "$@"  # the 15 slowest at the end
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests (exit 5)"
  exit 1
fi
exit "$rc"
