"""Load on `gr2 serve`: fixed-duration runs with 1, 4 and 16 concurrent clients, each sending one
test slate per request (its user's history and its candidates) as fast as answers come back.

    python benchmarks/serving_load.py --profile ci --set ... --duration 30 --doc docs/benchmarks.md

Without `--url` it starts `gr2 serve` itself (the profile's registry, alias `champion`) on a free
127.0.0.1 port and stops it after. Requests are drawn from the test slates of the newest
`candidates` stage under the profile's artifacts root (or `--slates`). Reports per concurrency:
requests, statuses (5xx counted apart), latency p50/p95/p99 and answers per second.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import shlex
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_contracts.config import load_profile  # noqa: E402
from gr2_core.report import replace_section, to_markdown  # noqa: E402
from gr2_core.serving import ManagedServer, free_port  # noqa: E402

BIN = Path(sys.executable).parent


def test_records(slates_path: Path, history: int) -> list[dict]:
    slates = pl.read_parquet(slates_path).filter(pl.col("split") == "test")
    if slates.is_empty():
        raise SystemExit(f"{slates_path}: no test slates")
    return [
        {"history": list(r["history"][-history:]), "candidates": list(r["candidates"])}
        for r in slates.iter_rows(named=True)
    ]


async def client(url: str, records: list[dict], start: int, deadline: float, out: list) -> None:
    async with httpx.AsyncClient(timeout=300) as http:
        i = start
        while time.monotonic() < deadline:
            record = records[i % len(records)]
            i += 1
            t0 = time.monotonic()
            try:
                r = await http.post(url, json={"dataframe_records": [record]})
                status = r.status_code
                if status == 200:  # an answer must be a permutation of the slate
                    (p,) = r.json()["predictions"]
                    if sorted(p["recommendations"]) != sorted(record["candidates"]):
                        status = -1
            except httpx.HTTPError as err:
                status = type(err).__name__
            out.append((status, time.monotonic() - t0))


async def load(url: str, records: list[dict], clients: int, seconds: float) -> dict:
    out: list = []
    deadline = time.monotonic() + seconds
    start = time.monotonic()
    await asyncio.gather(*(client(url, records, 997 * k, deadline, out) for k in range(clients)))
    wall = time.monotonic() - start
    statuses = Counter(s for s, _ in out)
    ok = np.array([t for s, t in out if s == 200])
    q = np.percentile(ok, [50, 95, 99]) if len(ok) else [float("nan")] * 3
    return {
        "clients": clients,
        "requests": len(out),
        "answered 200": statuses.get(200, 0),
        "5xx": sum(v for s, v in statuses.items() if isinstance(s, int) and s >= 500),
        "other": ", ".join(f"{s}: {v}" for s, v in statuses.items() if s != 200) or "-",
        "p50 s": round(float(q[0]), 2),
        "p95 s": round(float(q[1]), 2),
        "p99 s": round(float(q[2]), 2),
        "answers/s": round(len(ok) / wall, 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", default="demo")
    p.add_argument("--config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--url", help="a running server's /invocations (default: start gr2 serve)")
    p.add_argument("--alias", default="champion", help="the alias gr2 serve serves")
    p.add_argument("--slates", type=Path, help="default: the newest candidates stage's slates")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--duration", type=float, default=30.0, help="seconds per concurrency")
    p.add_argument("--warmup", type=int, default=2, help="requests before measuring")
    p.add_argument("--doc")
    p.add_argument("--heading", default="Serving under load")
    p.add_argument("--note", default="", help="what was served (prose after the command)")
    args = p.parse_args()
    from flows.cli import _parse_sets  # the CLI's own --set parsing

    config = load_profile(args.config or args.profile, _parse_sets(args.set))
    root = Path(config.artifacts_root)
    slates = args.slates or max(
        (root / "candidates").glob("*/slates.parquet"), key=lambda f: f.stat().st_mtime
    )
    records = test_records(slates, config.prompt.history_items)
    server = None
    url = args.url
    if url is None:
        port = free_port()
        cmd = [str(BIN / "gr2"), "serve", "--port", str(port), "--alias", args.alias]
        cmd += ["--config", args.config] if args.config else ["--profile", args.profile]
        for item in args.set:
            cmd += ["--set", item]
        server = ManagedServer(cmd, port, ROOT / "var" / "logs" / "serving_load.log")
        server.start()
        url = f"http://127.0.0.1:{port}/invocations"
    try:
        for record in records[: args.warmup]:
            httpx.post(url, json={"dataframe_records": [record]}, timeout=300)
        rows = []
        for n in args.clients:
            row = asyncio.run(load(url, records, n, args.duration))
            print(row, flush=True)
            rows.append(row)
    finally:
        if server is not None:
            server.stop()
    table = to_markdown(pl.DataFrame(rows))
    print(table)
    if args.doc:
        cpu = subprocess.run(
            ["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        shown = list(sys.argv)
        if "--note" in shown:  # the note is the prose after the command
            i = shown.index("--note")
            del shown[i : i + 2]
        body = (
            f"Command: `python {shlex.join(shown)}`, {args.duration:.0f} s per row, one test "
            f"slate per request ({len(records[0]['candidates'])} candidates, the last "
            f"{config.prompt.history_items} history items), served by `gr2 serve` (MLflow's "
            "scoring app behind `tasks.scoring_server.Gate`: one prediction at a time, queue "
            f"limit 64); {platform.machine()} {cpu}, {len(records)} test slates drawn in turn. "
            "`5xx` counts server errors; `other` lists every status that was not 200 (-1: an "
            f"answer that was not a permutation of the slate). {args.note}\n\n" + table
        )
        replace_section(Path(args.doc), args.heading, body, "Benchmarks")


if __name__ == "__main__":
    main()
