"""The answer machine: budget forcing, slate lists, citations, forced tokens, and SFT's
tokenization of an answer matching what the decoder writes."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gr2_core.constrained import ConstraintError
from gr2_core.decoding import (
    CLOSE,
    OPEN,
    REASONING,
    AnswerMachine,
    AnswerTokens,
    answer_ids,
    answer_segments,
    fit_explanation,
)
from gr2_core.generation import HFEngine, machines_for, prompt_ids, scoring_head
from gr2_core.prompts import check_answer, parse_answer
from gr2_core.semantic_ids.sidmap import encode_sid, sid_tokens
from gr2_core.training import autocast

SLATE = [encode_sid([a, b]) for a, b in ((1, 2), (1, 3), (4, 0))]


@pytest.fixture(scope="module")
def sid_tok(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.add_tokens(sid_tokens(2, [8, 8]))
    return tok


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_answer_segments_concatenate_to_the_compact_json():
    segments = answer_segments('He said "hi"\nthen left', SLATE)
    text = "".join(t for t, _ in segments)
    assert text == json.dumps({"explanation": 'He said "hi"\nthen left', "recommendations": SLATE})
    answer, reason = parse_answer(text)
    assert reason == "ok" and answer.recommendations == SLATE
    assert [k for _, k in segments].count(REASONING) == 1
    with pytest.raises(ValueError, match="at least one SID"):
        answer_segments("x", [])


def test_the_machine_accepts_every_token_sft_trains_on(sid_tok):
    """Training and decoding tokenize an answer the same way: a constrained machine walks the
    SFT sample's answer tokens without a rejection, and ends where the sample ends."""
    fmt = AnswerTokens.of(sid_tok)
    explanation = f"Fans of {SLATE[2]} tend to watch sequels."
    answer, kinds = answer_ids(sid_tok, explanation, [SLATE[2], SLATE[0], SLATE[1]])
    slate = [ids(sid_tok, s) for s in SLATE]
    m = AnswerMachine(fmt, budget=64, slate=slate, cite=slate)
    for t in answer:
        m.push(t)
    assert m.done
    assert sum(k == REASONING for k in kinds) == len(ids(sid_tok, explanation))


def test_budget_forcing_closes_the_explanation_and_opens_the_list(sid_tok):
    fmt = AnswerTokens.of(sid_tok)
    m = AnswerMachine(fmt, budget=3)
    written = []
    for _ in fmt.open:  # the opening is written for the model
        (t,) = m.allowed()
        written.append(t)
        m.push(t)
    assert m.allowed() is None and fmt.eos in m.banned()  # free, but no EOS in the explanation
    with pytest.raises(ConstraintError):
        m.push(fmt.eos)
    for t in ids(sid_tok, " one two three four"):
        if m.allowed() is not None:
            break
        written.append(t)
        m.push(t)
    assert m.forced_close
    while m.allowed() is not None and len(m.allowed()) == 1 and not m.done:
        (t,) = m.allowed()
        written.append(t)
        m.push(t)
        if m.phase == "list" and not m.queue:
            break
    assert sid_tok.decode(written).endswith(CLOSE)
    assert sid_tok.decode(written).startswith(OPEN)
    assert m.allowed() is None and not m.banned()  # a free list, EOS allowed


def test_a_model_that_closes_itself_is_not_forced(sid_tok):
    fmt = AnswerTokens.of(sid_tok)
    m = AnswerMachine(fmt, budget=64)
    for t in fmt.open:
        m.push(t)
    for t in ids(sid_tok, "Short.") + [fmt.close[0]]:
        m.push(t)
    assert not m.forced_close and list(m.queue) == list(fmt.close[1:])


def test_a_free_list_ends_where_the_model_closes_it(sid_tok):
    """The model's own END closes the JSON: EOS is written next, nothing after it is sampled."""
    fmt = AnswerTokens.of(sid_tok)
    m = AnswerMachine(fmt, budget=0, list_budget=200)  # no explanation: straight to the list
    written = []
    while m.queue:
        written.append(m.allowed()[0])
        m.push(written[-1])
    assert m.allowed() is None and fmt.end[-1] in m.free_run()[1]  # a server stops there
    listed = ids(sid_tok, SLATE[1]) + list(fmt.sep) + ids(sid_tok, SLATE[0]) + list(fmt.end)
    for t in listed:
        assert not m.done and m.allowed() is None
        m.push(t)
    assert m.allowed() == (fmt.eos,) and not m.done
    m.push(fmt.eos)
    assert m.done and m.listed == len(listed)
    answer, reason = parse_answer(sid_tok.decode(written + listed))
    assert reason == "ok" and answer.recommendations == [SLATE[1], SLATE[0]]
    # a list cut short by its budget is still closed for the model
    m = AnswerMachine(fmt, budget=0, list_budget=3)
    while m.queue:
        m.push(m.allowed()[0])
    for t in ids(sid_tok, SLATE[2])[:3]:
        m.push(t)
    assert list(m.queue) == [*fmt.end, fmt.eos]


