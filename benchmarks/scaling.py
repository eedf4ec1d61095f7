"""Training throughput with 1 and with several data-parallel processes, through the pipeline's own
training call (`gr2_core.training.train`, the mid-training step; `processes > 1` relaunches it
under torchrun), at the same global batch.

The model is the student's architecture built from its config (SmolLM2-135M, random weights: the
arithmetic does not depend on them), the rows are random token sequences of `--seq-len` tokens, all
trained on. Each configuration splits this machine's cores between its processes (1 process x
N threads, N processes x 1 thread ...). Reports the Trainer's tokens/s (training loop only) and
the wall time of the whole call (process start, model load and saving included), and writes a
table to `--doc` with a per-GPU estimate from the measured H100 step (docs/benchmarks.md).

    python benchmarks/scaling.py --processes 1 2 --steps 4 --doc docs/scaling.md
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gr2_core.report import replace_section  # noqa: E402

# the H100 step of docs/benchmarks.md ("Student training throughput and MFU, H100"), eager bf16
H100_TOKENS_PER_S = {"SmolLM2-135M": 150_048, "Qwen2.5-0.5B config": 75_453}


def build_model(folder: Path, seq_len: int) -> int:
    """The SmolLM2-135M architecture saved to `folder`; returns its vocabulary size."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from train_throughput import ARCHS

    spec = dict(ARCHS["smollm2-135m"])
    config = AutoConfig.for_model(
        spec.pop("model_type"), max_position_embeddings=max(seq_len, 2048), **spec
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return config.vocab_size


def measure(model: Path, vocab: int, processes: int, args, work: Path) -> dict:
    import polars as pl
    import torch

    from gr2_core.training import TrainSettings, train

    cores = os.cpu_count() or 1
    threads = max(1, cores // processes)
    per_process = args.global_batch // processes
    rows = args.steps * args.global_batch
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (rows, args.seq_len), generator=gen).tolist()
    table = pl.DataFrame({"input_ids": ids, "labels": ids})
    settings = TrainSettings(
        max_steps=args.steps,
        batch_size=per_process,
        grad_accum=1,
        lr=1e-4,
        warmup_steps=0,
        warmup_lr_scale=1.0,
        lr_warmup_ratio=0.0,
        logging_steps=1,
        save_steps=10**6,
        eval_steps=10**6,
        seed=0,
        num_threads=threads,
        processes=processes,
    )
    start = time.perf_counter()
    _, history = train(model, table, {}, work / f"p{processes}", settings, vocab, 0)
    wall = time.perf_counter() - start
    runtime = next(r["train_runtime"] for r in history if "train_runtime" in r)
    tokens = rows * args.seq_len
    return {
        "processes": processes,
        "threads_per_process": threads,
        "batch_per_process": per_process,
        "tokens": tokens,
        "train_runtime_s": round(runtime, 2),
        "tokens_per_s": round(tokens / runtime, 1),
        "wall_s": round(wall, 1),
        "final_loss": [r["loss"] for r in history if "loss" in r][-1],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--global-batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--doc", type=Path, help="write the table as a section of this markdown file")
    args = p.parse_args()
    if any(args.global_batch % n for n in args.processes):
        p.error("--global-batch must divide by every process count")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="gr2-scaling-") as tmp:
        work = Path(tmp)
        vocab = build_model(work / "model", args.seq_len)
        results = []
        for n in args.processes:
            results.append(measure(work / "model", vocab, n, args, work))
            print(json.dumps(results[-1]), flush=True)
    if args.doc:
        base = results[0]["tokens_per_s"]
        rows = [
            f"| {r['processes']} x {r['threads_per_process']} | {r['batch_per_process']} | "
            f"{r['tokens_per_s']:.1f} | {r['tokens_per_s'] / base:.2f}x | {r['wall_s']:.1f} | "
            f"{r['final_loss']:.4f} |"
            for r in results
        ]
        estimate = [
            f"| {name} | {tps:,} | {8 * tps:,} | {64 * tps:,} |"
            for name, tps in H100_TOKENS_PER_S.items()
        ]
        body = "\n".join(
            [
                f"Command: `python benchmarks/scaling.py --processes "
                f"{' '.join(map(str, args.processes))} --steps {args.steps}` "
                "(`make bench-scaling`) on "
                f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores, float32. The "
                f"mid-training call of the pipeline on the SmolLM2-135M architecture, {args.steps} "
                f"optimizer steps of a global batch of {args.global_batch} rows x "
                f"{args.seq_len} tokens; the cores are split between the processes.",
                "",
                "| processes x threads | rows per process | tokens/s (training loop) | vs 1 | "
                "wall s (launch, load, save included) | last loss |",
                "|---|---|---|---|---|---|",
                *rows,
                "",
                "On one machine the processes share its cores, so more processes add no compute: "
                "the figure shows what the launch and the gradient all-reduce cost, not a speedup. "
                "Equal last losses are the same optimizer steps. On GPUs each process has a "
                "device of its own; a paper estimate from the measured H100 step, linear in the "
                "number of GPUs (an upper bound: all-reduce and input time not counted):",
                "",
                "| student | 1 H100 (measured) tokens/s | 8 GPUs (estimate) | 64 GPUs (estimate) |",
                "|---|---|---|---|",
                *estimate,
            ]
        )
        replace_section(args.doc, "Training throughput, 1 and 2 processes", body, "Scaling out")
        print(f"wrote section 'Training throughput, 1 and 2 processes' of {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
