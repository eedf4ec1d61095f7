"""Data-parallel training in two torchrun processes on this CPU (gloo): mid-training, SFT and DAPO
make the same optimizer steps as one process at the same global batch, and mid-training and DAPO
resume after a crash with two processes."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from data_contracts.config import SFTConfig
from gr2_core.rl import train_dapo
from gr2_core.sft import train_sft
from gr2_core.training import StopAfter, train
from tests.test_engine_vllm import dapo_inputs
from tests.test_engine_vllm import served as served  # noqa: F401 (the module's vLLM server)
from tests.test_midtrain import _first_new, _settings, _table
from tests.test_midtrain import student as student  # noqa: F401 (the module fixture)
from tests.test_rl import BUDGET, SLATE, TextSpread
from tests.test_rl import _cfg as _rl_cfg
from tests.test_rl import _rows as _rl_rows
from tests.test_rl import _tok as _rl_tok
from tests.test_sft import _rows

# float32 sums in another order (gloo's all-reduce of two halves vs one batch): losses agree to
# this relative tolerance, weights to this absolute one, over 6 steps at lr 1e-2
LOSS_RTOL, WEIGHT_ATOL = 1e-4, 1e-4


def _losses(log: list[dict]) -> list[float]:
    return [r["loss"] for r in log if "loss" in r]


def _same_weights(a, b) -> None:
    sb = b.state_dict()
    for name, value in a.state_dict().items():
        assert torch.allclose(value, sb[name], atol=WEIGHT_ATOL), name


def test_midtraining_in_two_processes_matches_one_and_resumes(student, tmp_path):  # noqa: F811
    tok = AutoTokenizer.from_pretrained(student)
    table, first, pad = _table(tok), _first_new(tok), tok.pad_token_id
    one = _settings(batch_size=4)  # global batch 4 = 1 process x 4 = 2 processes x 2
    two = _settings(batch_size=2, processes=2)
    ref, ref_log = train(student, table, {}, tmp_path / "one", one, first, pad)
    got, log = train(student, table, {}, tmp_path / "two", two, first, pad)
    assert len(_losses(log)) == 6
    assert _losses(log) == pytest.approx(_losses(ref_log), rel=LOSS_RTOL)
    _same_weights(ref, got)

    # a crash in both processes after step 4 (step 3 was checkpointed), then the same call again
    with pytest.raises(RuntimeError, match="2 processes .* exited with code"):
        train(student, table, {}, tmp_path / "crash", two, first, pad, [StopAfter(4)])
    ckpts = sorted(p.name for p in (tmp_path / "crash" / "checkpoints").glob("checkpoint-*"))
    assert ckpts == ["checkpoint-3"]
    resumed, log = train(student, table, {}, tmp_path / "crash", two, first, pad)
    assert _losses(log) == pytest.approx(_losses(ref_log), rel=LOSS_RTOL)
    _same_weights(ref, resumed)


def test_sft_in_two_processes_matches_one(tiny, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    rows = _rows(tok, 8)
    common = dict(max_steps=4, save_steps=2, logging_steps=1, lr=1e-3, num_threads=1)
    ref, ref_log = train_sft(tiny, rows, tmp_path / "one", SFTConfig(batch_size=4, **common), tok)
    cfg = SFTConfig(batch_size=2, processes=2, **common)
    got, log = train_sft(tiny, rows, tmp_path / "two", cfg, tok)
    assert len(_losses(log)) == 4
    assert _losses(log) == pytest.approx(_losses(ref_log), rel=LOSS_RTOL)
    _same_weights(ref, got)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("ddp", {"ACCELERATE_MIXED_PRECISION": "bf16"}),
        ("fsdp", {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}),
        ("zero2", {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}),
        ("zero3", {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}),
    ],
)
def test_multi_gpu_launch_configs_parse_and_dry_run(name, expected):
    """Each infra/launch configuration through accelerate's own launcher up to the environment
    its processes would get (no GPU here to start them): the stage's process count replaces the
    file's, and this module is what each process runs."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    from gr2_core import distributed

    args = ["gr2_core.training:train", "args.pkl", "result"]
    cmd = distributed.command(args, 4, f"infra/launch/{name}.yaml")
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"]
    parsed, defaults, _ = _validate_launch_command(launch_command_parser().parse_args(cmd[3:]))
    assert parsed.num_processes == 4 and defaults.num_processes == 8  # the file's is replaced
    assert parsed.module and parsed.training_script == "gr2_core.distributed"
    assert parsed.training_script_args == args
    assert (parsed.multi_gpu, parsed.use_fsdp, parsed.use_deepspeed) == (
        name == "ddp",
        name == "fsdp",
        name.startswith("zero"),
    )
    if parsed.use_deepspeed:
        parsed.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        env = prepare_deepspeed_cmd_env(parsed)[1]
    else:
        env = prepare_multi_gpu_env(parsed)
    assert expected.items() <= env.items()
    assert distributed.command(args, 2)[2:6] == [
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
    ]
    with pytest.raises(FileNotFoundError, match="launch_config infra/launch/nope.yaml"):
        distributed.command(args, 2, "infra/launch/nope.yaml")


