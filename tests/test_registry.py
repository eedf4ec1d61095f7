"""The registry's parts: the promotion rule, the reranker bundle and its request checks,
registration, promotion against a champion scored on another set, rollback."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from data_contracts.config import PromptConfig
from gr2_core.catalogue import Catalogue
from gr2_core.promotion import (
    Gate,
    decide,
    frozen_set_digest,
    job_ids,
    paired_differences,
    slate_results,
)
from gr2_core.reranker import Reranker, RerankRequestError, RerankSettings, save_bundle
from gr2_core.semantic_ids.sidmap import encode_sid

ITEMS = [f"i{j}" for j in range(8)]
LOG = logging.getLogger("test_registry")


def _results(ranks, invalid=None, identity=None) -> pl.DataFrame:
    n = len(ranks)
    jobs = [f"u{i}:0" for i in range(n)]
    zeros = np.zeros(n)
    return slate_results(
        jobs,
        np.array(ranks),
        zeros if invalid is None else np.array(invalid),
        zeros if identity is None else np.array(identity),
    )


def test_first_model_is_promoted_on_its_rates_alone():
    gate = Gate(max_invalid_rate=0.2, max_identity_rate=0.5)
    ok = decide(_results([1, 3, 0, 2]), None, gate)
    assert ok.promote and "no champion yet" in ok.reasons[0]
    bad = decide(_results([1, 3, 0, 2], invalid=[1, 0, 0, 0], identity=[0, 1, 1, 1]), None, gate)
    assert not bad.promote
    assert any("invalid rate 0.250" in r for r in bad.reasons)
    assert any("identity rate 0.750" in r for r in bad.reasons)


def test_a_clearly_worse_challenger_is_refused_and_a_tie_is_promoted():
    gate = Gate(samples=500, min_slates=30)
    champion = _results([1] * 30)
    worse = decide(_results([9] * 30), champion, gate)  # rank 9: outside the top 5
    assert not worse.promote
    assert {c["check"] for c in worse.checks if not c["pass"]} == {"recall@5", "ndcg@5"}
    assert any("recall@5 is worse" in r for r in worse.reasons)
    tie = decide(_results([1] * 30), champion, gate)
    assert tie.promote and tie.reasons == ["every check passed"]
    # one slate lost out of 30: the default (non-inferiority, margin 0.02) wants the interval
    # above -0.02, which 30 slates cannot show...
    assert not decide(_results([1] * 29 + [9]), champion, gate).promote
    # ...while the permissive rule promotes it for lack of evidence against it
    permissive = Gate(samples=500, non_inferiority=False, margin=0.0, min_slates=30)
    assert decide(_results([1] * 29 + [9]), champion, permissive).promote
    assert "| recall@5 |" in worse.markdown("t") and "**refused**" in worse.markdown("t")


def test_the_default_gate_refuses_comparisons_on_too_few_slates():
    """25 slates (the demo's evaluation size) cannot separate two rerankers: the default gate
    refuses rather than promote on intervals that wide; the first champion is unaffected."""
    champion, better = _results([3] * 25), _results([1] * 25)
    refused = decide(better, champion, Gate(samples=200))
    assert not refused.promote
    assert any("only 25 frozen-set slates" in r for r in refused.reasons)
    assert decide(better, None, Gate(samples=200)).promote
    assert decide(_results([3] * 200), _results([3] * 200), Gate(samples=200)).promote


def test_results_from_different_slates_are_not_compared():
    a = _results([1, 2])
    b = a.with_columns(pl.Series("job", ["x:0", "y:0"]))
    with pytest.raises(ValueError, match="different slates"):
        decide(a, b, Gate())


def test_frozen_set_digest_depends_on_content_not_order():
    rows = _slates(4, seed=0)
    assert frozen_set_digest(rows) == frozen_set_digest(rows.reverse())
    other = rows.with_columns(pl.Series("target", ["i7"] * rows.height))
    assert frozen_set_digest(other) != frozen_set_digest(rows)


# -- the bundle ---------------------------------------------------------------------------------
def _catalogue() -> Catalogue:
    codes = [(a, b) for a in range(4) for b in range(4)][: len(ITEMS)]
    sid = {i: encode_sid(c) for i, c in zip(ITEMS, codes, strict=True)}
    name = {i: f"Movie {i} (1999)" for i in ITEMS}
    return Catalogue(sid, name, {i: f"{name[i]} | Drama" for i in ITEMS})


def _sequences() -> pl.DataFrame:
    users = {f"u{u}": [ITEMS[(u + k) % len(ITEMS)] for k in range(5)] for u in range(4)}
    return pl.DataFrame(
        {"user_id": list(users), "items": list(users.values()), "n": [5] * len(users)}
    )


def _slates(n: int, seed: int) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n):
        perm = [ITEMS[j] for j in rng.permutation(len(ITEMS))]
        rows.append(
            {
                "user_id": f"u{u}",
                "position": 4,
                "history": perm[:3],
                "candidates": perm[3:7],
                "target": perm[3 + u % 4],
            }
        )
    return pl.DataFrame(rows)


@pytest.fixture
def bundle(student, tmp_path):
    prompt = PromptConfig(history_items=3, max_explanation_tokens=8)
    settings = RerankSettings(variant="sft_rejection", prompt=prompt)
    return save_bundle(tmp_path / "bundle", student, _catalogue(), settings, _sequences())


def test_bundle_reranks_and_builds_the_training_prompt(bundle):
    from gr2_core.prompts import CoWatch, student_messages

    reranker = Reranker(bundle)
    out = reranker.rerank([["i0", "i1"], []], [["i2", "i3", "i4"], ["i5", "i6"]], ["u0", "new"])
    assert [sorted(a["recommendations"]) for a in out] == [["i2", "i3", "i4"], ["i5", "i6"]]
    assert all(a["valid"] and a["reason"] == "accepted" for a in out)  # scored: always valid
    # the served prompt is the one SFT trained on and evaluation scored
    history, candidates = ["i0", "i1", "i2", "i3"], ["i4", "i5"]
    prompt = PromptConfig(history_items=3, max_explanation_tokens=8)
    trained = student_messages(
        history, candidates, _catalogue(), prompt, CoWatch(_sequences()), "u1"
    )
    served = reranker.messages("u1", history, candidates)
    assert json.dumps(served) == json.dumps(trained)  # byte for byte
    shown = served[1]["content"]  # the last 3 history items: i0 is cut, i1 is shown
    assert _catalogue().sid["i0"] not in shown and _catalogue().sid["i1"] in shown


def test_bundle_settings_from_before_the_prompt_section_still_load():
    """A champion registered before `prompt` was its own section kept the fields flat, a
    `max_new_tokens` that budget forcing replaced and a `constrained` flag that `method`
    replaced: it keeps answering the way it was judged."""
    flat = {"variant": "sft_rejection", "history_items": 3, "knowledge": False, "max_new_tokens": 8}
    settings = RerankSettings.model_validate_json(json.dumps(flat | {"constrained": True}))
    assert settings.prompt == PromptConfig(history_items=3, knowledge=False)
    assert settings.method == "constrained"
    free = RerankSettings.model_validate_json(json.dumps(flat | {"constrained": False}))
    assert free.method == "free"
    again = RerankSettings.model_validate_json(settings.model_dump_json())
    assert again == settings


@pytest.mark.parametrize(
    ("history", "candidates", "message"),
    [
        (["i0"], ["i1", "nope"], "row 0: unknown item id(s) in 'candidates': ['nope']"),
        (["zzz"], ["i1"], "unknown item id(s) in 'history': ['zzz']"),
        (["i0"], [], "field 'candidates' is empty"),
        (["i0"], ["i1", "i1"], "duplicate item id(s) in 'candidates': ['i1']"),
        ("i0", ["i1"], "field 'history' must be a list of item ids, got str"),
    ],
)
def test_bad_requests_name_the_row_field_and_value(bundle, history, candidates, message):
    with pytest.raises(RerankRequestError, match=re.escape(message)):
        Reranker(bundle).rerank([history], [candidates])


def test_requests_past_the_bundles_limits_are_refused_naming_the_limit(bundle):
    """Too many rows, candidates or history items: refused before any work (the scoring
    server's 400), the limit and its setting named; at the limit, answered."""
    reranker = Reranker(bundle)
    reranker.settings = reranker.settings.model_copy(
        update={"max_rows": 2, "max_candidates": 3, "max_history": 4}
    )
    cands = ["i2", "i3", "i4"]
    with pytest.raises(RerankRequestError, match=re.escape("3 rows in one request; this model")):
        reranker.rerank([["i0"]] * 3, [cands] * 3)
    with pytest.raises(RerankRequestError, match=re.escape("at most 3 (max_candidates")):
        reranker.rerank([["i0"]], [[*cands, "i5"]])
    with pytest.raises(RerankRequestError, match=re.escape("'history' has 5 items; this model")):
        reranker.rerank([["i0", "i1", "i5", "i6", "i7"]], [cands])
    out = reranker.rerank([["i0", "i1", "i5", "i6"]] * 2, [cands] * 2)
    assert [sorted(a["recommendations"]) for a in out] == [cands, cands]
    assert RerankSettings(variant="x").max_candidates == 100  # the defaults a bundle gets


# -- registry: registration, promotion on another set, rollback ---------------------------------
def test_promotion_rescores_a_champion_from_another_set_and_rolls_back(bundle, tmp_path):
    from mlflow.tracking import MlflowClient

    from tasks.registry import CHAMPION, PREVIOUS, log_and_register, promote_version, rollback

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.create_experiment("t", artifact_location=(tmp_path / "art").as_uri())
    rows_a, rows_b = _slates(4, seed=0), _slates(4, seed=1)
    gate = Gate(max_invalid_rate=0.5, max_identity_rate=1.0, samples=200, min_slates=1)

    run1 = client.create_run(exp).info.run_id
    results_a = slate_results(job_ids(rows_a), np.array([2, 3, 1, 4]), np.zeros(4), np.zeros(4))
    v1 = log_and_register(uri, run1, "m", bundle, rows_a, results_a, {"gr2.variant": "a"})
    decision, _ = promote_version(uri, "m", v1.version, gate, LOG)
    assert decision.promote
    # the logged model carries the code it imports (the core and the contracts) and their pins
    # (read through this test's client: a `models:/` URI would resolve through the global one)
    import mlflow

    location = client.get_logged_model(v1.source.removeprefix("models:/")).artifact_location
    logged = Path(mlflow.artifacts.download_artifacts(artifact_uri=location))
    assert {"gr2_core", "data_contracts"} <= {p.name for p in (logged / "code").iterdir()}
    assert "pandera==" in (logged / "requirements.txt").read_text()
    assert client.get_model_version_by_alias("m", CHAMPION).version == v1.version

    # version 2 was scored on other slates: the champion is re-scored on them (its pyfunc),
    # except a slate with an item added since the champion was trained
    rows_b = rows_b.with_columns(
        pl.when(pl.col("user_id") == "u3")
        .then(pl.col("candidates").list.concat(pl.lit(["i99"])))
        .otherwise(pl.col("candidates"))
        .alias("candidates")
    )
    run2 = client.create_run(exp).info.run_id
    results_b = slate_results(job_ids(rows_b), np.ones(4, dtype=int), np.zeros(4), np.zeros(4))
    v2 = log_and_register(uri, run2, "m", bundle, rows_b, results_b, {"gr2.variant": "b"})
    assert v2.tags["gr2.eval_set"] != v1.tags["gr2.eval_set"]
    decision, report = promote_version(uri, "m", v2.version, gate, LOG)
    assert decision.promote, report
    assert "re-scored on 3 of the 4 frozen-set slates (1 hold items it does not know)" in report
    assert "champion_v1.parquet" in {
        a.path.split("/")[-1] for a in client.list_artifacts(run2, "frozen_set")
    }
    assert client.get_model_version_by_alias("m", CHAMPION).version == v2.version
    assert client.get_model_version_by_alias("m", PREVIOUS).version == v1.version
    again, why = promote_version(uri, "m", v2.version, gate, LOG)
    assert again is None and "already" in why

    assert rollback(uri, "m") == (str(v2.version), str(v1.version))
    assert client.get_model_version_by_alias("m", CHAMPION).version == v1.version
    assert "gr2.rolled_back" in client.get_model_version("m", v2.version).tags
    with pytest.raises(RuntimeError, match="nothing to roll back"):
        rollback(uri, "m")


def test_paired_differences_compare_methods_slate_by_slate():
    jobs = [f"u{i}:1" for i in range(40)]
    rl = [1] * 20 + [3] * 20  # target first on half the slates, third on the rest
    pre = [2] * 40
    answers = pl.DataFrame(
        {
            "split": ["test"] * 80 + ["valid"],
            "method": ["rl-rejection"] * 40 + ["preranker"] * 40 + ["rl-rejection"],
            "job": jobs + jobs + ["u0:1"],
            "rank": rl + pre + [0],
        }
    )
    pairs = [("rl-rejection", "preranker"), ("rl-rejection", "rl-targeted")]  # 2nd: absent
    out = paired_differences(answers, "test", pairs, ["recall@1", "ndcg@5"], 500, 0.95, 0)
    assert out["baseline"].unique().to_list() == ["preranker"] and out["n"].to_list() == [40, 40]
    by = {r["metric"]: r for r in out.iter_rows(named=True)}
    assert by["recall@1"]["diff"] == pytest.approx(0.5)  # 20 of 40 slates gain a hit at 1
    ndcg = 0.5 * (1 - 1 / np.log2(3)) + 0.5 * (1 / np.log2(4) - 1 / np.log2(3))
    assert by["ndcg@5"]["diff"] == pytest.approx(ndcg)
    for r in by.values():
        assert r["ci_low"] <= r["diff"] <= r["ci_high"]
    assert by["recall@1"]["ci_low"] > 0  # no slate loses a hit at 1: the CI excludes 0
