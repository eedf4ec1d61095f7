"""DAPO on a tiny model: dynamic sampling replaces zero-variance groups; training resumes."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from data_contracts.config import RLConfig
from gr2_core.rl import (
    completion_logps,
    dapo_args,
    dapo_trainer_class,
    loss_mask_without,
    reward_functions,
    select_groups,
    task_signal,
    train_dapo,
)
from gr2_core.semantic_ids.sidmap import encode_sid
from gr2_core.training import StopAfter

SLATE = [encode_sid([i, 0]) for i in range(4)]
# rollouts are budget-forced: a 4-token explanation, then the list (SIDs written as plain text
# by this tokenizer, 25 tokens each); 136 tokens hold the longest answer the machine allows
BUDGET, LIMIT = 4, 136


class TextSpread:
    """Test reward: varies with the completion for prompts marked INFO, constant for the rest."""

    __name__ = "spread"

    def __call__(self, completions, prompts, **kwargs):
        out = []
        for c, p in zip(completions, prompts, strict=True):
            text = c[-1]["content"] if isinstance(c, list) else c
            informative = "INFO" in p[-1]["content"]
            out.append(float(sum(map(ord, text)) % 7) if informative else 0.0)
        return out


def _rows(n: int = 8) -> list[dict]:
    return [
        {
            "prompt": [
                {"role": "user", "content": f"{'INFO' if k % 2 else 'FLAT'} rank {' '.join(SLATE)}"}
            ],
            "slate": SLATE,
            "target": SLATE[k % 4],
            "prompt_index": k,
        }
        for k in range(n)
    ]


def _cfg(**kw) -> RLConfig:
    base = dict(
        group_size=4,
        prompts_per_step=2,
        max_steps=2,
        mini_batches=1,  # one optimizer step per rollout batch unless a test says otherwise
        max_completion_length=LIMIT,
        overlong_cache=0,
        lr=1e-4,
        save_steps=1,
        max_sampling_rounds=6,
        num_threads=1,
        slate_sids=False,  # the tiny tokenizer has no SID tokens (the flow test covers them)
    )
    return RLConfig(**(base | kw))


def _tok(tiny):
    tok = AutoTokenizer.from_pretrained(tiny)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _trainer(tiny, tmp_path, extra, **kw):
    """A DAPO trainer on the tiny model with the GR2 rewards plus the test reward `extra`."""
    from datasets import Dataset

    tok = _tok(tiny)
    funcs, weights = reward_functions(frozenset(SLATE), (tok.eos_token_id,), True, 0.2, LIMIT, 0)
    args = dapo_args(_cfg(), tmp_path / "ckpt")
    args.reward_weights = [*weights, 1.0]
    trainer = dapo_trainer_class()(
        model=AutoModelForCausalLM.from_pretrained(tiny),
        reward_funcs=[*funcs, extra],
        args=args,
        train_dataset=Dataset.from_list(_rows()),
        processing_class=tok,
        monitor_reward=funcs[0],
        budget=BUDGET,
        **kw,
    )
    trainer.model.train()
    return trainer, tok


def test_dynamic_sampling_replaces_zero_variance_groups(tiny, tmp_path):
    cfg = _cfg()
    trainer, tok = _trainer(tiny, tmp_path, TextSpread(), max_rounds=6, filter_on=("spread",))
    flat = [r for r in _rows() if "FLAT" in r["prompt"][0]["content"]][:2]
    batch = [r for r in flat for _ in range(cfg.group_size)]
    out = trainer._generate_and_score_completions(batch)
    # every prompt of the round was uninformative: all replaced by informative draws
    stats = trainer.dynamic_history[-1]
    assert stats["zero_std_before"] == 1.0
    assert stats["zero_std_after"] == 0.0 and stats["extra_rounds"] >= 1
    assert out["completion_ids"].shape[0] == len(batch) == out["advantages"].shape[0]
    groups = out["advantages"].view(-1, cfg.group_size)
    assert (groups.abs().sum(dim=1) > 0).all()
    prompts = tok.batch_decode(out["prompt_ids"], skip_special_tokens=True)
    assert all("INFO" in p for p in prompts)
    # the tokens the answer machine forced (the opening, at least) are out of the loss
    trained = out["completion_mask"] * out["tool_mask"]
    assert int(out["num_items_in_batch"]) == int(trained.sum()) < int(out["completion_mask"].sum())
    assert (out["tool_mask"][:, :5] == 0).all()  # `{"explanation": "` is written for the model
    # the monitors were logged from the rollouts
    metrics = trainer._metrics["train"]
    assert metrics["monitor/invalid_rate"] and metrics["dynamic/zero_std_before"] == [1.0]

    # with no extra rounds allowed, the shortfall is filled with (zero-advantage) groups and logged
    trainer.max_rounds = 0
    out = trainer._generate_and_score_completions(batch)
    assert trainer.dynamic_history[-1]["shortfall_groups"] == 2
    assert out["advantages"].abs().sum() == 0


class LengthShaping:
    """Test shaping reward named like the soft overlong punishment: varies with the length."""

    __name__ = "soft_overlong"

    def __call__(self, completions, **kwargs):
        return [-len(c[-1]["content"] if isinstance(c, list) else c) / 100 for c in completions]


def test_dynamic_sampling_reads_the_task_reward_not_the_length_penalty(tiny, tmp_path):
    """Groups of equally unrankable answers (R = -1 for all) are uninformative even though a
    length penalty varies inside them (DAPO filters on accuracy, not on shaping terms)."""
    cfg = _cfg()
    trainer, tok = _trainer(tiny, tmp_path, LengthShaping(), max_rounds=0)
    batch = [r for r in _rows()[:2] for _ in range(cfg.group_size)]
    out = trainer._generate_and_score_completions(batch)
    rerank = trainer._metrics["train"]["rewards/rerank/mean"]
    assert rerank == [-1.0]  # the tiny model writes no rankable answer
    assert trainer._metrics["train"]["rewards/soft_overlong/std"][0] > 0  # the penalty varies
    assert trainer.dynamic_history[-1]["zero_std_before"] == 1.0
    assert out["advantages"].shape[0] == len(batch)
    with pytest.raises(ValueError, match="filter_on"):
        _trainer(tiny, tmp_path, LengthShaping(), filter_on=("accuracy",))


def test_task_signal_leaves_shaping_rewards_out():
    per_func = torch.tensor([[0.5, -0.25, 0.3, 1.0], [0.5, 0.0, float("nan"), 1.0]])
    weights = torch.tensor([1.0, 1.0, 0.0, 0.0])
    names = ["rerank", "soft_overlong", "rank", "format"]
    assert task_signal(per_func, weights, names, ("rerank",)).tolist() == [0.5, 0.5]
    assert task_signal(per_func, weights, names, ("rerank", "soft_overlong")).tolist() == [
        0.25,
        0.5,
    ]


def test_dapo_args_pin_the_method():
    """The DAPO settings the SPEC names, as TRL receives them."""
    cfg = RLConfig(group_size=8, prompts_per_step=2, mini_batches=2, micro_batch_size=4)
    args = dapo_args(cfg, "/tmp/unused")
    assert args.loss_type == "dapo"
    assert (args.epsilon, args.epsilon_high) == (0.2, 0.28)
    assert args.beta == 0.0
    assert args.mask_truncated_completions is True
    assert args.num_generations == 8 and args.temperature == 1.0 and args.top_p == 1.0
    # 16 completions per rollout batch, 2 optimizer steps of 8, each 2 micro-batches of 4
    assert args.per_device_train_batch_size == 4
    assert args.gradient_accumulation_steps == 2
    assert args.steps_per_generation == 4
    assert args.num_iterations == 1
    assert args.gradient_accumulation_steps % (args.steps_per_generation * args.num_iterations)
    on_policy = dapo_args(cfg.model_copy(update={"mini_batches": 1}), "/tmp/unused")
    assert on_policy.gradient_accumulation_steps == on_policy.steps_per_generation == 4
    with pytest.raises(ValueError, match="save_steps"):
        RLConfig(mini_batches=2, save_steps=3)
    with pytest.raises(ValueError, match="mini_batches"):
        RLConfig(group_size=8, prompts_per_step=1, mini_batches=3)


def test_clip_higher_binds_with_several_optimizer_steps_per_rollout_batch(tiny, tmp_path):
    """One rollout batch, two optimizer steps: the second trains a policy that has moved, so
    the importance ratio leaves 1 and the clip acts (TRL's clip ratios > 0). With one
    optimizer step per batch the ratio is exactly 1 and the clip ratios are 0."""
    tok = _tok(tiny)
    clipped = {}
    for mini_batches in (1, 2):
        cfg = _cfg(
            max_steps=2,
            mini_batches=mini_batches,
            save_steps=2,
            lr=0.05,
            max_sampling_rounds=0,
            mask_truncated=False,  # the tiny model never ends an answer: keep its tokens
        )
        _, history = train_dapo(
            tiny,
            [r for r in _rows() if "INFO" in r["prompt"][0]["content"]],  # rewards vary
            tmp_path / f"mb{mini_batches}",
            cfg,
            tok,
            frozenset(SLATE),
            extra_rewards=(TextSpread(),),
            budget=BUDGET,
        )
        rows = [r for r in history if "clip_ratio/region_mean" in r]
        assert len(rows) == 2
        clipped[mini_batches] = [r["clip_ratio/region_mean"] for r in rows]
        generations = [r for r in history if "monitor/identity_rate" in r]
        assert len(generations) == 2 // mini_batches  # one rollout batch per mini_batches steps
    assert clipped[1] == [0.0, 0.0]
    assert clipped[2][0] == 0.0 and clipped[2][1] > 0.0


def test_forced_tokens_are_masked_out_of_the_loss_only():
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    tool = torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1]])
    keep = loss_mask_without(mask, tool, [{2}, {1, 3, 9}])
    assert keep.tolist() == [[1, 0, 0, 1], [1, 0, 1, 0]]
    assert tool.tolist() == [[1, 0, 1, 1], [1, 1, 1, 1]]  # not modified in place
    assert int((mask * keep).sum()) == 3


def test_select_groups_pads_prompts_left_and_completions_right():
    a = {
        "prompt_ids": torch.tensor([[1, 2], [3, 4]]),
        "prompt_mask": torch.ones(2, 2, dtype=torch.long),
        "completion_ids": torch.tensor([[5], [6]]),
        "completion_mask": torch.ones(2, 1, dtype=torch.long),
        "advantages": torch.tensor([1.0, -1.0]),
        "num_items_in_batch": torch.tensor(2),
    }
    b = {
        "prompt_ids": torch.tensor([[7, 8, 9], [7, 8, 9]]),
        "prompt_mask": torch.ones(2, 3, dtype=torch.long),
        "completion_ids": torch.tensor([[1, 2, 3], [4, 5, 0]]),
        "completion_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]),
        "advantages": torch.tensor([0.5, -0.5]),
        "num_items_in_batch": torch.tensor(5),
    }
    m = select_groups([a, b], [(1, 0), (0, 0)], group=2, pad_id=0)
    assert m["prompt_ids"].tolist() == [[7, 8, 9], [7, 8, 9], [0, 1, 2], [0, 3, 4]]
    assert m["prompt_mask"].tolist() == [[1, 1, 1], [1, 1, 1], [0, 1, 1], [0, 1, 1]]
    assert m["completion_ids"].tolist() == [[1, 2, 3], [4, 5, 0], [5, 0, 0], [6, 0, 0]]
    assert m["completion_mask"].tolist() == [[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 0, 0]]
    assert m["advantages"].tolist() == [0.5, -0.5, 1.0, -1.0]
    assert int(m["num_items_in_batch"]) == 7
    with pytest.raises(TypeError, match="pixel_values"):
        select_groups([a | {"pixel_values": [1]}], [(0, 0)], 2, 0)


def test_dapo_runs_a_few_steps_and_resumes_after_a_crash(tiny, tmp_path):
    cfg = _cfg(max_steps=3, save_steps=2, micro_batch_size=4)  # 2 micro-batches per step
    tok = _tok(tiny)
    known = frozenset(SLATE)
    with pytest.raises(KeyboardInterrupt):
        train_dapo(
            tiny,
            _rows(),
            tmp_path,
            cfg,
            tok,
            known,
            callbacks=(StopAfter(3),),
            extra_rewards=(TextSpread(),),
            budget=BUDGET,
        )
    assert [p.name for p in (tmp_path / "checkpoints").glob("checkpoint-*")] == ["checkpoint-2"]
    log = [json.loads(x) for x in (tmp_path / "completions.jsonl").read_text().splitlines()]
    assert {r["step"] for r in log} == {0, 1, 2}
    _, history = train_dapo(
        tiny, _rows(), tmp_path, cfg, tok, known, extra_rewards=(TextSpread(),), budget=BUDGET
    )
    assert max(r["step"] for r in history) == 3
    log = [json.loads(x) for x in (tmp_path / "completions.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in log]
    assert sorted(set(steps)) == [0, 1, 2] and steps == sorted(steps)  # step 2 redone once
    logged = [r for r in history if "monitor/identity_rate" in r]
    assert logged and all(
        "rewards/rerank/mean" in r and "dynamic/zero_std_after" in r for r in logged
    )
    assert all(r["reason"] for r in log) and all(r["reward"] == r["reward"] for r in log)


def test_rl_training_table_and_curves_report_the_steps(tmp_path):
    from gr2_core.plots import RL_PANELS, rl_curves
    from gr2_core.report import rl_training_table

    history = [
        {"step": k, "monitor/identity_rate": k / 10, "rewards/rerank/mean": -1 + k / 10}
        | {"dynamic/zero_std_before": 0.5, "dynamic/extra_rounds": k % 2}
        | {"monitor/invalid_rate": 0.5, "monitor/improved_rate": 0.125}
        | {"monitor/worsened_rate": 0.25 if k < 4 else 0.0}
        for k in range(1, 7)
    ] + [{"train_runtime": 12.0}]
    row = rl_training_table({"rl-rejection": history}, window=3).row(0, named=True)
    assert row["steps"] == 6
    assert row["identity rate"] == "0.2 -> 0.5"  # mean of steps 1-3, then of steps 4-6
    assert row["reward"] == "-0.8 -> -0.5"
    assert row["target kept"] == "0.125 -> 0.375"  # 1 - invalid - improved - worsened
    assert row["completion tokens"] == "-"  # not logged: shown as missing, not as 0
    assert (row["zero-variance groups"], row["extra rounds / step"]) == ("0.5", "0.5")
    fig = rl_curves({"rl-rejection": history}, tmp_path / "curves.png")
    kept = fig.axes[[k for k, _ in RL_PANELS].index("monitor/kept_rate")].lines[0]
    assert list(kept.get_ydata()) == [0.125] * 3 + [0.375] * 3
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_cpu_completion_logps_match_trls_fused_head(tiny):
    """The CPU path projects only the completion's positions through the LM head: same
    log-probabilities, entropies and gradients as TRL's fused head, which projects them all."""
    from trl.trainer.utils import add_fused_lm_head

    ours = AutoModelForCausalLM.from_pretrained(tiny)
    theirs = AutoModelForCausalLM.from_pretrained(tiny)
    add_fused_lm_head(theirs, temperature=0.7, outputs=("log_probs", "entropy"))
    torch.manual_seed(0)
    ids = torch.randint(0, 1000, (3, 12))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # a left-padded prompt
    keep = 5
    logps, ent = completion_logps(ours, ids, mask, keep, 0.7, batch_size=2, entropy=True)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :-keep] = -100  # what TRL passes: the completion tokens only
    out = theirs(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    torch.testing.assert_close(logps, out.log_probs[:, -keep:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, out.entropy[:, -keep:], atol=1e-5, rtol=1e-5)
    logps.sum().backward()
    out.log_probs[:, -keep:].sum().backward()
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_vllm_rollouts_are_refused_when_processes_hold_weight_shards():
    """The main process syncs the whole policy to the vLLM server: with FSDP or ZeRO-3 it only
    holds a shard, so those launches are refused; DDP and ZeRO-2 hold whole weights."""
    from types import SimpleNamespace as NS

    from gr2_core.rl import sharded_weights

    def trainer(fsdp: bool, stage: int | None):
        plugin = None if stage is None else NS(zero_stage=stage)
        return NS(is_fsdp_enabled=fsdp, accelerator=NS(state=NS(deepspeed_plugin=plugin)))

    assert sharded_weights(trainer(True, None)) and sharded_weights(trainer(False, 3))
    assert not sharded_weights(trainer(False, None)) and not sharded_weights(trainer(False, 2))