def test_dapo_with_dynamic_sampling_in_two_processes_matches_one_and_resumes(tiny, tmp_path):
    """DAPO in 2 processes of one group each against 1 process of two groups: every group is
    sampled with its own seed and dynamic sampling decides on the gathered rewards of the global
    batch, so the rollouts (read from the rollout log the main process writes), the generation
    rounds, the losses and the trained weights are one process's. The two processes are killed
    after step 2 (step 1 was checkpointed) and the same call resumes them: the rollout log is
    trimmed to the checkpoint and the run ends as the uninterrupted one."""
    tok = _rl_tok(tiny)
    known = frozenset(SLATE)
    common = dict(max_steps=3, save_steps=1, max_sampling_rounds=2, lr=1e-2)
    one = _rl_cfg(prompts_per_step=2, **common)
    two = _rl_cfg(prompts_per_step=1, processes=2, **common)

    def dapo(name, cfg, callbacks=()):
        model, log = train_dapo(
            tiny,
            _rl_rows(),
            tmp_path / name,
            cfg,
            tok,
            known,
            callbacks=callbacks,
            extra_rewards=(TextSpread(),),
            budget=BUDGET,
        )
        rollouts = (tmp_path / name / "completions.jsonl").read_text().splitlines()
        return model, log, [json.loads(r) for r in rollouts]

    runs = {"one": dapo("one", one)}
    with pytest.raises(RuntimeError, match="2 processes .* exited with code"):
        dapo("two", two, (StopAfter(2),))
    ckpts = sorted(p.name for p in (tmp_path / "two" / "checkpoints").glob("checkpoint-*"))
    assert ckpts == ["checkpoint-1"]
    runs["two"] = dapo("two", two)
    (ref, ref_log, ref_rollouts), (got, log, rollouts) = runs["one"], runs["two"]
    assert len(_losses(log)) == 3
    # on-policy, the policy loss is a sum of advantages (zero per group) up to float noise: the
    # gradient's norm is what shows the same update
    assert _losses(log) == pytest.approx(_losses(ref_log), abs=1e-6)
    norms = [r["grad_norm"] for r in log if "grad_norm" in r]
    assert norms == pytest.approx([r["grad_norm"] for r in ref_log if "grad_norm" in r], rel=1e-4)
    assert rollouts == ref_rollouts
    # the FLAT prompts' groups have zero reward variance: dynamic sampling drew more groups
    dynamic = ["dynamic/extra_rounds", "dynamic/zero_std_before", "dynamic/zero_std_after"]
    rounds = [[r[k] for k in dynamic] for r in log if "dynamic/extra_rounds" in r]
    assert rounds == [[r[k] for k in dynamic] for r in ref_log if "dynamic/extra_rounds" in r]
    assert len(rounds) == 3 and any(r[0] > 0 for r in rounds)
    for key in ("reward", "monitor/identity_rate", "monitor/invalid_rate"):
        mine = [r[key] for r in log if key in r]
        assert mine == pytest.approx([r[key] for r in ref_log if key in r], rel=LOSS_RTOL), key
    _same_weights(ref, got)


def test_dapo_in_two_processes_shares_one_vllm_server(served, tmp_path):  # noqa: F811
    """DAPO in 2 processes with rollouts from one vLLM server: the main process syncs the policy
    to the server before each rollout batch (the other waits), both processes' rollouts are
    valid constrained answers from it, and the main process logs all of them."""
    folder, engine = served
    cfg, rows, known = dapo_inputs(num_threads=1, processes=2)  # a group per process
    _, history = train_dapo(folder, rows, tmp_path, cfg, engine.tok, known, budget=8, engine=engine)
    assert max(r["step"] for r in history) == 4
    assert len([r for r in history if "timing/weight_sync_s" in r]) == 2  # at steps 0 and 2
    rollouts = [json.loads(x) for x in (tmp_path / "completions.jsonl").read_text().splitlines()]
    assert len(rollouts) == 16 and {r["step"] for r in rollouts} == {0, 2}  # 2 x 2 groups of 4
    assert all(r["reason"] == "ok" for r in rollouts), rollouts
