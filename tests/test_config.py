"""Every YAML profile loads; bad configs fail with the field named."""

import pytest
from pydantic import ValidationError

from data_contracts.config import (
    PROFILES_DIR,
    PipelineConfig,
    RLConfig,
    SFTConfig,
    TeacherConfig,
    load_profile,
)

PROFILES = sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def test_required_profiles_exist():
    assert {"demo", "ci", "ml-1m", "ml-100k"} <= set(PROFILES)


@pytest.mark.parametrize("name", PROFILES)
def test_profile_loads_and_documents_itself(name):
    cfg = load_profile(name)
    assert cfg.profile == name
    header = (PROFILES_DIR / f"{name}.yaml").read_text().splitlines()[:3]
    assert any("Run:" in line for line in header), "each profile's header says how to run it"


def test_overrides_and_unknown_keys():
    cfg = load_profile("ci", {"preranker.epochs": 7})
    assert cfg.preranker.epochs == 7
    with pytest.raises(ValidationError, match="epoch"):
        load_profile("ci", {"preranker.epoch": 7})
    with pytest.raises(ValidationError, match="interactions_path"):
        PipelineConfig.model_validate({"data": {"dataset": "custom"}})
    with pytest.raises(FileNotFoundError, match="known"):
        load_profile("nope")


def test_removed_prompt_history_fails_and_names_its_replacement():
    assert "prompt_history" not in PipelineConfig.model_fields["data"].annotation.model_fields
    with pytest.raises(ValidationError, match=r"data.prompt_history was removed.*history_items"):
        load_profile("ci", {"data.prompt_history": 20})


@pytest.mark.parametrize("field", ["history_items", "knowledge", "cowatch_notes"])
def test_prompt_settings_moved_out_of_the_teacher_section_name_their_new_place(field):
    with pytest.raises(ValidationError, match=rf"teacher.{field} moved to prompt.{field}"):
        load_profile("ci", {f"teacher.{field}": 3 if field == "history_items" else False})
    assert load_profile("ci", {f"prompt.{field}": 3 if field == "history_items" else False})


def test_explanation_minimum_must_fit_under_the_cap():
    with pytest.raises(ValidationError, match="min_explanation_chars"):
        load_profile("ci", {"teacher.min_explanation_chars": 121})  # ci caps explanations at 120


def test_digest_tracks_content():
    a, b = load_profile("ci"), load_profile("ci", {"preranker.lr": 0.5})
    assert a.data.digest() == b.data.digest()
    assert a.preranker.digest() != b.preranker.digest()


def test_flow_parameter_schema_renders_config():
    from prefect.utilities.callables import parameter_schema

    from flows.gr2_pipeline import gr2_pipeline

    schema = parameter_schema(gr2_pipeline.fn).model_dump()
    assert "config" in schema["properties"]
    defs = schema.get("definitions") or schema.get("$defs")
    assert {"DataConfig", "PrerankerConfig"} <= set(defs)
    assert "description" in defs["DataConfig"]["properties"]["dataset"]


@pytest.mark.parametrize("name", ["ci", "demo"])
def test_ctc_profiles_load(name):
    from data_contracts.ctc import CTC_PROFILES_DIR, load_ctc_profile

    cfg = load_ctc_profile(name)
    assert cfg.profile == name and cfg.tracking.experiment == "gr2-ctc"
    header = (CTC_PROFILES_DIR / f"{name}.yaml").read_text().splitlines()[:3]
    assert any("Run:" in line for line in header)


def test_ctc_config_errors_name_the_field():
    from data_contracts.ctc import CTCFlowConfig, load_ctc_profile

    with pytest.raises(ValidationError, match="jsonl_path"):
        CTCFlowConfig.model_validate({"data": {"source": "jsonl"}})
    with pytest.raises(ValidationError, match="noise_rates"):
        load_ctc_profile("ci", {"evaluation.noise_rates": [0.0, 2.0]})
    with pytest.raises(ValidationError, match="heads"):
        load_ctc_profile("ci", {"ctc.heads": 5})


