"""CTC summarization: collapse rule, beam search vs brute force, ROUGE by hand, order scores,
bad input, a tiny training run with crash/resume, and the saved model."""

from __future__ import annotations

import itertools
import json
import math
from collections import defaultdict

import numpy as np
import pytest

from gr2_core.summarization.ctc import (
    CTCSpec,
    DecodeOptions,
    Summarizer,
    TrainOptions,
    alignment_length,
    train_summarizer,
)
from gr2_core.summarization.data import (
    SummaryDataError,
    SummaryPair,
    asr_noise,
    load_aclsum,
    load_jsonl,
)
from gr2_core.summarization.decode import (
    collapse,
    greedy,
    prefix_beam_search,
    sequence_log_prob,
)
from gr2_core.summarization.metrics import kendall_tau, order_score, rouge_scores


def test_collapse_merges_repeats_then_drops_blanks():
    assert collapse([0, 1, 1, 0, 0, 1, 2, 2, 2, 0], blank=0) == [1, 1, 2]
    assert collapse([3, 3, 3], blank=0) == [3]
    assert collapse([0, 0], blank=0) == []
    assert collapse([], blank=0) == []
    assert collapse([2, 1, 2], blank=1) == [2, 2]  # blank need not be 0
    assert alignment_length([5, 5, 6]) == 4 and alignment_length([5, 6]) == 2


def _brute_force(log_probs: np.ndarray) -> dict[tuple[int, ...], float]:
    """P(y) for every label sequence y, by enumerating all C^T alignments."""
    T, C = log_probs.shape
    probs: dict[tuple[int, ...], float] = defaultdict(float)
    for path in itertools.product(range(C), repeat=T):
        p = math.exp(sum(log_probs[t, a] for t, a in enumerate(path)))
        probs[tuple(collapse(path, 0))] += p
    return probs


@pytest.mark.parametrize("seed", range(5))
def test_prefix_beam_search_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    T, C = 5, 3
    logits = rng.normal(size=(T, C)) * 2
    lp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    exact = _brute_force(lp)
    assert sum(exact.values()) == pytest.approx(1.0)
    # an unpruned beam wider than the number of prefixes is exact
    out = prefix_beam_search(lp, beam=1000, top_k=C, prune=-1e9)
    assert {tuple(y) for y, _ in out} == set(exact)
    for y, logp in out:
        assert math.exp(logp) == pytest.approx(exact[tuple(y)], rel=1e-9)
        assert sequence_log_prob(lp, y) == pytest.approx(math.log(exact[tuple(y)]), rel=1e-9)
    best = max(exact, key=exact.get)
    assert tuple(out[0][0]) == best
    # a narrow beam still returns a sequence with its true (kept-alignment) probability bound
    y, logp = prefix_beam_search(lp, beam=2, top_k=C, prune=-1e9)[0]
    assert logp <= math.log(exact[tuple(y)]) + 1e-9


def test_beam_length_control():
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(8, 4))
    lp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    for y, _ in prefix_beam_search(lp, beam=6, top_k=4, prune=-1e9, max_len=2):
        assert len(y) <= 2
    first, _ = prefix_beam_search(lp, beam=6, top_k=4, prune=-1e9, min_len=5)[0]
    assert len(first) >= 5
    long_, _ = prefix_beam_search(lp, beam=6, top_k=4, prune=-1e9, length_bonus=5.0)[0]
    short, _ = prefix_beam_search(lp, beam=6, top_k=4, prune=-1e9, length_bonus=-5.0)[0]
    assert len(long_) > len(short)


def test_greedy_and_its_length_control():
    # blank-heavy positions: plain greedy emits one label, length control picks the 3 least
    # blank positions and keeps input order
    p = np.array(
        [[0.9, 0.1, 0.0], [0.4, 0.6, 0.0], [0.8, 0.0, 0.2], [0.7, 0.0, 0.3], [0.95, 0.05, 0.0]]
    )
    lp = np.log(p + 1e-12)
    assert greedy(lp) == [1]
    assert greedy(lp, length=3) == [1, 2]  # positions 1, 3, 2 -> labels 1, 2, 2 -> merged
    assert greedy(lp, length=1) == [1]
    assert greedy(lp, max_len=0) == []


