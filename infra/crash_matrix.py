"""The crash matrix: kill a run with SIGKILL in the middle of each long stage, run the same command
again, and check that it resumes and ends where an uninterrupted run ends.

    python infra/crash_matrix.py                       # every row (infra/crash_matrix.sh)
    python infra/crash_matrix.py --rows preranker midtrain --doc docs/reliability.md

Rows run as a chain on one artifacts root per flow: the first run is killed in row 1's stage,
the rerun resumes it, goes on, and is killed in row 2's stage, and so on; the last rerun
finishes. An uninterrupted run of the same command on another root is the reference (stage keys
do not depend on the root, so the two roots hold the same keys). Per row:
- kill point: the stage's checkpoint that existed when the process group was killed;
- resumed at: what the rerun's log says it resumed from (every stage logs it as a warning);
- redone: finished stages the rerun computed again (must be none: they are reused);
- outputs: the stage's final files against the reference's, by sha256 (`bitwise`), else the
  model weights within `WEIGHTS_ATOL` (`close`); traces come from a sampling server and are
  compared as a set of decided slates with no slate decided twice.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import polars as pl  # noqa: E402

from data_contracts.manifest import Manifest  # noqa: E402
from gr2_core.report import replace_section, to_markdown  # noqa: E402
from gr2_core.training import whole_json  # noqa: E402
from tasks.stage import computed_stages  # noqa: E402

BIN = Path(sys.executable).parent
WEIGHTS_ATOL = 1e-5
TRAINER_CKPT = "checkpoints/checkpoint-*/trainer_state.json"
# outputs that record wall times (the Trainer's log history, curves drawn from it): they differ
# between any two runs, interrupted or not
TIMED = {"log_history", "curves"}


@dataclass(frozen=True)
class Row:
    stage: str
    flow: str  # "run" or "ctc"
    kill_when: str  # a glob under the stage's .partial folder: killed once it matches
    sets: tuple[str, ...] = ()  # what the row needs of the chain's settings (a kill window)


ROWS = {
    "preranker": Row("preranker", "run", "checkpoint.pt"),
    "midtrain": Row("midtrain", "run", TRAINER_CKPT, ("midtrain.max_steps=12",)),
    "traces": Row("traces", "run", "targeted/shard-*.jsonl"),
    "sft_targeted": Row("sft_targeted", "run", TRAINER_CKPT, ("sft.max_steps=8",)),
    "rl_targeted": Row("rl_targeted", "run", TRAINER_CKPT, ("rl.max_steps=4",)),
    "ctc_train": Row("ctc_train", "ctc", "ckpt/last.pt", ("ctc.epochs=4",)),
}
# the pipeline's chain settings: the ci profile with one trace mode and one RL variant, no
# registration (the matrix is about stages)
PIPELINE_SETS = ("teacher.modes=[targeted]", "rl.variants=[targeted]", "registry.enabled=false")
LIGHT_SETS = ("teacher.modes=[]", "rl.variants=[]", "registry.enabled=false", "data.max_users=120")


def command(flow: str, root: Path, sets: list[str]) -> list[str]:
    cmd = [str(BIN / "gr2"), flow, "--profile", "ci", "--set", f"artifacts_root={root}"]
    cmd += ["--set", f"tracking.tracking_uri=sqlite:///{root.parent / (root.name + '.db')}"]
    for item in sets:
        cmd += ["--set", item]
    return cmd


def stage_partial(root: Path, stage: str) -> list[Path]:
    folder = root / stage
    return sorted(folder.glob("*.partial")) if folder.exists() else []


def kill_point(root: Path, row: Row) -> str | None:
    """The checkpoint that makes this a mid-stage kill, if it exists now."""
    for partial in stage_partial(root, row.stage):
        found = sorted(partial.glob(row.kill_when))
        if row.kill_when.endswith(".jsonl"):
            found = [f for f in found if f.stat().st_size > 0]
        if row.kill_when.endswith(".json"):  # the Trainer's last file of a checkpoint, whole
            found = [f for f in found if whole_json(f)]
        if found:
            return str(found[-1].relative_to(partial))
    return None


def run_until(cmd: list[str], log: Path, row: Row | None, root: Path, timeout_s: float):
    """Run `cmd`; with a row, SIGKILL its process group once the row's kill point exists.
    Returns (exit code or None if killed, kill point)."""
    # Prefect's home (its cache records) lives with the matrix's work folder and goes with it
    home = root.parent / "prefect-home"
    home.mkdir(exist_ok=True)
    env = os.environ | {"OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PREFECT_HOME": str(home)}
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout_s
        while proc.poll() is None:
            if time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                raise TimeoutError(f"{shlex.join(cmd)} ran past {timeout_s:.0f} s; log {log}")
            point = kill_point(root, row) if row is not None else None
            if point is not None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                wait_for_orphans(root)
                return None, point
            time.sleep(0.1)
    return proc.returncode, None


def wait_for_orphans(root: Path, timeout_s: float = 60) -> None:
    """Servers a killed run started (vLLM's own session) die with it (PDEATHSIG): wait for it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if subprocess.run(["pgrep", "-f", str(root)], capture_output=True).returncode != 0:
            return
        time.sleep(0.5)
    raise RuntimeError(f"processes of the killed run on {root} are still alive after {timeout_s} s")


RESUMED = re.compile(
    r"resuming training from \S*?(?P<ckpt>checkpoint-\d+)"
    r"|(?:preranker|ctc): resuming from \S+ after (?P<epoch>epoch \d+)"
    r"|resuming after (?P<attempts>\d+ attempts) already written"
)


def resumed_at(text: str) -> str:
    """What the rerun says it resumed from: a checkpoint, an epoch, or attempts (each shard)."""
    found = [next(v for v in m.groupdict().values() if v) for m in RESUMED.finditer(text)]
    return " + ".join(found)


def final_folder(root: Path, stage: str) -> Path:
    (folder,) = [p for p in (root / stage).iterdir() if not p.name.endswith(".partial")]
    return folder


def compare(stage: str, crashed: Path, reference: Path) -> tuple[str, bool]:
    """How the killed-and-resumed stage's output compares with the uninterrupted one's."""
    a, b = Manifest.read(crashed), Manifest.read(reference)
    if a.key != b.key:
        return f"different keys {a.key} / {b.key}", False
    differ = [n for n in a.files if a.files[n].sha256 != b.files[n].sha256]
    timed = [n for n in differ if n in TIMED or same_but_times(a.path(n), b.path(n))]
    differ = [n for n in differ if n not in timed]
    if not differ:
        return "bitwise" + (f" (but {', '.join(timed)}: wall times)" if timed else ""), True
    if stage == "traces":
        return compare_traces(crashed, reference, differ)
    weights = [n for n in differ if n in ("model", "model.pt")]
    if weights:
        gap = max_weight_gap(a.path(weights[0]), b.path(weights[0]))
        rest = [n for n in differ if n not in weights]
        ok = gap <= WEIGHTS_ATOL
        return f"weights within {gap:.1e} (tolerance {WEIGHTS_ATOL:.0e}); differ: {rest}", ok
    return f"differ: {differ}", False


def same_but_times(a: Path, b: Path) -> bool:
    """Two tables equal once their wall-time columns (`*seconds*`) are left out."""
    if a.suffix != ".parquet":
        return False
    fa, fb = pl.read_parquet(a), pl.read_parquet(b)
    keep = [c for c in fa.columns if "second" not in c]
    return fa.columns == fb.columns and fa.select(keep).equals(fb.select(keep))


def max_weight_gap(a: Path, b: Path) -> float:
    import torch

    if a.is_file():  # a torch state dict
        sa, sb = torch.load(a, weights_only=False), torch.load(b, weights_only=False)
        sa, sb = sa.get("model", sa), sb.get("model", sb)
    else:  # a transformers folder
        from safetensors.torch import load_file

        (fa,), (fb,) = sorted(a.glob("*.safetensors")), sorted(b.glob("*.safetensors"))
        sa, sb = load_file(fa), load_file(fb)
    return max(float((sa[k].float() - sb[k].float()).abs().max()) for k in sa)


def compare_traces(crashed: Path, reference: Path, differ: list[str]) -> tuple[str, bool]:
    """A sampling server is not bitwise repeatable: the same slates are decided, none twice."""
    a = pl.read_parquet(crashed / "targeted_attempts.parquet")
    b = pl.read_parquet(reference / "targeted_attempts.parquet")
    twice = a.filter(pl.col("accepted")).group_by("job_id").len().filter(pl.col("len") > 1)
    same = set(a["job_id"]) == set(b["job_id"])
    ok = same and twice.is_empty()
    return f"same slates decided: {same}, accepted twice: {twice.height} (sampled; {differ})", ok


def chain(flow: str, rows: list[Row], base_sets: tuple[str, ...], work: Path, timeout_s: float):
    sets = list(base_sets) + [s for r in rows for s in r.sets]
    ref_root, crash_root = work / f"{flow}-reference", work / f"{flow}-crash"
    print(f"[{flow}] uninterrupted reference run", flush=True)
    code, _ = run_until(
        command(flow, ref_root, sets), work / f"{flow}-reference.log", None, ref_root, timeout_s
    )
    if code != 0:
        raise RuntimeError(f"reference run failed; log {work / f'{flow}-reference.log'}")
    results, points = [], {}
    finished: set[str] = set()
    for i, row in enumerate(rows + [None]):
        log = work / f"{flow}-crash-{i}.log"
        what = f"killed in {row.stage}" if row else "to the end"
        print(f"[{flow}] run {i}: {what}", flush=True)
        code, point = run_until(command(flow, crash_root, sets), log, row, crash_root, timeout_s)
        text = log.read_text(errors="replace")
        if row is not None and point is None:
            raise RuntimeError(f"run {i} ended (code {code}) before {row.stage} was killed; {log}")
        if row is None and code != 0:
            raise RuntimeError(f"the last rerun failed with code {code}; log {log}")
        if i > 0:  # this run resumed the stage killed in the previous one
            prev = rows[i - 1]
            redone = sorted(set(computed_stages(text)) & finished)
            out, same = compare(
                prev.stage,
                final_folder(crash_root, prev.stage),
                final_folder(ref_root, prev.stage),
            )
            at = resumed_at(text)
            results.append(
                {
                    "stage": prev.stage,
                    "kill point": points[prev.stage],
                    "resumed at": at or "(no resume logged)",
                    "finished stages redone": ", ".join(redone) or "none",
                    "outputs vs uninterrupted": out,
                    "pass": bool(at) and not redone and same,
                }
            )
        finished = complete_stages(crash_root)
        if row is not None:
            points[row.stage] = point
    return results


def complete_stages(root: Path) -> set[str]:
    """Stages with a finished output folder under `root`."""
    if not root.exists():
        return set()
    return {
        p.name
        for p in root.iterdir()
        if p.is_dir() and any(not q.name.endswith(".partial") for q in p.iterdir())
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    p.add_argument("--work", type=Path, default=ROOT / "var" / "crash-matrix")
    p.add_argument(
        "--light",
        action="store_true",
        help="pipeline rows without teacher and RL, on 120 users (preranker, midtrain)",
    )
    p.add_argument("--timeout", type=float, default=1200, help="seconds per run")
    p.add_argument("--doc")
    p.add_argument("--heading", default="Crash matrix")
    args = p.parse_args()
    work = args.work.resolve()
    if work.exists():
        import shutil

        shutil.rmtree(work)
    work.mkdir(parents=True)
    order = list(ROWS)
    rows = [ROWS[r] for r in sorted(args.rows, key=order.index)]
    table = []
    start = time.monotonic()
    for flow in ("run", "ctc"):
        mine = [r for r in rows if r.flow == flow]
        if mine:
            base = LIGHT_SETS if args.light else PIPELINE_SETS
            table += chain(flow, mine, base if flow == "run" else (), work, args.timeout)
    minutes = (time.monotonic() - start) / 60
    frame = pl.DataFrame(table)
    text = to_markdown(frame)
    print(text)
    print(json.dumps({"rows": len(table), "passed": int(frame["pass"].sum()), "minutes": minutes}))
    if args.doc:
        body = (
            f"Command: `python {shlex.join(sys.argv)}` ({minutes:.1f} min on this machine). "
            "Each row: the run was killed with SIGKILL (its whole process group) once the kill "
            "point existed in the stage's work folder; the same command then ran again. "
            f"Weights compare within {WEIGHTS_ATOL:.0e}; `log_history.json` and plots hold "
            "wall times and are expected to differ.\n\n" + text
        )
        replace_section(Path(args.doc), args.heading, body, "Reliability")
    return 0 if bool(frame["pass"].all()) else 1


if __name__ == "__main__":
    sys.exit(main())
