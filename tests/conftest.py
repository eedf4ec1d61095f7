"""Shared fixtures: one thread per op, real MovieLens-100k from its package, small configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
# under pytest-xdist (infra/run_tests.sh runs three workers) each worker gets a Prefect home of its
# own: its own temporary API, result records and cache, so one worker's flows never see another's
if os.environ.get("PYTEST_XDIST_WORKER") and os.environ.get("PREFECT_HOME"):
    os.environ["PREFECT_HOME"] = str(
        Path(os.environ["PREFECT_HOME"]) / os.environ["PYTEST_XDIST_WORKER"]
    )
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
torch.set_num_threads(1)

from data_contracts.config import load_profile  # noqa: E402

# the scale-out tests (Ray, torchrun, PostgreSQL: `make test-scale`, which CI also runs) need the
# `scale` extra and servers of their own; the default suite leaves them out
collect_ignore = [] if os.environ.get("GR2_SCALE_TESTS") == "1" else ["scale"]

# the longest files first: pytest-xdist hands files to its workers in collection order, so a long
# file collected last runs alone at the end while the other worker idles (longest first keeps
# both busy; rough wall times on the 2-core machine, longest first)
LONGEST_FIRST = (
    "test_deployments.py",
    "test_flow.py",
    "test_traces.py",
    "test_server_faults.py",
    "test_crash_matrix.py",
    "test_ctc_flow.py",
    "test_engine_vllm.py",
    "test_concurrent_runs.py",
    "test_disk_full.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API for every flow test of the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def ci_config(tmp_path: Path):
    """The `ci` profile, writing under tmp_path, tracked in a throwaway SQLite MLflow."""
    return load_profile(
        "ci",
        {
            "artifacts_root": str(tmp_path / "artifacts"),
            "tracking.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
            "data.max_users": 120,
            "evaluation.bootstrap_samples": 50,
            "teacher.modes": [],  # tests that need the teacher switch it on
            "rl.variants": [],
        },
    )


def write_csv(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


@pytest.fixture
def tiny_files(tmp_path: Path):
    """A valid custom dataset: 6 users x 6 items, every user rates every item (5-core holds)."""
    items = write_csv(
        tmp_path / "items.csv",
        "item_id,title,year,categories",
        [f"i{j},Item {j},{1990 + j},Drama|Comedy" for j in range(6)],
    )
    rows = [f"u{u},i{j},{1000 + 10 * j + u},4" for u in range(6) for j in range(6)]
    inter = write_csv(tmp_path / "interactions.csv", "user_id,item_id,timestamp,rating", rows)
    users = write_csv(tmp_path / "users.csv", "user_id,age", [f"u{u},{20 + u}" for u in range(6)])
    return inter, items, users


@pytest.fixture(scope="session")
def tokenizer():
    """The real SmolLM2-135M-Instruct tokenizer, from the packaged GGUF."""
    from transformers import AutoTokenizer

    from gr2_core.models import default_student

    folder, gguf = default_student()
    return AutoTokenizer.from_pretrained(folder, gguf_file=gguf)


@pytest.fixture(scope="session")
def tiny(tokenizer, tmp_path_factory):
    """A 2-layer Llama built from config, with the real SmolLM2 tokenizer, saved as a folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
    )
    folder = tmp_path_factory.mktemp("tiny")
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def student(tiny, tmp_path_factory):
    """The tiny model exported as a student: SID tokens for 2 levels of 4 codes added."""
    from gr2_core.models import export_student

    out = tmp_path_factory.mktemp("student") / "student"
    return export_student(out, source=str(tiny), levels=2, sizes=[4, 4])
