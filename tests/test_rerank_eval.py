"""The reranker evaluation protocol (`gr2_core.rerank_eval.run`) on a tiny student, no Prefect."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from data_contracts.config import EvalConfig, PromptConfig, SFTConfig
from gr2_core import rerank_eval
from gr2_core.semantic_ids.sidmap import encode_sid

ITEMS = [f"i{j}" for j in range(16)]


@pytest.fixture
def inputs(student, tmp_path) -> rerank_eval.RerankEvalInputs:
    """16 items with 2-level SIDs; per split 12 slates of 4 candidates, 9 holding the target."""
    codes = [(a, b) for a in range(4) for b in range(4)]
    pl.DataFrame(
        {
            "item_id": ITEMS,
            "title": [f"Movie {i}" for i in ITEMS],
            "year": [1990 + k for k in range(len(ITEMS))],
            "categories": [["Drama"]] * len(ITEMS),
        }
    ).write_parquet(tmp_path / "items.parquet")
    pl.DataFrame(
        {
            "item_id": ITEMS,
            "codes": [list(c) for c in codes],
            "sid": [encode_sid(c) for c in codes],
        }
    ).write_parquet(tmp_path / "sid_map.parquet")
    rng = np.random.default_rng(0)
    rows = []
    for split in ("valid", "test"):
        for u in range(12):
            perm = [ITEMS[j] for j in rng.permutation(len(ITEMS))]
            covered = u % 4 != 3
            rank = 1 + u % 4 if covered else None
            target = perm[3 + rank - 1] if covered else perm[-1]
            rows.append(
                {
                    "user_id": f"u{u}",
                    "position": 5 if split == "test" else 4,
                    "split": split,
                    "history": perm[:3],
                    "target": target,
                    "candidates": perm[3:7],
                    "scores": [4.0, 3.0, 2.0, 1.0],
                    "target_rank": rank,
                }
            )
    pl.DataFrame(rows).write_parquet(tmp_path / "slates.parquet")
    users = {f"u{u}": [ITEMS[(u + k) % len(ITEMS)] for k in range(6)] for u in range(12)}
    pl.DataFrame(
        {"user_id": list(users), "items": list(users.values()), "n": [6] * len(users)}
    ).write_parquet(tmp_path / "sequences.parquet")
    return rerank_eval.RerankEvalInputs(
        model=student,
        items=tmp_path / "items.parquet",
        sid_map=tmp_path / "sid_map.parquet",
        sequences=tmp_path / "sequences.parquet",
        slates=tmp_path / "slates.parquet",
        label="sft-rejection",
        title="tiny",
        prompt=PromptConfig(history_items=2, max_explanation_tokens=12),
        bootstrap=EvalConfig(bootstrap_samples=50),
    )


def test_eval_slates_are_nested_prefixes_of_one_seeded_draw():
    rows = [
        {"user_id": f"u{u:02d}", "position": 3, "split": "test", "target_rank": u % 3 or None}
        for u in range(40)
    ]
    slates = pl.DataFrame(rows)
    covered = slates.filter(pl.col("target_rank").is_not_null()).height
    sets = {n: rerank_eval.eval_slates(slates, "test", n, seed=7) for n in (5, 12, None)}
    jobs = {n: set(t["user_id"]) for n, t in sets.items()}
    assert [len(jobs[n]) for n in (5, 12, None)] == [5, 12, covered]
    assert jobs[5] < jobs[12] < jobs[None]  # paired on the common slates
    assert sets[12]["target_rank"].is_not_null().all()
    assert rerank_eval.eval_slates(slates, "test", 12, seed=8)["user_id"].to_list() != sorted(
        jobs[12]
    )  # another seed, another draw


def test_evaluation_scores_each_method_on_its_slates_paired_with_the_input_order(inputs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    cfg = SFTConfig(eval_slates=4, scored_slates=None, eval_batch_size=3, num_threads=1)
    result = rerank_eval.run(inputs, cfg, out)

    assert set(result.files) == {"metrics", "answers", "report"}
    assert all((out / f).exists() for f in result.files.values())
    assert "answers.csv" in result.tables and "metrics.md" in result.texts
    # the table says how each method was answered: scoring decodes nothing
    report = (out / "metrics.md").read_text()
    assert "scored: transformers, one tree-masked forward per 1 slate(s)" in report
    assert "free: transformers generate" in report
    answers = pl.read_parquet(out / "answers.parquet")
    slates = pl.read_parquet(inputs.slates)
    table = pl.read_parquet(out / "metrics.parquet")
    for split in ("valid", "test"):
        part = answers.filter(pl.col("split") == split)
        jobs = {m: set(part.filter(pl.col("method") == m)["job"]) for m in part["method"]}
        # the decoding methods on 4 slates, scoring and the input order on all 9 conditional
        # slates (of 12), the 4 among the 9: every comparison is paired
        decoded = jobs["sft-rejection"]
        assert len(decoded) == 4 and jobs["sft-rejection constrained"] == decoded
        scored_jobs = jobs["sft-rejection scored"]
        assert len(scored_jobs) == 9 and jobs["preranker"] == scored_jobs
        assert decoded < jobs["preranker"]
        n = dict(
            table.filter((pl.col("split") == split) & (pl.col("metric") == "recall@1"))
            .filter(pl.col("mode") == "conditional")
            .select("method", "n")
            .iter_rows()
        )
        assert n == {
            "sft-rejection": 4,
            "sft-rejection constrained": 4,
            "sft-rejection scored": 9,
            "preranker": 9,
        }
        truth = slates.filter(pl.col("split") == split).with_columns(
            pl.format("{}:{}", "user_id", "position").alias("job")
        )
        pre = part.filter(pl.col("method") == "preranker").join(truth, on="job")
        assert (pre["rank"] == pre["target_rank"]).all()
        # the constrained list is always a permutation of the slate: valid, target ranked
        con = part.filter(pl.col("method") == "sft-rejection constrained")
        assert (con["reason"] == "accepted").all() and con["rank"].is_between(1, 4).all()
        # so is the scored order (no list decoded)
        scored = part.filter(pl.col("method") == "sft-rejection scored")
        assert (scored["reason"] == "accepted").all() and scored["rank"].is_between(1, 4).all()
        # an invalid free answer counts as a miss
        free = part.filter(pl.col("method") == "sft-rejection")
        assert (free.filter(pl.col("reason") != "accepted")["rank"] == 0).all()
        assert result.metrics[f"{split}/sft-rejection constrained.invalid_rate"] == 0.0
        # end to end = coverage (9 of 12) x conditional
        cond = result.metrics[f"{split}/preranker.recall@1"]
        e2e = result.metrics[f"{split}/preranker.end_to_end.recall@1"]
        assert e2e == pytest.approx(0.75 * cond)


def test_evaluation_needs_the_cowatch_sequences_only_when_the_prompt_shows_notes(inputs, tmp_path):
    from dataclasses import replace

    cfg = SFTConfig(eval_slates=2, eval_batch_size=2, num_threads=1)
    missing = tmp_path / "absent.parquet"
    no_notes = replace(inputs, sequences=missing, prompt=PromptConfig(cowatch_notes=False))
    out = tmp_path / "out"
    out.mkdir()
    assert rerank_eval.run(no_notes, cfg, out).metrics  # never reads the sequences
    with pytest.raises(FileNotFoundError):
        rerank_eval.run(replace(inputs, sequences=missing), cfg, out)
