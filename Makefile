# GR2 — the two commands a new user needs:
#   make run    install (first time) and run the pipeline on the embedded `demo` profile
#   make test   install (first time) and run the default test suite (what CI runs)
# and `make ui` to browse runs in real Prefect and MLflow servers on 127.0.0.1 (with the
# deployments of infra/prefect.yaml and a worker), `make serve` to serve the champion reranker.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# vLLM (CPU build) for the default local teacher server, in a virtualenv of its own
TEACHER_VENV ?= .venv-vllm
PROFILE ?= demo
# Local, offline defaults: Prefect's database and MLflow's under the ignored var/ folder.
export PREFECT_HOME ?= $(CURDIR)/var/prefect
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 90
export MLFLOW_DISABLE_TELEMETRY := true
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install teacher-env run ctc test test-scale test-fast ui ui-stop serve screenshots lint bench bench-teacher bench-rl bench-generation bench-serving bench-scaling crash-matrix clean

$(BIN)/.installed: pyproject.toml requirements-data.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps -r requirements-data.txt
	touch $@

install: $(BIN)/.installed

# torchvision/torchaudio/torchcodec fail to load beside this torch build and vLLM needs none
$(TEACHER_VENV)/.installed: requirements-teacher.txt
	test -x $(TEACHER_VENV)/bin/python || $(PYTHON) -m venv $(TEACHER_VENV)
	$(TEACHER_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(TEACHER_VENV)/bin/python -m pip install --quiet -r requirements-teacher.txt
	$(TEACHER_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

teacher-env: $(TEACHER_VENV)/.installed

run: install teacher-env
	mkdir -p "$(PREFECT_HOME)"
	$(BIN)/gr2 run --profile $(PROFILE)

# the CTC summarization experiments on ACLSum (SPEC section 7); results into docs/results.md
ctc: install
	mkdir -p "$(PREFECT_HOME)"
	$(BIN)/gr2 ctc --profile $(PROFILE) --doc docs/results.md --timings-doc docs/timings.md

test: install teacher-env
	bash infra/run_tests.sh

# scale-out on real engines (tests/scale): Ray task runner, torchrun training, PostgreSQL-backed
# Prefect and MLflow servers; CI runs it after `make test` (docs/scaling.md)
$(BIN)/.scale-installed: $(BIN)/.installed
	$(BIN)/python -m pip install --quiet -e '.[dev,scale]'
	touch $@

test-scale: install $(BIN)/.scale-installed
	GR2_SCALE_TESTS=1 bash infra/run_tests.sh tests/scale

# the inner loop: unit tests on tiny models, no flows and no servers (the `slow` marker deselected)
test-fast: install
	bash infra/run_tests.sh -m "not slow"

# DB=postgres: both servers on a PostgreSQL server in var/postgres (needs the `scale` extra)
DB ?= sqlite
ui: install
	$(if $(filter postgres,$(DB)),$(MAKE) $(BIN)/.scale-installed,)
	DB=$(DB) bash infra/start_servers.sh

ui-stop:
	bash infra/start_servers.sh stop

# the `champion` alias of the profile's registered reranker over HTTP on 127.0.0.1:$(SERVE_PORT)
SERVE_PORT ?= 5001
serve: install
	$(BIN)/gr2 serve --profile $(PROFILE) --port $(SERVE_PORT)

# docs/img/*.png from the servers of `make ui` (headless Chromium: apt-get install chromium)
screenshots:
	bash infra/screenshots.sh

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: install
	$(BIN)/python -m pip install --quiet -r requirements-bench.txt
	$(BIN)/python benchmarks/semantic_ids.py
	$(BIN)/python benchmarks/preranker.py --dataset ml-1m --ours-epochs 20 --recbole-epochs 1
	$(BIN)/python benchmarks/train_throughput.py --steps 5 --out var/train_throughput_cpu.jsonl

# teacher engines side by side (needs a finished `make run` for its slates); llama.cpp's server
# compiles on install (about 3.5 minutes)
.venv-llamacpp/.installed:
	test -x .venv-llamacpp/bin/python || $(PYTHON) -m venv .venv-llamacpp
	CMAKE_ARGS=-DLLAVA_BUILD=OFF .venv-llamacpp/bin/python -m pip install --quiet 'llama-cpp-python[server]==0.3.36'
	touch $@

bench-teacher: install teacher-env .venv-llamacpp/.installed
	$(BIN)/python benchmarks/teacher.py --throughput --acceptance --doc docs/benchmarks.md

# DAPO step cost on this CPU (needs a finished `make run` for its SFT-rejection student)
# (transformers rollouts, then rollouts from a vLLM server synced to the policy, 1 x 8 per batch)
bench-rl: install teacher-env
	$(BIN)/python benchmarks/rl_step.py --batches 2 --max-rounds 0 --doc docs/benchmarks.md
	$(BIN)/python benchmarks/rl_step.py --engine vllm --groups 1 --batches 3 --max-rounds 0 \
		--doc docs/benchmarks.md

# transformers vs the vLLM engine on the same student prompts; scoring-mode latency
bench-generation: install teacher-env
	$(BIN)/python benchmarks/generation.py --doc docs/benchmarks.md

bench-serving: install  # needs a registered champion of the profile (make run)
	$(BIN)/python benchmarks/serving_load.py --profile demo --doc docs/benchmarks.md

# training tokens/s with 1 and 2 processes at the same global batch (docs/scaling.md)
bench-scaling: install teacher-env $(BIN)/.scale-installed
	$(BIN)/python benchmarks/scaling.py --processes 1 2 --steps 4 --doc docs/scaling.md
	$(BIN)/python benchmarks/ray_scaling.py --workers 1 2 --doc docs/scaling.md

crash-matrix: install teacher-env
	bash infra/crash_matrix.sh

clean:
	rm -rf var