def test_ctc_flow_parameter_schema():
    from prefect.utilities.callables import parameter_schema

    from flows.ctc_summarization import ctc_summarization

    schema = parameter_schema(ctc_summarization.fn).model_dump()
    text = str(schema)
    assert "CTCFlowConfig" in text and "noise_rates" in text and "max_source_words" in text


def test_profile_base_merges_section_by_section(tmp_path):
    (tmp_path / "parent.yaml").write_text(
        "artifacts_root: var/a\npreranker:\n  epochs: 3\n  lr: 0.01\nrl:\n  variants: []\n"
    )
    (tmp_path / "child.yaml").write_text(
        "base: parent\npreranker:\n  epochs: 5\nrl:\n  variants: [rejection]\n"
    )
    cfg = load_profile(tmp_path / "child.yaml", {"preranker.lr": 0.5})
    # the child's value wins, the parent's other keys of the same section stay, overrides last
    assert (cfg.profile, cfg.artifacts_root) == ("child", "var/a")
    assert (cfg.preranker.epochs, cfg.preranker.lr) == (5, 0.5)
    assert cfg.rl.variants == ["rejection"]
    (tmp_path / "loop.yaml").write_text("base: loop2\n")
    (tmp_path / "loop2.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ValueError, match="cycle"):
        load_profile(tmp_path / "loop.yaml")


def test_rl_variants_start_from_their_sft_models():
    cfg = load_profile("ci")
    assert [cfg.rl.sft_mode(v) for v in ("rejection", "targeted", "unconditional")] == [
        "rejection",
        "targeted",
        "rejection",
    ]
    moved = load_profile("ci", {"rl.unconditional_start": "targeted"})
    assert moved.rl.sft_mode("unconditional") == "targeted"
    with pytest.raises(ValidationError, match="targeted"):
        load_profile(
            "ci",
            {
                "teacher.modes": ["rejection"],
                "rl.variants": ["unconditional"],
                "rl.unconditional_start": "targeted",
            },
        )


def test_rerankers_are_declared_once_and_the_config_follows_the_declarations():
    """Trace modes and RL variants come from `data_contracts.rerankers`: the config's allowed
    values, the default lists, each variant's start, the registry's preference and the report's
    pairs all derive from the declarations."""
    from data_contracts import rerankers as r

    schema = PipelineConfig.model_json_schema()["$defs"]
    variants = schema["RLConfig"]["properties"]["variants"]["items"]["enum"]
    assert variants == [v.name for v in r.RL_VARIANTS] == RLConfig().variants
    assert schema["TeacherConfig"]["properties"]["modes"]["items"]["enum"] == list(r.TRACE_MODES)
    candidates = schema["RegistryConfig"]["properties"]["candidate"]["enum"]
    assert candidates == ["auto", "midtrain", *r.RERANKER_STAGES]
    assert r.eval_stage("rl_unconditional") == "rl_eval_unconditional"
    # the RL ablation never becomes the run's registered reranker; grounded SFT only when no
    # model-teacher SFT is trained
    assert r.registry_order() == [
        "rl_rejection",
        "rl_targeted",
        "sft_rejection",
        "sft_targeted",
        "sft_grounded",
    ]
    assert TeacherConfig().modes == list(r.LLM_TRACE_MODES) == ["targeted", "rejection"]
    cfg = load_profile("ci", {"rl.variants": ["unconditional"], "teacher.modes": ["rejection"]})
    assert cfg.registry_candidate() == "sft_rejection"
    # GR2 is compared with the other start; the ablation with the conditional run of its start
    assert r.compared_variants("rejection", "rejection") == ["targeted"]
    assert r.compared_variants("unconditional", "rejection") == ["rejection"]
    assert r.compared_variants("unconditional", "targeted") == ["targeted"]
    assert [r.VARIANTS[v].conditional for v in variants] == [True, True, False]


def test_a_new_rl_variant_is_one_declaration(tmp_path):
    """Add an RL variant to a copy of the project by one `RLVariant(...)` line: the config
    accepts it, the pipeline declares its training and evaluation stages, the report pairs it
    with its twin and the flow has its lines, with nothing else edited."""
    import shutil
    import subprocess
    import sys

    from tasks.store import PROJECT_PACKAGES, PROJECT_ROOT

    for package in (*PROJECT_PACKAGES, "flows", "infra/configs"):
        shutil.copytree(
            PROJECT_ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    declarations = tmp_path / "data_contracts" / "rerankers.py"
    source = declarations.read_text()
    anchor = "RL_VARIANTS: tuple[RLVariant, ...] = (\n"
    line = (
        '    RLVariant("unconditional_targeted", False, "targeted", compare_with=(TWIN,), '
        "registrable=False),\n"
    )
    declarations.write_text(source.replace(anchor, anchor + line))
    check = """
import inspect
from data_contracts.config import load_profile
from data_contracts.rerankers import compared_variants
import flows.gr2_pipeline as flow
from tasks.stage import STAGES
cfg = load_profile("ci", {"rl.variants": ["unconditional_targeted"], "teacher.modes": ["targeted"]})
assert cfg.rl.sft_mode("unconditional_targeted") == "targeted"
assert {"rl_unconditional_targeted", "rl_eval_unconditional_targeted"} <= set(STAGES)
assert compared_variants("unconditional_targeted", "rejection") == ["targeted"]
assert cfg.registry_candidate() == "sft_targeted"  # an ablation is never registered
print("ok")
"""
    out = subprocess.run(
        [sys.executable, "-c", check], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert out.stdout.strip() == "ok", out.stderr[-2000:]


def test_a_config_logged_before_the_prompt_section_reads_back():
    from data_contracts.config import upgrade_logged

    today = load_profile("ci")
    old = today.model_dump(mode="json")
    prompt = old.pop("prompt")
    old["teacher"] |= {k: prompt[k] for k in ("history_items", "knowledge", "cowatch_notes")}
    old["data"]["prompt_history"] = 5
    old["sft"]["max_new_tokens"] = 96  # before budget forcing
    with pytest.raises(ValidationError, match="teacher.cowatch_notes moved to prompt"):
        PipelineConfig(**old)
    budget = today.prompt.model_copy(update={"max_explanation_tokens": 64})  # the default
    assert PipelineConfig(**upgrade_logged(old)) == today.model_copy(update={"prompt": budget})
    with pytest.raises(ValidationError, match="sft.max_new_tokens was removed"):
        SFTConfig(max_new_tokens=96)
    assert "history_items" in old["teacher"]  # the logged dict itself is left as it was


def test_engine_backend_resolves_on_this_machine_and_never_rekeys_a_stage(tmp_path):
    """auto: vLLM where its python exists, else transformers; vllm without it: a clear error;
    the engine settings are operational (no stage's config digest holds them)."""
    from data_contracts.config import EngineConfig, PipelineConfig
    from gr2_core.generation import backend_of

    python = tmp_path / "bin" / "python"
    auto = EngineConfig(vllm_python=str(python))
    assert backend_of(auto) == "transformers"
    with pytest.raises(FileNotFoundError, match="make teacher-env"):
        backend_of(EngineConfig(backend="vllm", vllm_python=str(python)))
    python.parent.mkdir(parents=True)
    python.touch()
    assert backend_of(auto) == "vllm"
    assert backend_of(EngineConfig(backend="transformers", vllm_python=str(python))) == (
        "transformers"
    )
    assert EngineConfig().digest() == EngineConfig(backend="vllm", concurrency=4).digest()
    with pytest.raises(ValueError, match="backend"):
        PipelineConfig.model_validate({"engine": {"backend": "tgi"}})
