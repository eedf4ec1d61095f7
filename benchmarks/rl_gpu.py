"""DAPO step cost on a GPU for a model of the student's size (no dataset or weights needed there).

Inputs come from `python benchmarks/rl_step.py --export DIR` (the demo's RL training rows and the
student's config and tokenizer). The model is the student's architecture with random weights:
its completions run to `--max-completion` tokens, which is what the demo's SFT students do too,
so the step time is the cost of full-length rollouts. Dynamic sampling's extra rounds are off;
each extra round adds one generation round.

  python benchmarks/rl_gpu.py --inputs DIR --steps 3 --group 8 --prompts 2 --out result.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data_contracts.config import RLConfig  # noqa: E402
from gr2_core.rl import train_dapo  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--inputs", required=True)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--max-completion", type=int, default=256)
    p.add_argument("--work", default="/tmp/rl_gpu")
    p.add_argument("--out")
    args = p.parse_args()
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    inputs = Path(args.inputs)
    rows = [json.loads(x) for x in (inputs / "rows.jsonl").read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(inputs / "student")
    config = AutoConfig.from_pretrained(inputs / "student")
    torch.manual_seed(0)
    model_dir = Path(args.work) / "model"
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    cfg = RLConfig(
        group_size=args.group,
        prompts_per_step=args.prompts,
        max_steps=args.steps,
        max_completion_length=args.max_completion,
        max_sampling_rounds=0,
        save_steps=10_000,
    )

    class Clock(TrainerCallback):
        def __init__(self):
            self.times, self.start = [], 0.0

        def on_step_begin(self, *a, **k):
            torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.start)

    clock = Clock()
    known = frozenset(s for r in rows for s in r["slate"])
    _, history = train_dapo(model_dir, rows, Path(args.work), cfg, tok, known, callbacks=(clock,))
    lengths = [r["completions/mean_length"] for r in history if "completions/mean_length" in r]
    result = {
        "device": torch.cuda.get_device_name(0),
        "group": args.group,
        "prompts_per_step": args.prompts,
        "max_completion": args.max_completion,
        "step_seconds": [round(t, 2) for t in clock.times],
        "mean_completion_tokens": lengths,
        "rollout_tokens_per_s_after_first": round(
            sum(lengths[1:]) * args.group * args.prompts / max(sum(clock.times[1:]), 1e-9), 1
        ),
    }
    print(json.dumps(result), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
