"""Decoupled-weight SFT: sample encoding, the TRL trainer's loss, resume, answer scoring."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from data_contracts.config import SFTConfig
from gr2_core import rerank_eval
from gr2_core.catalogue import Catalogue
from gr2_core.sft import (
    WeightedCollator,
    encode_sample,
    train_sft,
    weighted_sft_trainer_class,
)
from gr2_core.training import StopAfter

SID1, SID2 = "<|sid_begin|><s_a_1><|sid_end|>", "<|sid_begin|><s_a_2><|sid_end|>"
MESSAGES = [
    {"role": "system", "content": "You rerank movies."},
    {
        "role": "user",
        "content": "Rank <|sid_begin|><s_a_1><|sid_end|> and <|sid_begin|><s_a_2><|sid_end|>.",
    },
]
EXPLANATION = 'The user likes "war" films: <|sid_begin|><s_a_2><|sid_end|> fits.'
RECS = ["<|sid_begin|><s_a_2><|sid_end|>", "<|sid_begin|><s_a_1><|sid_end|>"]


def test_sample_weights_follow_the_segments(tokenizer):
    s = encode_sample(tokenizer, MESSAGES, EXPLANATION, RECS, lambda_r=0.3, lambda_o=1.0)
    ids, labels, w = s["input_ids"], s["labels"], s["weights"]
    assert len(ids) == len(labels) == len(w)
    prompt = [t for t, x in zip(ids, w, strict=True) if x == 0]
    reasoning = [t for t, x in zip(ids, w, strict=True) if x == 0.3]
    answer = [t for t, x in zip(ids, w, strict=True) if x == 1.0]
    assert tokenizer.decode(prompt).endswith("assistant\n")
    assert all(y == -100 for y, x in zip(labels, w, strict=True) if x == 0)
    assert all(y == t for t, y, x in zip(ids, labels, w, strict=True) if x > 0)
    # reasoning: the explanation's escaped body; answer: everything around it and EOS
    assert tokenizer.decode(reasoning) == json.dumps(EXPLANATION)[1:-1]
    assert answer[-1] == tokenizer.eos_token_id
    # the trained part, decoded, is exactly the assistant's JSON (+ EOS)
    trained = [t for t, x in zip(ids, w, strict=True) if x > 0]
    assert tokenizer.decode(trained[:-1]) == json.dumps(
        {"explanation": EXPLANATION, "recommendations": RECS}
    )


def _rows(tokenizer, n: int = 6) -> list[dict]:
    return [
        encode_sample(
            tokenizer, MESSAGES, EXPLANATION + " x" * k, RECS[:: 1 if k % 2 else -1], 0.25, 1.0
        )
        for k in range(n)
    ]


def test_trainer_loss_is_the_hand_computed_weighted_cross_entropy(tiny, tokenizer, tmp_path):
    from trl import SFTConfig as TRLConfig

    model = AutoModelForCausalLM.from_pretrained(tiny)
    batch = WeightedCollator(tokenizer.pad_token_id or 0)(_rows(tokenizer, 3))
    trainer = weighted_sft_trainer_class()(
        model=model,
        args=TRLConfig(
            output_dir=str(tmp_path),
            use_cpu=True,
            report_to=[],
            dataset_kwargs={"skip_prepare_dataset": True},
            max_length=None,
        ),
        train_dataset=__import__("datasets").Dataset.from_list(_rows(tokenizer, 3)),
        data_collator=WeightedCollator(tokenizer.pad_token_id or 0),
        processing_class=tokenizer,
    )
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch)).item()
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # by hand: sum over trained positions of w_t * -log p(x_t | x_<t), over the count of them
    total, count = 0.0, 0
    for b in range(batch["input_ids"].shape[0]):
        for t in range(1, batch["input_ids"].shape[1]):
            w = batch["weights"][b, t].item()
            if w == 0:
                continue
            logp = torch.log_softmax(logits[b, t - 1].double(), -1)[batch["input_ids"][b, t]]
            total += -w * logp.item()
            count += 1
    assert count > 0
    assert loss == pytest.approx(total / count, rel=1e-5)


def _one_sgd_step(tiny, tokenizer, tmp_path, rows, batch_size: int, grad_accum: int):
    """Parameters after one plain-SGD optimizer step over `rows` (in order, no shuffling)."""
    from datasets import Dataset
    from trl import SFTConfig as TRLConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny)
    trainer = weighted_sft_trainer_class()(
        model=model,
        args=TRLConfig(
            output_dir=str(tmp_path / f"b{batch_size}x{grad_accum}"),
            use_cpu=True,
            report_to=[],
            dataset_kwargs={"skip_prepare_dataset": True},
            max_length=None,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=grad_accum,
            max_steps=1,
            optim="sgd",
            learning_rate=1.0,
            lr_scheduler_type="constant",
            weight_decay=0.0,
            max_grad_norm=0.0,
            save_strategy="no",
            remove_unused_columns=False,
        ),
        train_dataset=Dataset.from_list(rows),
        data_collator=WeightedCollator(tokenizer.pad_token_id or 0),
        processing_class=tokenizer,
    )
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(rows)
    trainer.train()
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def test_update_does_not_depend_on_gradient_accumulation(tiny, tokenizer, tmp_path):
    """grad_accum 2 x batch 2 makes the same SGD update as batch 4 (samples of different
    lengths, so a per-micro-batch mean would weight them differently and scale by grad_accum)."""
    rows = [
        encode_sample(tokenizer, MESSAGES, EXPLANATION + " more" * (6 * k), RECS, 0.25, 1.0)
        for k in range(4)
    ]
    assert len({len(r["input_ids"]) for r in rows}) == 4
    start = dict(AutoModelForCausalLM.from_pretrained(tiny).named_parameters())
    whole = _one_sgd_step(tiny, tokenizer, tmp_path, rows, batch_size=4, grad_accum=1)
    split = _one_sgd_step(tiny, tokenizer, tmp_path, rows, batch_size=2, grad_accum=2)
    moved = sum(float((whole[k] - start[k]).abs().sum()) for k in start)
    assert moved > 0
    for k in whole:
        d_whole, d_split = whole[k] - start[k], split[k] - start[k]
        scale = float(d_whole.abs().max()) + 1e-12
        assert float((d_split - d_whole).abs().max()) / scale < 1e-2, k  # float32 sums; old: ~1


def test_sft_resumes_from_its_checkpoint_after_a_crash(tiny, tokenizer, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    rows = _rows(tok, 8)
    cfg = SFTConfig(
        max_steps=4, batch_size=2, save_steps=2, logging_steps=1, lr=1e-3, num_threads=1
    )
    reference, ref_log = train_sft(tiny, rows, tmp_path / "ref", cfg, tok)
    with pytest.raises(KeyboardInterrupt):
        train_sft(tiny, rows, tmp_path / "run", cfg, tok, callbacks=(StopAfter(3),))
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("checkpoint-*")) == [
        "checkpoint-2"
    ]
    resumed, log = train_sft(tiny, rows, tmp_path / "run", cfg, tok)
    ref_loss = [r["loss"] for r in ref_log if "loss" in r]
    run_loss = [r["loss"] for r in log if "loss" in r]
    assert len(run_loss) == 4 and run_loss == pytest.approx(ref_loss, rel=1e-4)
    final = resumed.state_dict()
    for name, a in reference.state_dict().items():
        assert torch.allclose(a, final[name], atol=1e-5), name


def test_answers_are_scored_strictly():
    items = pl.DataFrame(
        {"item_id": ["a", "b", "c"], "title": ["A", "B", "C"], "year": [1990, 1991, 1992]}
    )
    sid = pl.DataFrame(
        {
            "item_id": ["a", "b", "c"],
            "sid": [f"<|sid_begin|><s_a_{k}><|sid_end|>" for k in range(3)],
        }
    )
    cat = Catalogue.build(items, sid)
    slates = pl.DataFrame(
        {"user_id": ["u"] * 4, "candidates": [["a", "b", "c"]] * 4, "target": ["b"] * 4}
    )
    s = cat.sid
    texts = [
        json.dumps({"explanation": "x", "recommendations": [s["b"], s["a"], s["c"]]}),
        json.dumps({"explanation": "x", "recommendations": [s["a"], s["b"], s["c"]]}),
        json.dumps({"explanation": "x", "recommendations": [s["a"], s["a"], s["c"]]}),
        "not json",
    ]
    out = rerank_eval.score_answers(texts, slates, cat)
    assert out["ranks"].tolist() == [1, 2, 0, 0]
    assert out["invalid"].tolist() == [0, 0, 1, 1]
    assert out["identity"].tolist() == [0, 1, 0, 0]
    assert list(out["reasons"]) == ["accepted", "accepted", "duplicate", "broken_json"]
    table = rerank_eval.reranker_table(
        "m", "test", out["ranks"], {"invalid_rate": out["invalid"]}, 50, 0.95, 0
    )
    values = dict(zip(table["metric"], table["value"], strict=True))
    assert values["recall@1"] == 0.25 and values["recall@5"] == 0.5
    assert values["ndcg@5"] == pytest.approx((1 + 1 / np.log2(3)) / 4)
    assert values["invalid_rate"] == 0.5
    # end to end: a slate without its target is a miss for any reranker -> coverage x value
    slates_all = pl.DataFrame({"split": ["test"] * 4, "target_rank": [1, None, 3, None]})
    cover = rerank_eval.coverage(slates_all, "test")
    assert cover == (0.5, 4)
    both = rerank_eval.reranker_table("m", "test", out["ranks"], {}, 50, 0.95, 0, cover)
    e2e = both.filter(pl.col("mode") == "end_to_end")
    ranking = {"recall@1", "recall@5", "recall@10", "ndcg@5", "ndcg@10"}
    assert set(e2e["metric"]) == ranking | {"coverage"}
    r5 = e2e.filter(pl.col("metric") == "recall@5").row(0, named=True)
    assert r5["value"] == 0.25 and r5["n"] == 4 and r5["ci_low"] < 0.25 < r5["ci_high"]


def test_end_to_end_rows_report_the_decoded_slates_and_resample_the_coverage():
    """25 decoded conditional slates out of 1,000 slates of which 30% hold their target: the
    rows say n = 25 (not 1,000), and an interval is not zero-width just because every decoded
    slate was a hit (the coverage is resampled, not taken as exact)."""
    ranks = np.ones(25, dtype=np.int64)  # every decoded slate: target first
    table = rerank_eval.reranker_table("m", "test", ranks, {}, 400, 0.95, 0, (0.3, 1000))
    e2e = {
        r["metric"]: r for r in table.filter(pl.col("mode") == "end_to_end").iter_rows(named=True)
    }
    assert {r["n"] for r in e2e.values()} == {25}
    r1 = e2e["recall@1"]
    assert r1["value"] == pytest.approx(0.3)
    assert r1["ci_low"] < 0.3 < r1["ci_high"]  # binomial spread of the coverage over 1,000
    assert r1["ci_high"] - r1["ci_low"] == pytest.approx(
        2 * 1.96 * (0.3 * 0.7 / 1000) ** 0.5, rel=0.25
    )
    cov = e2e["coverage"]
    assert (cov["value"], cov["ci_low"] < 0.3 < cov["ci_high"]) == (0.3, True)
    # a varying conditional value widens the end-to-end interval beyond the coverage's alone
    mixed = np.array([1, 0] * 12 + [1], dtype=np.int64)
    wide = rerank_eval.reranker_table("m", "test", mixed, {}, 400, 0.95, 0, (0.3, 1000))
    w = wide.filter((pl.col("mode") == "end_to_end") & (pl.col("metric") == "recall@1")).row(
        0, named=True
    )
    assert w["ci_high"] - w["ci_low"] > 2 * (r1["ci_high"] - r1["ci_low"])
