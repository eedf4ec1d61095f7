"""Teacher-trace and evaluation throughput with 1 and 2 Ray tasks at once, through the pipeline.

The `ci` flow with the real SmolLM2-135M student (`student.tiny: false`) runs once with
Prefect's thread pool (every stage computed); then, for each worker count, the `traces` stage
(the local vLLM teacher, 2 shards) and the SFT evaluation (each answer method's slates in 2 shards
of whole batches) are moved away and computed again on a local Ray instance (`runner.kind: ray`),
the rest reused. The tasks are the same for every worker count; what changes is how many run at
once: each reserves `cores / workers` CPUs (`runner.num_cpus`), so with 1 worker one task runs at
a time and with 2 two do. Reports each stage's wall time (the manifest's `wall_seconds`; the
traces stage's includes starting the vLLM server, the same in both) and slates per second, and
writes a table to `--doc`.

    python benchmarks/ray_scaling.py --workers 1 2 --doc docs/scaling.md
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gr2_core.report import replace_section  # noqa: E402

SECTION = "Measured: teacher traces and evaluation on 1 and 2 Ray workers"


def _published(root: Path, stage: str):
    from data_contracts.manifest import Manifest

    (folder,) = [p for p in (root / stage).iterdir() if not p.name.endswith(".partial")]
    return Manifest.read(folder)


def section(rows, slates: int, eval_slates: int, methods: str, cores: int, argv) -> str:
    """The docs section: what ran, then (stage, runner, seconds, slates/s) rows."""
    table = "| stage | runner | wall time (s) | slates/s |\n|---|---|---|---|\n"
    table += "\n".join(f"| {n} | {w} | {s:.1f} | {r:.3f} |" for n, w, s, r in rows)
    cmd = "python benchmarks/ray_scaling.py " + " ".join(argv or sys.argv[1:])
    return (
        f"`{cmd}` (this machine: {cores} cores, no GPU). The `ci` flow with the real "
        f"SmolLM2-135M student: its traces ({slates} slates in 2 shards, the local vLLM "
        f"teacher) and SFT evaluation ({eval_slates} slates a split and method: "
        f"{methods}; test and valid, batches of 4; each method's slates in 2 shards; one Ray "
        "instance for the whole stage) recomputed on a local Ray instance, after "
        "the first run computed them in the stage's process (threads); on Ray the same tasks, "
        f"one at a time with 1 worker (each reserves {cores} CPUs), two at once with 2. The "
        "traces wall time includes starting the vLLM server; an evaluation task starts a "
        "transformers engine of its own (imports and model load in the Ray worker). "
        "Evaluation slates count every answer (split, method, slate).\n\n" + table + "\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--slates", type=int, default=4, help="teacher slates")
    parser.add_argument("--eval-slates", type=int, default=16, help="SFT evaluation slates")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--doc", default=None, help="write the table as a section of this file")
    args = parser.parse_args(argv)

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from prefect.settings import PREFECT_TASKS_REFRESH_CACHE, temporary_settings

    from data_contracts.config import load_profile
    from data_contracts.rerankers import eval_stage, sft_stage
    from flows.gr2_pipeline import gr2_pipeline

    work = Path(args.work or tempfile.mkdtemp(prefix="gr2-ray-bench-"))
    root = work / "artifacts"
    evaluation = eval_stage(sft_stage("targeted"))
    base = {
        "artifacts_root": str(root),
        "tracking.tracking_uri": f"sqlite:///{work / 'mlflow.db'}",
        "data.max_users": 120,
        "evaluation.bootstrap_samples": 50,
        "teacher.modes": ["targeted"],
        "teacher.slates": args.slates,
        "teacher.shards": 2,
        "teacher.parallel_shards": 2,
        "student.tiny": False,
        "sft.eval_slates": args.eval_slates,
        "sft.eval_batch_size": 4,
        "rl.variants": [],
        "registry.enabled": False,
    }
    print("the ci flow with threads (every stage computed) ...", flush=True)
    first = load_profile("ci", base)
    methods = ", ".join(first.sft.eval_methods)
    state = gr2_pipeline(first, return_state=True)
    if not state.is_completed():
        raise SystemExit(f"the first run failed: {state.message}")
    rows = []
    cores = os.cpu_count() or 1
    evaluation_rows = _published(root, evaluation).files["answers"].rows
    for name, stage, slates in (
        ("traces (vLLM teacher, targeted)", "traces", args.slates),
        (evaluation, evaluation, evaluation_rows),
    ):
        seconds = _published(root, stage).metrics["wall_seconds"]
        rows.append((name, "threads (in the stage)", seconds, slates / seconds))
    for workers in args.workers:
        for stage in ("traces", evaluation):
            shutil.move(root / stage, work / f"{stage}-before-{workers}")
        config = load_profile(
            "ci",
            base
            | {
                "runner.kind": "ray",
                "runner.shards": 2,
                "runner.num_cpus": cores / workers,
            },
        )
        print(f"traces and {evaluation} on Ray, {workers} worker(s) ...", flush=True)
        with temporary_settings({PREFECT_TASKS_REFRESH_CACHE: True}):
            state = gr2_pipeline(config, return_state=True)
        if not state.is_completed():
            raise SystemExit(f"the Ray run failed: {state.message}")
        traces, answers = _published(root, "traces"), _published(root, evaluation)
        for name, manifest, slates in (
            ("traces (vLLM teacher, targeted)", traces, args.slates),
            (evaluation, answers, answers.files["answers"].rows),
        ):
            seconds = manifest.metrics["wall_seconds"]
            rows.append((name, f"Ray, {workers} worker(s)", seconds, slates / seconds))
            print(f"  {name}: {seconds:.1f} s, {slates / seconds:.3f} slates/s", flush=True)

    body = section(rows, args.slates, args.eval_slates, methods, cores, argv)
    print(body)
    if args.doc:
        replace_section(Path(args.doc), SECTION, body, "Scaling out")
        print(f"wrote section {SECTION!r} of {args.doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
