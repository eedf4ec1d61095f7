"""Mid-training: task texts and loss masks, leakage, mixture, token warm-up, crash and resume,
batched constrained retrieval and caption scoring on a tiny model with the real tokenizer."""

from __future__ import annotations

import re

import numpy as np
import polars as pl
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import gr2_core.midtrain as mt
from gr2_core.catalogue import Catalogue
from gr2_core.constrained import constrained_generate
from gr2_core.models import export_student
from gr2_core.semantic_ids.sidmap import SID_BEGIN, SID_END, encode_sid
from gr2_core.sid_eval import caption_accuracy, next_item_ranks, sid_trie
from gr2_core.training import StopAfter, TrainSettings, train

N_ITEMS, LEVELS, SIZE = 30, 3, 8
SID_RE = re.compile(re.escape(SID_BEGIN) + ".*?" + re.escape(SID_END))


def _catalogue() -> Catalogue:
    items = pl.DataFrame(
        {
            "item_id": [f"m{i}" for i in range(N_ITEMS)],
            "title": [f"Film number {i}" for i in range(N_ITEMS)],
            "year": [1980 + i for i in range(N_ITEMS)],
            "categories": [["Drama", "War"] if i % 2 else ["Comedy"] for i in range(N_ITEMS)],
        }
    )
    codes = [[i % SIZE, (i // SIZE) % SIZE, i // (SIZE * SIZE)] for i in range(N_ITEMS)]
    sid_map = pl.DataFrame({"item_id": items["item_id"], "sid": [encode_sid(c) for c in codes]})
    return Catalogue.build(items, sid_map)


def _sequences(n_users: int = 12, length: int = 9) -> pl.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for u in range(n_users):
        items = [f"m{i}" for i in rng.choice(N_ITEMS, size=length, replace=False)]
        rows.append((f"u{u}", items, list(range(length)), length))
    return pl.DataFrame(rows, schema=["user_id", "items", "timestamps", "n"], orient="row")


@pytest.fixture(scope="module")
def student(tiny, tmp_path_factory):
    """The tiny model with this test's SID vocabulary added, as the student stage writes it."""
    out = tmp_path_factory.mktemp("student") / "model"
    return export_student(out, source=str(tiny), levels=LEVELS, sizes=[SIZE] * LEVELS)


def _trained_text(enc: dict, tok) -> str:
    return tok.decode([t for t, y in zip(enc["input_ids"], enc["labels"], strict=True) if y >= 0])


def test_loss_mask_covers_exactly_the_intended_tokens(student):
    tok = AutoTokenizer.from_pretrained(student)
    cat, eos = _catalogue(), tok.eos_token
    history = ["m1", "m2", "m3"]

    seq = mt.tokenize(mt.sequential_sample(history, "m4", cat), tok, 512)
    assert _trained_text(seq, tok) == cat.sid["m4"] + eos  # the next SID and EOS, nothing else
    prompt = tok.encode(mt.sequential_prompt(history, cat), add_special_tokens=False)
    assert seq["input_ids"][: len(prompt)] == prompt and set(seq["labels"][: len(prompt)]) == {-100}

    cap = mt.tokenize(mt.caption_sample("m5", cat), tok, 512)
    assert _trained_text(cap, tok) == "Film number 5 (1985) | Drama, War" + eos

    persona = mt.persona_sample("age 25, gender F", history, cat)
    enc = mt.tokenize(persona, tok, 512)
    assert enc["labels"] == enc["input_ids"]  # interleaved grounding: every token
    assert _trained_text(enc, tok).startswith("User: age 25, gender F.")
    assert cat.sid["m2"] + " Film number 2 (1982)" in persona[0][0]

    general = mt.tokenize([("Some English text.", True)], tok, 512)
    assert general["labels"] == general["input_ids"]

    # SID tokens stay single tokens inside running text
    ids = tok.encode(cat.sid["m7"], add_special_tokens=False)
    assert len(ids) == LEVELS + 2 and tok.decode(ids) == cat.sid["m7"]

    # truncation drops the oldest tokens, never the trained target
    short = mt.tokenize(mt.sequential_sample(history, "m4", cat), tok, 10)
    assert len(short["input_ids"]) == 10 and _trained_text(short, tok) == cat.sid["m4"] + eos


def test_mixture_uses_only_training_items_and_follows_the_ratios():
    cat, seqs = _catalogue(), _sequences()
    users = pl.DataFrame({"user_id": ["u0"], "age": ["25"], "zip_code": ["12345"]})
    ratios = {"persona": 24.3, "sequential": 65.7, "caption": 4.9, "general": 5.0}
    data = mt.build_mixture(
        seqs, users, cat, ratios, 200, 4, 0.2, ["General text. " * 50], 100, seed=0
    )
    counts = pl.Series([t for t, _ in data.samples]).value_counts()
    got = dict(counts.iter_rows())
    assert (
        got
        == mt.mixture_counts(ratios, 200)
        == {
            "persona": 49,
            "sequential": 131,
            "caption": 10,
            "general": 10,
        }
    )
    held = {"valid": set(), "test": set()}
    allowed = {}
    for user, items, n in seqs.select("user_id", "items", "n").iter_rows():
        held["valid"].add((user, items[n - 2]))
        held["test"].add((user, items[n - 1]))
        allowed[user] = items[: n - 2]
    sid_to_item = {v: k for k, v in cat.sid.items()}
    for task, segments in data.samples:
        text = "".join(t for t, _ in segments)
        if task in ("persona", "sequential"):
            sids = SID_RE.findall(text)
            items = [sid_to_item[s] for s in sids]
            # every item shown belongs to one user's training part, in order
            assert any(
                items == a[a.index(items[0]) : a.index(items[0]) + len(items)]
                for a in allowed.values()
                if items[0] in a
            ), text
        if task == "caption":
            item = sid_to_item[segments[0][0].removesuffix(mt.CAPTION_PROMPT)]
            assert item not in data.heldout_items
    assert "age 25" in next(s[0][0] for t, s in data.samples if t == "persona" and "age" in s[0][0])
    assert len(data.heldout_items) == round(0.2 * N_ITEMS)


def test_eval_prompts_take_the_valid_and_test_targets():
    seqs = _sequences(5)
    items = dict(zip(seqs["user_id"], seqs["items"].to_list(), strict=True))
    for split, offset in (("valid", 2), ("test", 1)):
        rows = mt.eval_prompts(seqs, split, 3, 0, 0)
        for user, history, target in rows.iter_rows():
            n = len(items[user])
            assert target == items[user][n - offset]
            assert history == items[user][n - offset - 3 : n - offset]


def _table(tok, n: int = 24) -> pl.DataFrame:
    cat, seqs = _catalogue(), _sequences()
    ratios = {"persona": 1.0, "sequential": 2.0, "caption": 1.0, "general": 0.0}
    data = mt.build_mixture(seqs, None, cat, ratios, n, 3, 0.1, [], 100, seed=0)
    return mt.to_table(data, tok, 96)


def _settings(**kw) -> TrainSettings:
    base = dict(
        max_steps=6,
        batch_size=4,
        grad_accum=1,
        lr=1e-2,
        warmup_steps=2,
        warmup_lr_scale=10.0,
        lr_warmup_ratio=0.0,
        logging_steps=1,
        save_steps=3,
        eval_steps=100,
        seed=0,
        num_threads=1,
    )
    return TrainSettings(**(base | kw))


def _first_new(tok) -> int:
    return len(tok) - (2 + LEVELS * SIZE)


def test_token_warmup_trains_only_the_new_rows(student, tmp_path):
    tok = AutoTokenizer.from_pretrained(student)
    before = AutoModelForCausalLM.from_pretrained(student).state_dict()
    settings = _settings(max_steps=3, warmup_steps=3, save_steps=100)
    model, log = train(
        student, _table(tok, 12), {}, tmp_path, settings, _first_new(tok), tok.pad_token_id
    )
    lrs = [r["learning_rate"] for r in log if "learning_rate" in r]
    assert lrs[0] == pytest.approx(settings.lr * settings.warmup_lr_scale)  # warm-up rate
    after = model.state_dict()
    emb = "model.embed_tokens.weight"
    first = _first_new(tok)
    assert torch.equal(after[emb][:first], before[emb][:first])  # old rows untouched
    assert not torch.equal(after[emb][first:], before[emb][first:])  # new SID rows learned
    for name, value in after.items():
        if name != emb and name != "lm_head.weight":
            assert torch.equal(value, before[name]), name
    assert all(p.requires_grad for p in model.parameters())  # full training may follow


def test_crash_and_resume_continue_where_training_stopped(student, tmp_path):
    tok = AutoTokenizer.from_pretrained(student)
    table, first, pad = _table(tok), _first_new(tok), tok.pad_token_id

    reference, ref_log = train(student, table, {}, tmp_path / "ref", _settings(), first, pad)

    with pytest.raises(KeyboardInterrupt):
        train(student, table, {}, tmp_path / "run", _settings(), first, pad, [StopAfter(4)])
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["checkpoint-3"]  # the crash came after step 4; step 3 was saved

    class Count(StopAfter):
        steps: list[int] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.steps.append(state.global_step)

    counter = Count(10**9)
    resumed, log = train(student, table, {}, tmp_path / "run", _settings(), first, pad, [counter])
    assert counter.steps == [4, 5, 6]  # only the remaining steps ran
    lrs = [r["learning_rate"] for r in ref_log if "learning_rate" in r]
    assert lrs[0] > 5 * _settings().lr > lrs[2]  # x10 during the 2 warm-up steps, then x1
    ref_loss = [r["loss"] for r in ref_log if "loss" in r]
    run_loss = [r["loss"] for r in log if "loss" in r]
    # the history of steps 1-3 comes back from the checkpoint, steps 4-6 match the reference
    assert run_loss == pytest.approx(ref_loss, rel=1e-4) and len(run_loss) == 6
    final = resumed.state_dict()
    for name, a in reference.state_dict().items():
        assert torch.allclose(a, final[name], atol=1e-5), name


def test_batched_constrained_retrieval_is_valid_distinct_and_scored(student):
    tok = AutoTokenizer.from_pretrained(student)
    model = AutoModelForCausalLM.from_pretrained(student)
    cat, seqs = _catalogue(), _sequences()
    rows = mt.eval_prompts(seqs, "test", 4, 0, 0)
    out = next_item_ranks(model, tok, cat, rows, num_beams=10, batch_size=5, max_length=96)
    assert out["invalid_rate"] == 0 and out["duplicate_rate"] == 0
    assert len(out["ranks"]) == rows.height
    assert all(r is None or 1 <= r <= 10 for r in out["ranks"])

    # the batched path returns what one-at-a-time search returns
    trie, item_of = sid_trie(cat, tok)
    prompts = [
        tok.encode(mt.sequential_prompt(h, cat), add_special_tokens=False)
        for h in rows["history"].to_list()[:3]
    ]
    batched = constrained_generate(model, prompts, trie, tok.eos_token_id, num_beams=10)
    for p, beams in zip(prompts, batched, strict=True):
        one = constrained_generate(model, torch.tensor([p]), trie, tok.eos_token_id, num_beams=10)
        assert [item_of[tuple(b)] for b in beams] == [item_of[tuple(b)] for b in one]

    acc, captions = caption_accuracy(model, tok, cat, ["m1", "m2"], batch_size=2)
    assert 0.0 <= acc <= 1.0 and [c["item_id"] for c in captions] == ["m1", "m2"]


def test_parse_title():
    assert mt.parse_title("Toy Story (1995) | Animation") == "Toy Story"
    assert mt.parse_title("Bad (1995) (1996) | x") == "Bad (1995)"
    assert mt.parse_title("no year here") is None


def test_a_checkpoint_torn_by_a_crash_is_dropped_and_the_one_before_resumed(tmp_path):
    """The Trainer writes `trainer_state.json` last: a folder without it, or with it cut short,
    is a save that a kill interrupted."""
    from gr2_core.training import resume_point

    ckpts = tmp_path / "checkpoints"
    assert resume_point(ckpts) is None
    for step in (2, 4, 6, 10):
        (ckpts / f"checkpoint-{step}").mkdir(parents=True)
        (ckpts / f"checkpoint-{step}" / "model.safetensors").write_bytes(b"weights")
    (ckpts / "checkpoint-2" / "trainer_state.json").write_text('{"global_step": 2}')
    (ckpts / "checkpoint-4" / "trainer_state.json").write_text('{"global_step": 4}')
    (ckpts / "checkpoint-10" / "trainer_state.json").write_text('{"global_st')  # cut short
    assert resume_point(ckpts) == str(ckpts / "checkpoint-4")
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-2", "checkpoint-4"]