def test_rouge_matches_hand_computed_values():
    r = rouge_scores(["the cat sat on the mat"], ["the cat lay on the mat"])
    assert r["rouge1"][0] == pytest.approx(5 / 6)  # 5 of 6 unigrams shared both ways
    assert r["rouge2"][0] == pytest.approx(3 / 5)  # the cat, on the, the mat
    assert r["rougeL"][0] == pytest.approx(5 / 6)  # LCS: the cat on the mat
    assert rouge_scores(["a b"], [""])["rouge1"][0] == 0.0


def test_character_rouge_on_chinese():
    # reference 7 characters, prediction its first 4
    r = rouge_scores(["我爱北京天安门"], ["我爱北京"], level="char")
    assert r["rouge1"][0] == pytest.approx(2 * 1 * (4 / 7) / (1 + 4 / 7))  # 8/11
    assert r["rouge2"][0] == pytest.approx(2 * 1 * 0.5 / 1.5)  # 3 of 6 reference bigrams
    assert r["rougeL"][0] == pytest.approx(8 / 11)
    # same characters, other order: ROUGE-1 is perfect, the LCS (天安门) is 3 of 5
    r = rouge_scores(["天安门广场"], ["广场天安门"], level="char")
    assert r["rouge1"][0] == pytest.approx(1.0)
    assert r["rougeL"][0] == pytest.approx(0.6)
    # the word tokenizer would drop every Chinese character
    assert rouge_scores(["天安门广场"], ["天安门"], level="word")["rouge1"][0] == 0.0


def test_kendall_tau_and_order_score_edge_cases():
    assert math.isnan(kendall_tau([])) and math.isnan(kendall_tau([4]))
    assert kendall_tau([0, 1]) == 1.0 and kendall_tau([1, 0]) == -1.0
    assert kendall_tau([0, 2, 1]) == pytest.approx(1 / 3)
    src = "alpha beta gamma delta"
    assert order_score("alpha gamma delta", src) == 1.0
    assert order_score("delta gamma alpha", src) == -1.0
    assert math.isnan(order_score("omega", src)) and math.isnan(order_score("", src))
    # repeated words take the next occurrence after the previous match
    assert order_score("a b a b", "a b a b") == 1.0
    assert order_score("天安门", "我爱北京天安门", level="char") == 1.0


def test_asr_noise_is_seeded_and_near_its_rate():
    import difflib

    text = " ".join(f"w{i}" for i in range(2000))
    noisy = asr_noise(text, 0.3, seed=1)
    assert noisy == asr_noise(text, 0.3, seed=1) and noisy != asr_noise(text, 0.3, seed=2)
    assert asr_noise(text, 0.0, seed=1) == text
    # deletions and substitutions (each rate/3) remove a source word; insertions add one
    matcher = difflib.SequenceMatcher(None, text.split(), noisy.split(), autojunk=False)
    kept = sum(b.size for b in matcher.get_matching_blocks()) / 2000
    assert kept == pytest.approx(1 - 2 * 0.3 / 3, abs=0.03)
    with pytest.raises(ValueError, match="noise rate"):
        asr_noise(text, 1.5, seed=1)


def test_aclsum_loads_three_aspects_per_paper():
    test = load_aclsum("test")
    assert len(test) == 300 and len({p.doc_id for p in test}) == 100
    assert {p.aspect for p in test} == {"challenge", "approach", "outcome"}
    assert all(p.document and p.summary for p in test)


