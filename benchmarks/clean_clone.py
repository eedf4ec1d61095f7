"""Time a README command as a new user runs it: a fresh clone of the repository, install
included, nothing cached but pip's download cache.

    python benchmarks/clean_clone.py test --doc docs/timings.md   # make test test-scale (= .ci/run)
    python benchmarks/clean_clone.py test-fast --doc docs/timings.md
    python benchmarks/clean_clone.py run --doc docs/timings.md    # make run (the demo profile)

The clone is of the committed HEAD (uncommitted edits are not timed). The install (both
virtualenvs for `test` and `run`) and the command are timed apart (`test`: the default suite
and the scale-out suite each, as .ci/run runs them); the command's last output line (pytest's
summary; for `run`, where MLflow recorded the flow) is kept. The section
`make <target> from a clean clone` of `--doc` is replaced, so the timings page holds the newest
measurement. Exits with the command's status.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gr2_core.report import replace_section  # noqa: E402

INSTALL = {"test": "install teacher-env", "run": "install teacher-env", "test-fast": "install"}
COMMANDS = {"test": ["make test", "make test-scale"]}  # what .ci/run runs, timed apart


def timed(cmd: str, cwd: Path, log: Path) -> tuple[float, int]:
    start = time.perf_counter()
    with log.open("a") as out:
        rc = subprocess.run(
            cmd, shell=True, cwd=cwd, stdout=out, stderr=subprocess.STDOUT
        ).returncode
    return time.perf_counter() - start, rc


def minutes(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m} min {s} s"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("target", choices=sorted(INSTALL))
    p.add_argument("--doc", help="write the timing as a section of this markdown file")
    p.add_argument("--keep", action="store_true", help="keep the clone (printed)")
    args = p.parse_args()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    work = Path(tempfile.mkdtemp(prefix="gr2-clone-"))
    clone = work / "gr2"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    log = work / "log.txt"
    env_note = "" if os.environ.get("CI") is None else " (CI=true)"
    install, rc = timed(f"make {INSTALL[args.target]}", clone, log)
    if rc:
        print(f"install failed ({rc}); log {log}", file=sys.stderr)
        return rc
    parts, total = [], install
    for command in COMMANDS.get(args.target, [f"make {args.target}"]):
        start = len(log.read_text().splitlines())
        seconds, rc = timed(command, clone, log)
        total += seconds
        lines = [line for line in log.read_text().splitlines()[start:] if line.strip()]
        if args.target == "run":  # the flow's closing lines: where its run is recorded
            lines = [line for line in lines if line.startswith("MLflow: ")]
        summary = lines[-1].strip("= ") if lines else ""
        print(f"{commit}: `{command}` {minutes(seconds)} (exit {rc})\n  last line: {summary}")
        what = "recorded at" if args.target == "run" else "last line"
        parts.append(f"`{command}` {minutes(seconds)} ({what}: `{summary}`)")
        if rc:
            break
    print(f"  install {minutes(install)}; log: {log}")
    if args.doc and rc == 0:
        body = (
            f"`python benchmarks/clean_clone.py {args.target}` on commit {commit}, "
            f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores{env_note}: a fresh clone, "
            f"`make {INSTALL[args.target]}` {minutes(install)} (pip's download cache warm), then "
            + ", then ".join(parts)
            + f"; total {minutes(total)}."
        )
        replace_section(Path(args.doc), f"make {args.target} from a clean clone", body, "Timings")
        print(f"wrote section 'make {args.target} from a clean clone' of {args.doc}")
    if not args.keep and rc == 0:
        subprocess.run(["rm", "-rf", str(work)], check=False)
    return rc


if __name__ == "__main__":
    sys.exit(main())