def test_slate_list_is_a_permutation_with_forced_punctuation(sid_tok):
    fmt = AnswerTokens.of(sid_tok)
    slate = [ids(sid_tok, s) for s in SLATE]
    m = AnswerMachine(fmt, budget=0, slate=slate)  # no explanation: straight to the list
    tid = sid_tok.convert_tokens_to_ids
    written, choices = [], []
    while not m.done:
        allowed = m.allowed()
        if len(allowed) > 1:
            choices.append(set(allowed))
        t = max(allowed)  # any rule would do: the machine keeps the list valid
        written.append(t)
        m.push(t)
    # a choice between the first codes, then between the second codes under <s_a_1>
    assert choices[0] == {tid("<s_a_1>"), tid("<s_a_4>")}
    text = sid_tok.decode(written[:-1])
    verdict = check_answer(text, SLATE, frozenset(SLATE))
    assert verdict.accepted, (verdict.reason, text)
    assert written[-1] == fmt.eos and verdict.answer.explanation == ""


def test_constrained_citations_are_known_sids_and_the_json_string_stays_valid(sid_tok):
    fmt = AnswerTokens.of(sid_tok)
    slate = [ids(sid_tok, s) for s in SLATE]
    m = AnswerMachine(fmt, budget=4, slate=slate, cite=slate)
    for t in fmt.open:
        m.push(t)
    banned = set(m.banned())
    assert ids(sid_tok, '"')[0] in banned and ids(sid_tok, "\n")[0] in banned
    assert fmt.close[0] not in banned  # the model can still close the explanation
    begin = sid_tok.convert_tokens_to_ids("<|sid_begin|>")
    for t in ids(sid_tok, "a b c") + [begin]:  # the budget runs out inside a citation
        m.push(t)
    assert set(m.allowed()) == {sid_tok.convert_tokens_to_ids(x) for x in ("<s_a_1>", "<s_a_4>")}
    for t in ids(sid_tok, SLATE[2])[1:]:
        assert not m.queue  # not closed inside the SID
        m.push(t)
    assert m.forced_close and list(m.queue) == list(fmt.close)


def test_fit_explanation_cuts_at_a_sentence_end_within_the_budget(tokenizer):
    text = "The user likes war films. This one is a sequel! It fits the era."

    def size(t: str) -> int:
        return len(ids(tokenizer, t))

    assert fit_explanation(tokenizer, text, size(text)) == text
    cut = fit_explanation(tokenizer, text, size(text) - 1)
    assert cut == "The user likes war films. This one is a sequel!"
    assert fit_explanation(tokenizer, text, size("The user likes war films.")) == (
        "The user likes war films."
    )
    assert fit_explanation(tokenizer, text, 3) is None  # no sentence end early enough


def test_engine_answers_always_end_and_constrained_ones_are_valid(student):
    """A random tiny model: free answers still close the explanation within the budget and end;
    constrained answers are valid answers (a permutation of the slate, valid JSON)."""
    tok = AutoTokenizer.from_pretrained(student)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(student).eval()
    slate = [encode_sid([a, b]) for a, b in ((0, 1), (0, 2), (3, 1), (2, 2))]
    prompts = [[{"role": "user", "content": f"Rank {' '.join(slate)} ({k})"}] for k in range(3)]
    engine = HFEngine(model, tok, batch_size=2)
    budget = 6
    fmt = AnswerTokens.of(tok)
    for method in ("free", "constrained"):
        done = engine.answers(prompts, [slate] * 3, method, budget, histories=[[]] * 3)
        for c in done:
            assert c.token_ids[-1] == tok.eos_token_id
            head = c.token_ids[: len(fmt.open)]
            assert head == list(fmt.open) and all(c.forced[: len(fmt.open)])
            close = next(
                i for i in range(len(c.token_ids)) if c.token_ids[i : i + 2] == list(fmt.close[:2])
            )
            assert close - len(fmt.open) <= budget  # explanation tokens within the budget
            assert c.text.startswith(OPEN) and CLOSE in c.text
        if method == "constrained":
            for c in done:
                verdict = check_answer(c.text, slate, frozenset(slate))
                assert verdict.accepted, (verdict.reason, c.text)


