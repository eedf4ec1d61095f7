"""The generation engine against a real vLLM server: the answer machine drives the server as it
drives transformers' `generate`, and scoring mode gives the transformers model's numbers.

One server per module (the `make teacher-env` virtualenv), serving SmolLM2-135M-Instruct with
SID tokens added, in float32 so its numbers can be compared with the transformers model's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gr2_core.decoding import CLOSE, OPEN, AnswerTokens
from gr2_core.generation import HFEngine, VLLMEngine, prompt_ids, scoring_head, sid_ids
from gr2_core.models import export_student
from gr2_core.prompts import check_answer
from gr2_core.semantic_ids.sidmap import encode_sid
from gr2_core.serving import ManagedServer, free_port, vllm_command, vllm_env

ROOT = Path(__file__).resolve().parent.parent
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
SLATES = [
    [encode_sid([a, b]) for a, b in ((0, 1), (0, 2), (3, 1), (5, 5))],
    [encode_sid([a, b]) for a, b in ((7, 0), (1, 1), (2, 6))],
]
MESSAGES = [
    [
        {"role": "system", "content": "Rerank the candidate movies."},
        {
            "role": "user",
            "content": f"History: {SLATES[0][0]} Toy Story '95 | Animation\n"
            f"Candidates: {' '.join(slate)}\nAnswer in JSON.",
        },
    ]
    for slate in SLATES
]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    if not VLLM_PYTHON.exists():
        pytest.fail(f"{VLLM_PYTHON} missing: run `make teacher-env` (make test does)")
    tmp = tmp_path_factory.mktemp("engine")
    model = export_student(tmp / "student", levels=2, sizes=[8, 8])
    port = free_port()
    cmd = vllm_command(str(VLLM_PYTHON), str(model), "student", port, dtype="float32")
    with ManagedServer(cmd, port, tmp / "server.log", vllm_env(2, dev_mode=True)):
        tok = AutoTokenizer.from_pretrained(model)
        yield model, VLLMEngine(f"http://127.0.0.1:{port}", "student", tok, concurrency=8)


def test_answers_close_within_the_budget_and_constrained_ones_are_valid(served):
    _, engine = served
    fmt = AnswerTokens.of(engine.tok)
    budget = 12
    for method in ("free", "constrained"):
        done = engine.answers(MESSAGES, SLATES, method, budget, histories=[[], []])
        for slate, c in zip(SLATES, done, strict=True):
            assert c.token_ids[-1] == engine.tok.eos_token_id, c.text
            assert c.token_ids[: len(fmt.open)] == list(fmt.open) and all(c.forced[:5])
            assert c.text.startswith(OPEN) and CLOSE in c.text
            body = c.text[len(OPEN) : c.text.index(CLOSE)]
            assert len(engine.tok(body, add_special_tokens=False)["input_ids"]) <= budget + 1
            if method == "constrained":
                verdict = check_answer(c.text, slate, frozenset(slate))
                assert verdict.accepted, (verdict.reason, c.text)


def test_sampled_rollouts_differ_by_seed_and_stay_within_the_machine(served):
    _, engine = served
    from gr2_core.generation import machines_for, prompt_ids

    prompt = prompt_ids(engine.tok, MESSAGES[0])
    machines = machines_for(engine.tok, [SLATES[0]] * 4, "constrained", 8, [[]] * 4)
    done = engine.complete([prompt] * 4, machines, temperature=1.0)
    assert len({c.text for c in done}) > 1  # a group of rollouts, not one answer four times
    for c in done:
        assert check_answer(c.text, SLATES[0], frozenset(SLATES[0])).accepted


@pytest.fixture
def fp32_reference(monkeypatch):
    """The transformers reference in float32, as the server runs (`dtype="float32"` above): on a
    CPU with native bf16 the engine would autocast to bf16, whose rounding moves a 4-token SID
    score by up to about 0.2, more than the like-for-like tolerance."""
    monkeypatch.setattr("gr2_core.training.cpu_bf16", lambda: False)


def test_scores_are_the_transformers_models(served, fp32_reference):
    folder, engine = served
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    reference = HFEngine(model, tok, batch_size=2)
    assert reference.precision == "fp32"
    local = reference.scores(MESSAGES, SLATES)
    remote = engine.scores(MESSAGES, SLATES)
    for slate, a, b in zip(SLATES, local, remote, strict=True):
        assert b.scores == pytest.approx(a.scores, abs=0.05)
        assert check_answer(b.text, slate, frozenset(slate)).accepted
        order = sorted(range(len(slate)), key=lambda k: -a.scores[k])
        gaps = [a.scores[i] - a.scores[j] for i, j in zip(order, order[1:], strict=False)]
        if min(gaps) > 0.1:  # no near-tie: the same order
            assert b.text == a.text


def test_weight_sync_makes_the_server_serve_the_policy(served, fp32_reference, tmp_path):
    """After `load_weights`, the server's scores are the changed model's, not the old ones."""
    folder, engine = served
    tok = AutoTokenizer.from_pretrained(folder)
    policy = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    before = engine.scores(MESSAGES[:1], SLATES[:1])[0].scores
    torch.manual_seed(0)
    with torch.no_grad():  # a policy update that moves the SID scores
        for name, p in policy.named_parameters():
            if "layers.29." in name or "norm" in name:
                p.add_(torch.randn_like(p) * 0.05)
    expected = HFEngine(policy, tok).scores(MESSAGES[:1], SLATES[:1])[0].scores
    assert expected != pytest.approx(before, abs=0.05)  # the update is visible
    seconds = engine.load_weights(policy, tmp_path / "policy")
    after = engine.scores(MESSAGES[:1], SLATES[:1])[0].scores
    assert after == pytest.approx(expected, abs=0.05)
    assert seconds < 60


def test_scoring_ranks_first_the_candidate_the_policy_was_trained_to_prefer(served, tmp_path):
    """The policy fine-tuned to open its list with the candidate the server scores lowest, then
    synced: scoring mode on the server ranks that candidate first, in a valid answer."""
    folder, engine = served
    tok, slate = engine.tok, SLATES[0]
    before = engine.scores(MESSAGES[:1], [slate])[0].scores
    target = min(range(len(slate)), key=lambda k: before[k])
    head = scoring_head(tok, prompt_ids(tok, MESSAGES[0]))
    ids = torch.tensor([head + sid_ids(tok, [slate[target]])[0]])
    labels = ids.clone()
    labels[0, : len(head)] = -100  # the loss on the target's SID tokens only
    policy = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).train()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-4)
    for _ in range(10):
        policy(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    engine.load_weights(policy.eval(), tmp_path / "policy")
    after = engine.scores(MESSAGES[:1], [slate])[0]
    assert max(range(len(slate)), key=lambda k: after.scores[k]) == target, after.scores
    assert check_answer(after.text, slate, frozenset(slate)).accepted
    assert json.loads(after.text)["recommendations"][0] == slate[target]


class CountingEngine(VLLMEngine):
    """The real engine, counting the weight syncs the trainer asks for."""

    syncs: list[int]

    def load_weights(self, model, folder):
        self.syncs.append(int(sum(p.double().sum() for p in model.parameters()) * 1e3))
        return super().load_weights(model, folder)


def dapo_inputs(**settings):
    """DAPO on the two slates: 4 optimizer steps in 2 rollout batches of one group (a process),
    short budget-forced completions; (RLConfig, rows, known SIDs)."""
    from data_contracts.config import RLConfig

    base = dict(group_size=4, prompts_per_step=1, mini_batches=2, micro_batch_size=2)
    base |= dict(max_steps=4, save_steps=2, lr=1e-3, temperature=1.0, max_completion_length=64)
    base |= dict(overlong_cache=0, max_sampling_rounds=0, num_threads=2)
    rows = [
        {"prompt": m, "slate": s, "target": s[1], "prompt_index": k}
        for k, (m, s) in enumerate(zip(MESSAGES, SLATES, strict=True))
    ]
    return RLConfig(**(base | settings)), rows, frozenset(sid for s in SLATES for sid in s)


def test_dapo_rollouts_come_from_the_server_synced_to_the_policy(served, tmp_path):
    """DAPO with the engine: 4 optimizer steps in 2 rollout batches of one group, so the server
    reloads the policy before each batch (the first included: it may serve other weights), the
    second time with weights the optimizer moved; every rollout is a valid constrained answer
    within the machine, and the forced tokens are out of the loss."""
    from gr2_core.rl import train_dapo

    folder, base = served
    engine = CountingEngine(base.base_url, base.model, base.tok, concurrency=8)
    engine.syncs = []
    cfg, rows, known = dapo_inputs()
    _, history = train_dapo(folder, rows, tmp_path, cfg, engine.tok, known, budget=8, engine=engine)
    assert max(r["step"] for r in history) == 4
    assert len(engine.syncs) == 2 and engine.syncs[0] != engine.syncs[1]  # the policy moved
    assert len([r for r in history if "timing/weight_sync_s" in r]) == 2  # at steps 0 and 2
    logged = [r for r in history if "timing/generate_s" in r]
    assert logged and all(r["monitor/forced_token_share"] > 0 for r in logged)
    rollouts = [json.loads(x) for x in (tmp_path / "completions.jsonl").read_text().splitlines()]
    assert len(rollouts) == 8 and {r["step"] for r in rollouts} == {0, 2}
    assert all(r["reason"] == "ok" for r in rollouts), rollouts
