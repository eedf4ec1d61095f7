"""Training in several processes through torchrun, started from inside a stage.

A stage runs in one process (a Prefect task). When its config asks for `processes > 1`, the
training call (`training.train`, `sft.train_sft`, `rl.train_dapo`, each marked `relaunched`)
re-launches itself with `launch`: torchrun
starts that many copies of this module on this machine, each runs the same function with the
same arguments (the Trainer then trains data-parallel: gloo on CPU, NCCL on GPUs; or FSDP /
DeepSpeed through an accelerate launch configuration), the trained model and the log history are
saved through the Trainer (`finish`), and the stage's process loads them back and goes on as
after a one-process run. Checkpoints are the Trainer's own, so a crashed run resumes with the
same number of processes. Across machines, the same entry point runs under `torchrun --nnodes`
(docs/scaling.md).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path

LOG = logging.getLogger(__name__)
RESULT = "distributed_result"  # the trained model and history, under the checkpoints folder
RESULT_ENV = "GR2_DISTRIBUTED_RESULT"  # where a launched run's processes write them


def world_size() -> int:
    """Processes of the running torchrun job (1 outside one)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def in_worker() -> bool:
    """Whether this process is one of a torchrun job's (then training runs here, not relaunched)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or world_size() > 1


def check_world(actual: int, expected: int) -> None:
    """Fail if the Trainer sees another world size than asked for (a launcher that silently
    starts one process, e.g. `accelerate launch --cpu --num_processes 2`)."""
    if actual != expected:
        raise RuntimeError(
            f"training asked for {expected} processes but runs in a world of {actual}; launch "
            "it with torchrun (the `processes` setting does)"
        )


def command(args: list[str], processes: int, launch_config: str | Path | None = None) -> list[str]:
    """The command that runs this module with `args` in `processes` processes: torchrun (DDP),
    or `accelerate launch` with a launch configuration (infra/launch/: DDP, FSDP, DeepSpeed
    ZeRO-2/3), its process count replaced by `processes`."""
    if launch_config is None:
        launcher = ["torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
        return [sys.executable, "-m", *launcher, "-m", __name__, *args]
    config = Path(launch_config)
    if not config.is_absolute():
        config = Path(__file__).resolve().parent.parent / config  # relative: from the project
    if not config.exists():
        raise FileNotFoundError(f"launch_config {launch_config}: no such file ({config})")
    launcher = ["accelerate.commands.launch", "--config_file", str(config)]
    launcher += ["--num_processes", str(processes), "--main_process_port", "0"]
    return [sys.executable, "-m", *launcher, "--module", __name__, *args]


def launch(
    target: str,
    kwargs: dict,
    processes: int,
    out_dir: Path,
    launch_config: str | Path | None = None,
):
    """Run `target` ("module:function", returning (model, log history)) in `processes`
    processes on this machine (`command`); returns rank 0's (model, log history), loaded in
    this process."""
    from transformers import AutoModelForCausalLM

    ckpt = Path(out_dir) / "checkpoints"  # the stage's scratch: deleted when it publishes
    ckpt.mkdir(parents=True, exist_ok=True)
    result = ckpt / RESULT
    payload = ckpt / "distributed_args.pkl"
    payload.write_bytes(pickle.dumps(kwargs))
    cmd = command([target, str(payload), str(result)], processes, launch_config)
    LOG.info("training in %d processes: %s", processes, " ".join(cmd[1:]))
    done = subprocess.run(cmd, env=os.environ | {RESULT_ENV: str(result)}, check=False)
    if done.returncode != 0:
        raise RuntimeError(
            f"{target} in {processes} processes ({cmd[2]}) exited with code {done.returncode}; "
            f"its output is above; checkpoints so far are kept in {ckpt}, "
            "rerun to resume"
        )
    history = json.loads((result / "log_history.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(result / "model")
    return model, history


def relaunched(settings: str):
    """Mark a training call: when its argument `settings` (a config with `processes` and
    `launch_config`) asks for more than one process and this process is not one of a launch's,
    the call runs in that many processes instead (`launch`, its arguments pickled, its
    `out_dir` holding the checkpoints) and returns their (model, log history). The call itself
    returns (model, log history) and ends with `finish(trainer)`."""

    def wrap(fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def call(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            cfg = bound.arguments[settings]
            if cfg.processes > 1 and not in_worker():
                target = f"{fn.__module__}:{fn.__name__}"
                out_dir = Path(bound.arguments["out_dir"])
                return launch(target, bound.arguments, cfg.processes, out_dir, cfg.launch_config)
            return fn(*args, **kwargs)

        return call

    return wrap


def finish(trainer) -> None:
    """In a launched process, after training: the model into the launch's result folder through
    the Trainer (every process takes part, so FSDP and ZeRO-3 gather their shards; the main
    process writes), and the log history. Outside a launch: nothing."""
    result = os.environ.get(RESULT_ENV)
    if not result or not in_worker():
        return
    trainer.save_model(str(Path(result) / "model"))
    if trainer.is_world_process_zero():
        (Path(result) / "log_history.json").write_text(json.dumps(trainer.state.log_history))


def main(argv: list[str]) -> None:
    """One launched process: the target with the pickled arguments (it calls `finish`), then the
    process group torn down before the interpreter exits (left to exit, gloo's threads were
    destroyed while running and the process aborted after its work was done: "terminate called
    without an active exception", seen once in the scale suite)."""
    target, payload, _result = argv
    module, name = target.split(":")
    fn = getattr(importlib.import_module(module), name)
    fn(**pickle.loads(Path(payload).read_bytes()))
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main(sys.argv[1:])
