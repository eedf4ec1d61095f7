"""Cost of DAPO steps on this machine: the demo's SFT-rejection student, the demo's RL settings.

Runs `--batches` rollout batches of DAPO (conditional reward, dynamic sampling on; each batch
drives `rl.mini_batches` optimizer steps) from the newest completed `sft_rejection` stage under
`var/artifacts` (run `make run` first), on the demo's training slates, and reports per rollout
batch: wall time (generation and its optimizer steps), rollouts generated (dynamic sampling's
extra rounds included), reward, invalid and identity rates, and the share of zero-variance
groups. The checkpoints go to a scratch folder under var/; the results to a docs/benchmarks.md
section with this command. `--engine vllm` takes the rollouts from a vLLM server synced to the
policy before each rollout batch (`gr2_core.rl`), and splits each batch's time into generation,
weight sync and the rest (log-probabilities, backward, optimizer); `--groups` overrides the
demo's groups per rollout batch (the issue's yardstick is 1 x 8).

  python benchmarks/rl_step.py --batches 2 --max-rounds 0 --doc docs/benchmarks.md
  python benchmarks/rl_step.py --engine vllm --groups 1 --batches 3 --max-rounds 0 \
      --doc docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import polars as pl

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from teacher import demo_inputs, latest  # noqa: E402
from transformers import AutoTokenizer, TrainerCallback  # noqa: E402

from data_contracts.config import load_profile  # noqa: E402
from gr2_core.generation import SERVED_NAME, VLLMEngine, vllm_server  # noqa: E402
from gr2_core.prompts import CoWatch  # noqa: E402
from gr2_core.report import replace_section, to_markdown  # noqa: E402
from gr2_core.rl import train_dapo, training_rows  # noqa: E402


class StepClock(TrainerCallback):
    """Wall time of each optimizer step (generation and dynamic sampling included)."""

    def __init__(self):
        self.start, self.times = None, []

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self.start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifacts", default=str(ROOT / "var" / "artifacts"))
    p.add_argument("--batches", type=int, default=2, help="rollout batches to run")
    p.add_argument(
        "--max-rounds", type=int, default=0, help="dynamic sampling's extra rounds (demo: 4)"
    )
    p.add_argument("--engine", choices=("transformers", "vllm"), default="transformers")
    p.add_argument("--groups", type=int, help="groups per rollout batch (default: the demo's)")
    p.add_argument("--doc")
    p.add_argument(
        "--export",
        help="write the training rows (JSONL) and the student's config and tokenizer to this "
        "folder, then stop (inputs for benchmarks/rl_gpu.py on a machine without var/)",
    )
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    config = load_profile("demo")
    cfg = config.rl.model_copy(
        update={
            "max_steps": args.batches * config.rl.mini_batches,
            "save_steps": 1000,
            "max_sampling_rounds": args.max_rounds,
            "prompts_per_step": args.groups or config.rl.prompts_per_step,
        }
    )
    cfg = type(cfg).model_validate(cfg.model_dump())  # the batch arithmetic checked again
    root = Path(args.artifacts)
    sft = latest(root, "sft_rejection")
    cat, slates, sequences = demo_inputs(root)
    cowatch = CoWatch(sequences) if config.prompt.cowatch_notes else None
    rows = training_rows(
        slates, cat, config.prompt, config.rl.slates, config.rl.seed, cowatch
    )  # what the rl stage trains on
    tok = AutoTokenizer.from_pretrained(sft.path("model"))
    if args.export:
        folder = Path(args.export)
        folder.mkdir(parents=True, exist_ok=True)
        with (folder / "rows.jsonl").open("w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        tok.save_pretrained(folder / "student")
        shutil.copy(sft.path("model") / "config.json", folder / "student" / "config.json")
        print(f"wrote {len(rows)} rows and the student's config/tokenizer to {folder}")
        return
    out = ROOT / "var" / "bench-rl"
    shutil.rmtree(out, ignore_errors=True)
    clock = StepClock()
    served = args.engine == "vllm"
    server = (
        vllm_server(sft.path("model"), config.engine, out.parent / "bench-rl-vllm.log", True)
        if served
        else nullcontext()
    )
    with server as url:
        engine = VLLMEngine(url, SERVED_NAME, tok, config.engine.concurrency) if served else None
        _, history = train_dapo(
            sft.path("model"),
            rows,
            out,
            cfg,
            tok,
            frozenset(cat.sid.values()),
            callbacks=(clock,),
            budget=config.prompt.max_explanation_tokens,
            engine=engine,
        )
    logged = [r for r in history if "monitor/identity_rate" in r]  # one per rollout batch
    k = cfg.mini_batches
    batch_times = [sum(clock.times[i : i + k]) for i in range(0, len(clock.times), k)]
    table = []
    for batch, (r, secs) in enumerate(zip(logged, batch_times, strict=False), start=1):
        stats = {k.removeprefix("dynamic/"): v for k, v in r.items() if k.startswith("dynamic/")}
        row = {
            "rollout batch": batch,
            "optimizer steps": k,
            "seconds": round(secs, 1),
            "generation rounds": 1 + int(stats.get("extra_rounds", 0)),
            "rollouts": (1 + int(stats.get("extra_rounds", 0)))
            * cfg.group_size
            * cfg.prompts_per_step,
            "reward": round(r["reward"], 3),
            "invalid rate": round(r["monitor/invalid_rate"], 3),
            "identity rate": round(r["monitor/identity_rate"], 3),
            "zero-variance groups before": round(stats.get("zero_std_before", 0.0), 2),
            "after": round(stats.get("zero_std_after", 0.0), 2),
            "mean completion tokens": round(r.get("completions/mean_length", 0.0)),
        }
        if served:  # the trainer logs both once per rollout batch, on its first step
            gen, sync = r.get("timing/generate_s", 0.0), r.get("timing/weight_sync_s", 0.0)
            row |= {
                "generation s": round(gen, 1),
                "weight sync s": round(sync, 1),
                "rest s": round(secs - gen - sync, 1),
            }
        print(json.dumps(row), flush=True)
        table.append(row)
    if args.doc:
        command = "python " + " ".join(sys.argv)
        title = "DAPO step cost on this CPU" + (", vLLM rollouts" if served else "")
        rollouts = "vLLM rollouts, synced each batch" if served else "HF `generate` rollouts"
        replace_section(
            Path(args.doc),
            title,
            f"Command: `{command}` ({os.cpu_count()} cores; the newest SFT-rejection student, "
            f"demo RL settings: {cfg.prompts_per_step} groups of {cfg.group_size} budget-forced "
            f"rollouts of up to {cfg.max_completion_length} tokens per rollout batch, "
            f"{cfg.mini_batches} optimizer steps per batch, dynamic sampling up to "
            f"{cfg.max_sampling_rounds} extra rounds, {rollouts}, backward in "
            f"micro-batches of {cfg.micro_batch}"
            + (" with gradient checkpointing" if cfg.gradient_checkpointing else "")
            + ").\n\n"
            + to_markdown(pl.DataFrame(table)),
            "Benchmarks",
        )


if __name__ == "__main__":
    main()
