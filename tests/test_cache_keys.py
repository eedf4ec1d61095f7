"""Stage cache keys cover the code a stage runs: computed from imports, never listed by hand."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

import flows.ctc_summarization  # noqa: F401  (declares the CTC stages)
import flows.gr2_pipeline  # noqa: F401  (declares the pipeline stages)
from data_contracts.config import load_profile
from data_contracts.manifest import Manifest
from data_contracts.rerankers import EVAL_STAGES, RERANKER_STAGES
from tasks.stage import STAGES
from tasks.store import PROJECT_PACKAGES, PROJECT_ROOT, code_closure, code_version, stage_key


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of the project's packages, to edit."""
    for package in PROJECT_PACKAGES:
        shutil.copytree(
            PROJECT_ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    return tmp_path


def _codes(root: Path) -> dict[str, str]:
    return {name: stage.code(root) for name, stage in STAGES.items()}


def _edit_function(path: Path, function: str) -> None:
    """Change the body of `function` in `path` (a statement added before its first one)."""
    source = path.read_text()
    tree = ast.parse(source)
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == function)
    first = node.body[1] if ast.get_docstring(node) else node.body[0]
    lines = source.splitlines(keepends=True)
    lines.insert(first.lineno - 1, " " * first.col_offset + "_edited = True\n")
    path.write_text("".join(lines))


def _manifest(stage: str, key: str) -> Manifest:
    return Manifest(
        stage=stage, key=key, config_hash="", code_version="", schema_version="1", directory="/x"
    )


def test_every_pipeline_stage_is_declared_once():
    expected = {"data", "split", "preranker", "candidates", "baselines", "embeddings"}
    expected |= {"semantic_ids", "student", "midtrain", "midtrain_eval", "traces"}
    expected |= set(RERANKER_STAGES) | set(EVAL_STAGES)  # declared in data_contracts.rerankers
    expected |= {"ctc_data", "ctc_train", "ctc_eval"}
    assert expected == set(STAGES)


def test_editing_a_function_a_stage_calls_rekeys_exactly_the_stages_that_can_call_it(project):
    """`gr2_core.metrics.rank_of` is reached by RL (through `gr2_core.rl` and `rerank_eval`) and by
    every evaluation, none of which listed `gr2_core/metrics.py` when keys were hand-listed."""
    before = _codes(project)
    _edit_function(project / "gr2_core" / "metrics.py", "rank_of")
    after = _codes(project)
    changed = {s for s in STAGES if before[s] != after[s]}
    callers = {s for s, st in STAGES.items() if "gr2_core.metrics" in st.closure()}
    assert changed == callers
    assert {"rl_rejection", "rl_unconditional", "sft_eval_targeted", "baselines"} <= changed
    assert {"data", "split", "preranker", "candidates", "semantic_ids"}.isdisjoint(changed)


def test_editing_a_module_no_stage_imports_rekeys_nothing_else(project):
    before = _codes(project)
    _edit_function(project / "gr2_core" / "summarization" / "ctc.py", "lcs")
    after = _codes(project)
    changed = {s for s in STAGES if before[s] != after[s]}
    assert "ctc_train" in changed
    assert not {s for s in changed if not s.startswith("ctc_")}


@pytest.mark.parametrize(
    ("module", "function", "stage", "sibling"),
    [
        ("candidates.py", "run", "candidates", "preranker"),
        ("semantic_ids/tokenizer.py", "run", "semantic_ids", "embeddings"),
        ("sid_eval.py", "run", "midtrain_eval", "midtrain"),
        ("summarization/evaluate.py", "run", "ctc_eval", "ctc_train"),
    ],
)
def test_a_stage_is_not_rekeyed_by_the_core_of_a_sibling_in_its_task_module(
    project, module, function, stage, sibling
):
    """Task modules that host several stages: each stage hashes its own core, the adapter's
    code outside the core, and not the core of the stage beside it."""
    assert STAGES[stage].module == STAGES[sibling].module
    before = _codes(project)
    _edit_function(project / "gr2_core" / module, function)
    after = _codes(project)
    assert before[stage] != after[stage]
    assert before[sibling] == after[sibling]
    # the adapter they share is code of both
    _edit_function(project / (STAGES[stage].module.replace(".", "/") + ".py"), stage)
    edited = _codes(project)
    assert edited[stage] != after[stage] and edited[sibling] != after[sibling]


def test_dependants_rekey_through_their_upstream_keys(project):
    """Editing the pre-ranker re-keys the pre-ranker and candidate stages by their code, and the
    baselines (whose code does not import it) by the candidates' key."""
    config = load_profile("ci")

    def keys(root: Path) -> dict[str, str]:
        out: dict[str, str] = {}
        for name, upstream in (
            ("preranker", []),
            ("candidates", ["preranker"]),
            ("baselines", ["candidates"]),
        ):
            stage = STAGES[name]
            ups = [_manifest(u, out[u]) for u in upstream]
            code = stage.code(root)
            out[name] = stage_key(name, stage.identity(config), ups, code)
        return out

    before = keys(project)
    _edit_function(project / "gr2_core" / "preranker.py", "generate_slates")
    after = keys(project)
    assert STAGES["baselines"].code(project) == STAGES["baselines"].code(PROJECT_ROOT)
    assert all(before[s] != after[s] for s in before)


def test_closure_follows_relative_and_function_level_imports_and_skips_neutral_modules(tmp_path):
    pkg = tmp_path / "gr2_core"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "import numpy\n\ndef f():\n    from gr2_core.sub import b\n    return b\n",
        "sub/__init__.py": "",
        "sub/b.py": "from . import c\nfrom ..log import write\n",
        "sub/c.py": "X = 1\n",
        "log.py": "CACHE_NEUTRAL = True\nfrom gr2_core import d\n",
        "d.py": "",
        "unrelated.py": "import gr2_core.a\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    closure = set(code_closure("gr2_core.a", tmp_path))
    assert closure == {"gr2_core", "gr2_core.a", "gr2_core.sub", "gr2_core.sub.b", "gr2_core.sub.c"}
    before = code_version("gr2_core.a", tmp_path)
    (pkg / "log.py").write_text("CACHE_NEUTRAL = True\nfrom gr2_core import d\n# logs more\n")
    (pkg / "unrelated.py").write_text("")
    assert code_version("gr2_core.a", tmp_path) == before
    (pkg / "sub" / "c.py").write_text("X = 2\n")
    assert code_version("gr2_core.a", tmp_path) != before
    with pytest.raises(ValueError, match="not a module of the project"):
        code_closure("numpy", tmp_path)
