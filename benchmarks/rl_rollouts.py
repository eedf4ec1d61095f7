"""Rankable DAPO rollouts: plain sampling, budget-forced, and with the slate constraint.

Samples rollouts from the newest completed `sft_<mode>` stage (each mode given) under
`var/artifacts` on the RL training prompts of a profile (its `rl.temperature`,
`rl.max_completion_length` and `prompt.max_explanation_tokens`): once with transformers' plain
`generate`, once through the answer machine with a free list (budget forcing only), once with the
list constrained to the slate (`rl.slate_sids`), and tallies what the answer filter says of each
rollout.
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
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from data_contracts.config import load_profile  # noqa: E402
from gr2_core.generation import HFEngine, machines_for, prompt_ids  # noqa: E402
from gr2_core.prompts import CoWatch, check_answer  # noqa: E402
from gr2_core.report import replace_section, to_markdown  # noqa: E402
from gr2_core.rl import training_rows  # noqa: E402


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
        budget = config.prompt.max_explanation_tokens
        table += rollouts(latest(root, f"sft_{mode}"), rows, cat, cfg, budget, args.seed)
    if args.doc:
        command = "python " + " ".join(sys.argv)
        replace_section(
            Path(args.doc),
            "Rankable rollouts: free vs slate SIDs",
            f"Command: `{command}` ({os.cpu_count()} cores; students of profile {args.profile}, "
            f"one rollout per RL training prompt at temperature {cfg.temperature:g}, up to "
            f"{cfg.max_completion_length} tokens, one batch; budget-forced rows close the "
            f"explanation at {config.prompt.max_explanation_tokens} tokens; outcomes are the "
            "answer filter's verdicts, `truncated:` = no EOS before the limit)."
            "\n\n" + to_markdown(pl.DataFrame(table)),
            "Benchmarks",
        )


def rollouts(sft, rows: list[dict], cat, cfg, budget: int, seed: int) -> list[dict]:
    """One batch of rollouts of the `sft` stage's model per decoding: table rows."""
    tok = AutoTokenizer.from_pretrained(sft.path("model"))
    model = AutoModelForCausalLM.from_pretrained(sft.path("model")).eval()
    prompts = [prompt_ids(tok, r["prompt"]) for r in rows]
    slates = [r["slate"] for r in rows]
    known = frozenset(cat.sid.values())
    engine = HFEngine(model, tok, batch_size=len(rows))
    table = []
    for decoding in ("plain generate", "budget-forced, free list", "budget-forced, slate list"):
        torch.manual_seed(seed)
        start = time.perf_counter()
        if decoding == "plain generate":
            texts, lengths, ended = plain(model, tok, prompts, cfg)
        else:
            method = "free" if "free" in decoding else "constrained"
            done = engine.complete(
                prompts,
                machines_for(tok, slates, method, budget),
                temperature=cfg.temperature,
            )
            texts = [c.text for c in done]
            lengths = [len(c.token_ids) for c in done]
            ended = [c.token_ids[-1] == tok.eos_token_id for c in done]
        seconds = time.perf_counter() - start
        reasons = Counter()
        for r, text, end in zip(rows, texts, ended, strict=True):
            reason = check_answer(text, r["slate"], known).reason
            reasons[reason if end else f"truncated:{reason}"] += 1  # no EOS: reward -1
        row = {
            "student": sft.stage,
            "rollouts": decoding,
            "n": len(rows),
            "rankable": round(reasons["accepted"] / len(rows), 3),
            "outcomes": ", ".join(f"{k} {v}" for k, v in reasons.most_common()),
            "mean tokens": round(sum(lengths) / len(lengths)),
            "seconds": round(seconds, 1),
        }
        print(row, flush=True)
        table.append(row)
    return table


def plain(model, tok, prompts: list[list[int]], cfg) -> tuple[list[str], list[int], list[bool]]:
    """Sampled completions from transformers' `generate` with no answer machine."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=cfg.max_completion_length,
            do_sample=True,
            temperature=cfg.temperature,
            top_p=1.0,
            pad_token_id=pad,
        )
    texts, lengths, ended = [], [], []
    for row in out[:, width:].tolist():  # padding after the EOS (pad may equal EOS)
        end = tok.eos_token_id in row
        row = row[: row.index(tok.eos_token_id)] if end else row
        texts.append(tok.decode(row))
        lengths.append(len(row))
        ended.append(end)
    return texts, lengths, ended


if __name__ == "__main__":
    main()