def test_machines_reject_an_unknown_method(tokenizer):
    with pytest.raises(ValueError, match="unknown decoding method"):
        machines_for(tokenizer, [SLATE], "beam", 8)


def test_prompt_ids_end_with_the_generation_prompt(tokenizer):
    text = tokenizer.decode(prompt_ids(tokenizer, [{"role": "user", "content": "hi"}]))
    assert text.endswith("assistant\n")


def test_scoring_mode_matches_a_forward_pass_per_candidate(student):
    """The shared-prefix scoring (one forward over the heads, the cache repeated per candidate)
    gives each SID the log-probability a full forward of head + SID gives it."""
    tok = AutoTokenizer.from_pretrained(student)
    model = AutoModelForCausalLM.from_pretrained(student).eval()
    slates = [
        [encode_sid([a, b]) for a, b in ((0, 1), (0, 2), (3, 1))],
        [encode_sid([a, b]) for a, b in ((2, 2), (1, 0))],
    ]
    messages = [[{"role": "user", "content": "Rank these"}], [{"role": "user", "content": "x"}]]
    engine = HFEngine(model, tok, batch_size=2)
    engine.score_batch_size = 2  # both slates in one forward: left padding and the tree mask
    done = engine.scores(messages, slates)  # no explanation: the opened, empty answer
    for msgs, slate, c in zip(messages, slates, done, strict=True):
        head = scoring_head(tok, prompt_ids(tok, msgs))
        expected = []
        for sid in slate:
            ids = tok(sid, add_special_tokens=False)["input_ids"]
            with torch.no_grad(), autocast("cpu"):  # the engine's precision on this machine
                logits = model(torch.tensor([head + ids])).logits[0].float()
            logp = torch.log_softmax(logits, dim=-1)
            expected.append(sum(float(logp[len(head) - 1 + k, t]) for k, t in enumerate(ids)))
        assert c.scores == pytest.approx(expected, abs=1e-3)
        verdict = check_answer(c.text, slate, frozenset(slate))
        assert verdict.accepted
        ranked = [slate[k] for k in sorted(range(len(slate)), key=lambda k: -c.scores[k])]
        assert verdict.answer.recommendations == ranked  # the order of the returned scores
    explained = engine.scores(messages, slates, budget=4, histories=[[], []])
    for slate, c in zip(slates, explained, strict=True):
        assert check_answer(c.text, slate, frozenset(slate)).accepted


def test_answers_in_shards_of_whole_batches_are_the_one_engine_answers(student):
    """What a stage's evaluation computes in shards on the task runner (each shard a fresh
    transformers engine, as a Ray task builds it) is what one engine answers for the whole list:
    shards are whole batches, so every generate call holds the same rows."""
    from pathlib import Path

    from data_contracts.config import EngineConfig
    from gr2_core.generation import ShardedEngine, answer_shard, open_engine

    tok = AutoTokenizer.from_pretrained(student)
    slates = [[encode_sid([a, (b + k) % 4]) for a, b in ((0, 1), (0, 2), (3, 1))] for k in range(5)]
    prompts = [
        [{"role": "user", "content": f"Rank {' '.join(s)} ({k})"}] for k, s in enumerate(slates)
    ]
    histories = [[s[0]] for s in slates]
    local = EngineConfig(backend="transformers")
    sizes = []

    def map_shards(parts):
        sizes.append([len(p.messages) for p in parts])
        return [answer_shard(p) for p in parts]

    sharded = ShardedEngine(student, tok, 2, 1, 2, map_shards)
    with open_engine(student, tok, local, Path(), batch_size=2, num_threads=1) as whole:
        for method in ("free", "constrained", "scored", "scored_explained"):
            expected = whole.run(prompts, slates, method, 6, histories)
            got = sharded.run(prompts, slates, method, 6, histories)
            assert [c.text for c in got] == [c.text for c in expected], method
            assert [c.scores for c in got] == [c.scores for c in expected], method
    assert sizes == [[4, 1]] * 4  # two shards of whole batches of 2
    assert sharded.run([], [], "free", 6) == []
