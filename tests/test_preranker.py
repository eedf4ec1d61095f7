"""SASRec pre-ranker: windows, exact faiss search with exclusions, slates, resume."""

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from data_contracts.config import PrerankerConfig
from gr2_core import preranker as core
from gr2_core.split import build_samples, build_sequences, preranker_sequences

TINY = PrerankerConfig(
    hidden_dim=16,
    num_heads=2,
    num_layers=1,
    max_len=6,
    epochs=3,
    batch_size=8,
    num_threads=1,
    dropout=0.0,
)


def test_training_windows_cover_every_transition():
    seq = list(range(1, 15))  # 14 ids -> 13 transitions
    windows = core.training_windows([seq], max_len=5)
    transitions = set()
    for w in windows.tolist():
        ids = [x for x in w if x]
        transitions |= set(zip(ids, ids[1:], strict=False))
    assert transitions == set(zip(seq, seq[1:], strict=False))
    assert windows.shape[1] == 6


def test_pad_left_right_aligns():
    out = core.pad_left([[1, 2], [3, 4, 5, 6]], 3)
    assert out.tolist() == [[0, 1, 2], [4, 5, 6]]


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 8), st.integers(0, 40))
def test_search_excluding_matches_brute_force(seed, k, n_excl):
    rng = np.random.default_rng(seed)
    items = rng.normal(size=(50, 8)).astype(np.float32)
    queries = rng.normal(size=(3, 8)).astype(np.float32)
    exclude = [set(rng.choice(50, size=n_excl, replace=False).tolist()) for _ in range(3)]
    ids, _ = core.search_excluding(core.build_index(items), queries, exclude, k, margin=2)
    for q in range(3):
        scores = items @ queries[q]
        order = [i for i in np.argsort(-scores, kind="stable") if i not in exclude[q]][:k]
        got = [i for i in ids[q] if i >= 0]
        assert set(got) == set(order)  # same items (ties may reorder)
        assert not set(got) & exclude[q]


def _toy():
    rng = np.random.default_rng(0)
    items = [f"m{i}" for i in range(30)]
    rows = []
    for u in range(20):
        seq = rng.choice(30, size=12, replace=False)
        rows += [(f"u{u}", items[s], t) for t, s in enumerate(seq)]
    inter = pl.DataFrame(rows, schema=["user_id", "item_id", "timestamp"], orient="row")
    return items, build_sequences(inter)


def test_slates_exclude_prefix_and_rank_target():
    items, seqs = _toy()
    vocab = core.ItemVocab(items)
    train = [vocab.encode(s[:-5]) for s in seqs["items"].to_list()]
    model, history = core.train_sasrec(train, len(items), TINY)
    assert len(history) == 3 and all(np.isfinite(r["train_loss"]) for r in history)
    samples = build_samples(seqs, holdout=5, max_history=50)
    slates = core.generate_slates(model, vocab, samples, seqs, slate_size=10)
    prefix = dict(zip(seqs["user_id"], seqs["items"].to_list(), strict=True))
    for row in slates.iter_rows(named=True):
        cands = row["candidates"]
        assert len(cands) == 10 == len(set(cands))
        assert not set(cands) & set(prefix[row["user_id"]][: row["position"]])
        expected = cands.index(row["target"]) + 1 if row["target"] in cands else None
        assert row["target_rank"] == expected
        assert row["scores"] == sorted(row["scores"], reverse=True)


def test_early_stopping_monitors_a_position_out_of_training_and_of_reranker_samples():
    items, seqs = _toy()
    vocab = core.ItemVocab(items)
    prefixes = preranker_sequences(seqs, holdout=5)
    train, monitor = core.hold_out_monitor([vocab.encode(s) for s in prefixes["items"]])
    samples = build_samples(seqs, holdout=5, max_history=50)
    reranker_positions = set(zip(samples["user_id"], samples["position"], strict=True))
    full = {u: vocab.encode(s) for u, s in zip(seqs["user_id"], seqs["items"], strict=True)}
    assert len(monitor[1]) == prefixes.height  # one monitored position per user
    rows = zip(prefixes["user_id"], train, *monitor, strict=True)
    for user, seq, history, target in rows:
        position = len(history)
        assert history == full[user][:position] and target == full[user][position]
        assert seq == full[user][: len(seq)] and len(seq) <= position  # never a training target
        assert (user, position) not in reranker_positions  # nor a slate the pre-ranker produces
    model, history = core.train_sasrec(train, len(items), TINY, monitor)
    assert all("monitor_ndcg@10" in r for r in history)
    with pytest.raises(ValueError, match="fewer than 2"):
        core.hold_out_monitor([[1, 2], [3]])


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_resume_runs_exactly_the_remaining_epochs_bit_for_bit(tmp_path: Path, dropout: float):
    """With dropout on, the random state is part of the checkpoint: the resumed run's weights
    equal an uninterrupted run's exactly."""
    items, seqs = _toy()
    vocab = core.ItemVocab(items)
    train = [vocab.encode(s[:-5]) for s in seqs["items"].to_list()]
    ckpt = tmp_path / "ckpt.pt"
    seen = []
    cfg = TINY.model_copy(update={"dropout": dropout})
    two = cfg.model_copy(update={"epochs": 2})
    core.train_sasrec(train, len(items), two, checkpoint=ckpt)  # then "crash"
    assert not ckpt.with_name("ckpt.pt.tmp").exists()  # written aside, then moved in
    model, history = core.train_sasrec(
        train, len(items), cfg, checkpoint=ckpt, on_epoch=lambda e, r: seen.append(e)
    )
    assert seen == [3]  # only the remaining epoch ran
    full, full_history = core.train_sasrec(train, len(items), cfg)
    assert history == full_history
    for name, tensor in full.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_checkpoint_folder_round_trip(tmp_path: Path):
    items, seqs = _toy()
    vocab = core.ItemVocab(items)
    model, _ = core.train_sasrec(
        [vocab.encode(s) for s in seqs["items"].to_list()],
        30,
        TINY.model_copy(update={"epochs": 1}),
    )
    core.save(model, vocab, tmp_path)
    again, vocab2 = core.load(tmp_path)
    assert vocab2.items == items
    x = core.pad_left([[1, 2, 3]], TINY.max_len)
    assert np.allclose(model.user_vectors(x).numpy(), again.user_vectors(x).numpy())
