"""Rankable DAPO rollouts with and without the slate constraint (`rl.slate_sids`).

Samples rollouts from the newest completed `sft_<mode>` stage (each mode given) under
`var/artifacts` on the RL training prompts of a profile (its `rl.temperature` and
`rl.max_completion_length`), once with transformers' plain `generate` and once through
`gr2_core.rl.SlateSIDProcessor`, and tallies what the answer filter says of each rollout.
Results go to a docs/benchmarks.md section with this command.

  python benchmarks/rl_rollouts.py --profile rl-cpu --mode rejection targeted --prompts 8 \\
      --doc docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from pathlib import Path

import polars as pl
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from teacher import demo_inputs, latest  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessorList  # noqa: E402

from data_contracts.config import load_profile  # noqa: E402
from gr2_core.prompts import CoWatch, check_answer  # noqa: E402
from gr2_core.report import replace_section, to_markdown  # noqa: E402
from gr2_core.rl import SlateSIDProcessor, training_rows  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifacts", default=str(ROOT / "var" / "artifacts"))
    p.add_argument("--profile", default="rl-cpu")
    p.add_argument("--mode", nargs="+", default=["targeted"], choices=["targeted", "rejection"])
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--doc")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    config = load_profile(args.profile)
    cfg = config.rl
    torch.set_num_threads(cfg.num_threads)
    root = Path(args.artifacts)
    cat, slates, sequences = demo_inputs(root)
    cowatch = CoWatch(sequences) if config.prompt.cowatch_notes else None
    rows = training_rows(slates, cat, config.prompt, config.rl.slates, config.rl.seed, cowatch)[
        : args.prompts
    ]
    table = []
    for mode in args.mode:
        table += rollouts(latest(root, f"sft_{mode}"), rows, cat, cfg, args.seed)
    if args.doc:
        command = "python " + " ".join(sys.argv)
        replace_section(
            Path(args.doc),
            "Rankable rollouts: free vs slate SIDs",
            f"Command: `{command}` ({os.cpu_count()} cores; students of profile {args.profile}, "
            f"one rollout per RL training prompt at temperature {cfg.temperature:g}, up to "
            f"{cfg.max_completion_length} tokens, one batch; outcomes are the answer filter's "
            "verdicts, `truncated:` = no EOS before the limit)."
            "\n\n" + to_markdown(pl.DataFrame(table)),
            "Benchmarks",
        )


def rollouts(sft, rows: list[dict], cat, cfg, seed: int) -> list[dict]:
    """One batch of rollouts of the `sft` stage's model, free then constrained: table rows."""
    tok = AutoTokenizer.from_pretrained(sft.path("model"))
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(sft.path("model")).eval()
    texts = [
        tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
        for r in rows
    ]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    known = frozenset(cat.sid.values())
    table = []
    for constrained in (False, True):
        torch.manual_seed(seed)
        extra = {}
        if constrained:
            extra["logits_processor"] = LogitsProcessorList(
                [SlateSIDProcessor(tok, [r["slate"] for r in rows])]
            )
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                **enc,
                max_new_tokens=cfg.max_completion_length,
                do_sample=True,
                temperature=cfg.temperature,
                top_p=1.0,
                pad_token_id=tok.pad_token_id,
                **extra,
            )
        seconds = time.perf_counter() - start
        reasons, lengths = Counter(), []
        for r, ids in zip(rows, out[:, enc["input_ids"].shape[1] :], strict=True):
            ids = ids.tolist()  # generated tokens; padding after the EOS (pad may equal EOS)
            ended = tok.eos_token_id in ids
            ids = ids[: ids.index(tok.eos_token_id)] if ended else ids
            lengths.append(len(ids))
            reason = check_answer(tok.decode(ids), r["slate"], known).reason
            reasons[reason if ended else f"truncated:{reason}"] += 1  # no EOS: reward -1
        row = {
            "student": sft.stage,
            "rollouts": "slate permutation" if constrained else "free",
            "n": len(rows),
            "rankable": round(reasons["accepted"] / len(rows), 3),
            "outcomes": ", ".join(f"{k} {v}" for k, v in reasons.most_common()),
            "mean tokens": round(sum(lengths) / len(lengths)),
            "seconds": round(seconds, 1),
        }
        print(row, flush=True)
        table.append(row)
    return table


if __name__ == "__main__":
    main()
