"""Mixed precision on this CPU: float32 vs bf16 autocast for training and for scoring.

On a CPU with native bf16 (AVX-512 BF16 or AMX, `gr2_core.training.cpu_bf16`) GR2 trains with
bf16 autocast over float32 master weights and answers with bf16 autocast, as on a GPU. This
measures what that buys and what it changes, on the newest SFT-rejection student under
`var/artifacts` (or `--model`) and the demo's test slates:

- one training micro-batch (forward and backward, gradient checkpointing on, the LM head on the
  completion's positions only) of 4 sequences of `--seq` tokens, `--reps` times each way;
- scoring mode as `make serve` answers (`HFEngine.scores`, one slate of 10 per request, no
  explanation): latency p50/p95 over `--requests` slates each way, and how often the two
  precisions agree on the top item and on the whole order.

Results go to the "Mixed precision on this CPU" section of `--doc` with this command.

  python benchmarks/precision.py --doc docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from generation import student_folder  # noqa: E402
from teacher import demo_inputs  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import gr2_core.training as training  # noqa: E402
from data_contracts.config import load_profile  # noqa: E402
from gr2_core.generation import HFEngine  # noqa: E402
from gr2_core.prompts import CoWatch, student_messages  # noqa: E402
from gr2_core.report import replace_section, to_markdown  # noqa: E402
from gr2_core.rerank_eval import eval_slates  # noqa: E402

NATIVE = training.cpu_bf16


def cpu_kind() -> str:
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    amx = "AMX" if "amx_bf16" in flags else "no AMX"
    return f"{'AVX-512 BF16' if 'avx512_bf16' in flags else 'no AVX-512 BF16'}, {amx}"


def precision(bf16: bool) -> None:
    """Switch `gr2_core.training.autocast` (training and the HF engine) to bf16 or float32."""
    training.cpu_bf16 = (lambda: True) if bf16 else (lambda: False)


def train_step(model, ids: torch.Tensor, keep: int) -> float:
    start = time.perf_counter()
    with training.autocast("cpu"):
        out = model(input_ids=ids, logits_to_keep=keep + 1, use_cache=False)
    torch.log_softmax(out.logits[:, :-1].float(), -1).mean().backward()
    model.zero_grad()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifacts", default=str(ROOT / "var" / "artifacts"))
    p.add_argument("--model")
    p.add_argument("--seq", type=int, default=700, help="tokens per training sequence")
    p.add_argument("--keep", type=int, default=140, help="completion tokens per sequence")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--doc")
    args = p.parse_args()
    if not NATIVE():
        raise SystemExit("this CPU has no native bf16: GR2 keeps float32 here, nothing to compare")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(os.cpu_count() or 1)
    folder = student_folder(Path(args.artifacts), args.model)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = torch.randint(1000, 40000, (4, args.seq), generator=torch.Generator().manual_seed(0))
    rows = []
    for bf16 in (False, True):
        precision(bf16)
        train_step(model, ids, args.keep)  # warm-up
        times = [train_step(model, ids, args.keep) for _ in range(args.reps)]
        tokens = ids.numel()
        rows.append(
            {
                "work": f"training micro-batch, 4 x {args.seq} tokens",
                "precision": "bf16 autocast" if bf16 else "float32",
                "seconds (median)": round(float(np.median(times)), 2),
                "tokens/s": round(tokens / float(np.median(times))),
            }
        )
        print(rows[-1], flush=True)
    model.eval()
    config = load_profile("demo")
    cat, slates, sequences = demo_inputs(Path(args.artifacts))
    cowatch = CoWatch(sequences) if config.prompt.cowatch_notes else None
    test = eval_slates(slates, "test", args.requests, 0)
    messages = [
        student_messages(r["history"], r["candidates"], cat, config.prompt, cowatch, r["user_id"])
        for r in test.iter_rows(named=True)
    ]
    sids = [[cat.sid[c] for c in r["candidates"]] for r in test.iter_rows(named=True)]
    engine = HFEngine(model, tok, batch_size=1)
    orders = {}
    for bf16 in (False, True):
        precision(bf16)
        engine.scores(messages[:1], sids[:1])  # warm-up
        secs, order = [], []
        for m, s in zip(messages, sids, strict=True):
            start = time.perf_counter()
            done = engine.scores([m], [s])[0]
            secs.append(time.perf_counter() - start)
            order.append(sorted(range(len(s)), key=lambda k: -done.scores[k]))
        orders[bf16] = order
        rows.append(
            {
                "work": "scoring one slate of 10 (as make serve)",
                "precision": "bf16 autocast" if bf16 else "float32",
                "seconds (median)": round(float(np.median(secs)), 2),
                "p95 s": round(float(np.percentile(secs, 95)), 2),
            }
        )
        print(rows[-1], flush=True)
    top1 = np.mean([a[0] == b[0] for a, b in zip(orders[False], orders[True], strict=True)])
    whole = np.mean([a == b for a, b in zip(orders[False], orders[True], strict=True)])
    agree = f"same top item on {top1:.0%} of the {len(sids)} slates, same order on {whole:.0%}"
    print(agree)
    if args.doc:
        command = "python " + " ".join(sys.argv)
        body = (
            f"Command: `{command}` ({os.cpu_count()} cores, {cpu_kind()}; student "
            f"`{folder.parent.name}/{folder.name}`). GR2 trains with bf16 autocast over float32 "
            "master weights (`bf16=True` in the trainers) and answers with bf16 autocast "
            "wherever `gr2_core.training.cpu_bf16()` finds native bf16, as on a GPU; float32 "
            "elsewhere.\n\n"
            f"{to_markdown(pl.DataFrame(rows, strict=False))}\n\n"
            f"Scoring in both precisions: {agree}."
        )
        replace_section(Path(args.doc), "Mixed precision on this CPU", body, "Benchmarks")


if __name__ == "__main__":
    main()