def test_bad_jsonl_records_are_named(tmp_path):
    good = json.dumps({"id": "a", "document": "some text here", "summary": "text"})
    path = tmp_path / "pairs.jsonl"
    path.write_bytes((good + "\n").encode() + b'{"document": "caf\xe9", "summary": "x"}\n')
    with pytest.raises(SummaryDataError, match=r"pairs.jsonl, line 2: not valid UTF-8"):
        load_jsonl(path)
    path.write_text(good + "\n" + json.dumps({"id": "b", "document": "  ", "summary": "y"}) + "\n")
    with pytest.raises(SummaryDataError, match="record 'b': empty document"):
        load_jsonl(path)
    path.write_text(good + "\n" + json.dumps({"id": "c", "text": "t", "summary": "y"}) + "\n")
    with pytest.raises(SummaryDataError, match="line 2: field 'document' missing"):
        load_jsonl(path)
    path.write_text(good + "\n{oops\n")
    with pytest.raises(SummaryDataError, match="line 2: not a JSON object"):
        load_jsonl(path)
    path.write_text(good + "\n")
    assert load_jsonl(path)[0].split == "train"


def _chinese_pairs(n: int, split: str, seed: int = 0) -> list[SummaryPair]:
    """Toy 'keep the marked characters' pairs: the summary is a subsequence of the document."""
    rng = np.random.default_rng(seed)
    chars = list("天地人山水火木金土日月星风雨云")
    out = []
    for i in range(n):
        doc = "".join(rng.choice(chars, size=24))
        keep = sorted(rng.choice(24, size=5, replace=False))
        out.append(
            SummaryPair(f"{split}{i}", f"{split}{i}", split, "", doc, "".join(doc[k] for k in keep))
        )
    return out


def _char_spec(**kw) -> CTCSpec:
    base = dict(encoder="char", hidden=32, layers=1, heads=2, window=16, max_source_words=100)
    return CTCSpec(**(base | kw))


def test_char_model_trains_resumes_and_round_trips(tmp_path):
    train, valid = _chinese_pairs(24, "train"), _chinese_pairs(6, "valid", seed=1)
    opts = TrainOptions(epochs=1, batch_size=8, lr=3e-3, num_threads=1, patience=100)
    work = tmp_path / "work"
    _, first = train_summarizer(train, valid, _char_spec(), opts, work)
    assert len(first) == 1
    # a "crash" after epoch 1: the same call with more epochs resumes from the checkpoint
    opts.epochs = 4
    seen = []
    model, history = train_summarizer(
        train, valid, _char_spec(), opts, work, on_epoch=lambda e, row: seen.append(e)
    )
    assert seen == [2, 3, 4], "finished epochs are not redone"
    assert history[0] == first[0]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    docs = [p.document for p in valid]
    out = model.summarize(docs, opts=DecodeOptions(length=5))
    alphabet = set("".join(p.document + p.summary for p in train))
    assert all(0 < len(s) <= 5 and set(s) <= alphabet for s in out)
    model.save(tmp_path / "saved")
    again = Summarizer.load(tmp_path / "saved")
    assert again.summarize(docs, opts=DecodeOptions(length=5)) == out
    assert again.summarize(docs, opts=DecodeOptions("beam", beam=3, top_k=3))
    with pytest.raises(ValueError, match="unknown aspect 'outcome'"):
        again.summarize(docs[:1], ["outcome"])


def test_summary_longer_than_alignment_is_refused_by_record(tmp_path):
    train = _chinese_pairs(4, "train")
    long_ = SummaryPair("too-long", "d", "train", "", "天地", "天天地地")  # needs 6 positions
    opts = TrainOptions(epochs=1, num_threads=1)
    with pytest.raises(SummaryDataError, match=r"record 'too-long': summary needs 6 positions"):
        train_summarizer([*train, long_], [], _char_spec(), opts, tmp_path / "w")
    assert not (tmp_path / "w" / "ckpt").exists()
    # upsampling gives each character 3 positions: now it fits
    _, hist = train_summarizer([*train, long_], [], _char_spec(upsample=3), opts, tmp_path / "w")
    assert len(hist) == 1
