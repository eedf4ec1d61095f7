"""Data-parallel training in two torchrun processes on this CPU (gloo): the same optimizer steps as
one process at the same global batch, and resume after a crash with two processes."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from data_contracts.config import SFTConfig
from gr2_core.sft import train_sft
from gr2_core.training import StopAfter, train
from tests.test_midtrain import _first_new, _settings, _table
from tests.test_midtrain import student as student  # noqa: F401 (the module fixture)
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
