"""Why free answers fail: every SID a reranker wrote in its free lists, sorted into kinds.

Reads evaluation stages' `answers.parquet` (the free method's rows: `method` is the reranker's
name with no suffix) and the run's SID map, and counts per stage: answers valid (the filter's
rules), the first failed rule of the others, list lengths, lists that repeat a SID, and each
listed SID as one of the slate's, another catalogue item's, a digit permutation of one
(`<s_b_59>` for `<s_b_95>`: the two rows start from the same spelling embedding), well-formed
but no item's (levels of different items mixed), or malformed (not four level tokens between
the markers).

  python benchmarks/free_answers.py var/artifacts/sft_eval_grounded/<key> [...] \\
      --doc docs/traces_sft.md --heading "Free lists after SFT on grounded traces" --note "..."
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from collections import Counter
from pathlib import Path

import polars as pl

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data_contracts.manifest import Manifest  # noqa: E402
from gr2_core.report import replace_section, to_markdown  # noqa: E402

LEVEL = re.compile(r"<s_([a-z])_(\d+)>")
WELL_FORMED = re.compile(r"^<\|sid_begin\|>(<s_[a-z]_\d+>)+<\|sid_end\|>$")
KINDS = (
    "a slate SID",
    "another item's",
    "digit permutation of one",
    "well-formed, no item's",
    "malformed",
)


def digits_key(sid: str) -> tuple:
    return tuple((level, "".join(sorted(code))) for level, code in LEVEL.findall(sid))


def sid_kind(sid: str, slate: set[str], valid: set[str], permuted: set[tuple]) -> str:
    if sid in slate:
        return KINDS[0]
    if sid in valid:
        return KINDS[1]
    if not WELL_FORMED.match(sid) or len(LEVEL.findall(sid)) != len(next(iter(permuted))):
        return KINDS[4]
    return KINDS[2] if digits_key(sid) in permuted else KINDS[3]


def stage_row(folder: Path, sid_map: Path, slates: Path) -> dict:
    answers = pl.read_parquet(folder / "answers.parquet")
    names = [m for m in answers["method"].unique().to_list() if " " not in m and m != "preranker"]
    if len(names) != 1:
        raise SystemExit(f"{folder}: expected one reranker's free answers, found {names}")
    free = answers.filter(pl.col("method") == names[0])
    sid = dict(pl.read_parquet(sid_map).select("item_id", "sid").iter_rows())
    valid, permuted = set(sid.values()), {digits_key(s) for s in sid.values()}
    candidates = {
        f"{u}:{p}": {sid[c] for c in cands}
        for u, p, cands in pl.read_parquet(slates)
        .select("user_id", "position", "candidates")
        .iter_rows()
    }
    kinds, lengths, repeats = Counter(), Counter(), 0
    for job, text in free.select("job", "text").iter_rows():
        try:
            recs = json.loads(text)["recommendations"]
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
        lengths[len(recs)] += 1
        repeats += len(set(recs)) < len(recs)
        kinds.update(sid_kind(s, candidates[job], valid, permuted) for s in recs)
    listed = sum(kinds.values())
    reasons = free["reason"].value_counts(sort=True).iter_rows()
    return {
        "reranker": names[0],
        "free answers": free.height,
        "valid": int((free["reason"] == "accepted").sum()),
        "first failed rule": ", ".join(f"{r} {n}" for r, n in reasons if r != "accepted"),
        "list lengths": ", ".join(f"{k}: {v}" for k, v in sorted(lengths.items())),
        "lists with a repeat": repeats,
        **{k: f"{kinds[k]} ({kinds[k] / max(1, listed):.0%})" for k in KINDS},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stages", nargs="+", type=Path, help="evaluation stage folders")
    p.add_argument("--doc")
    p.add_argument("--heading", default="Free lists, SID by SID")
    p.add_argument("--note", default="", help="what the runs were (the command that made them)")
    args = p.parse_args()
    rows = []
    for folder in args.stages:
        manifest = Manifest.read(folder)
        if manifest is None:
            raise SystemExit(f"{folder}: not a finished stage (no manifest.json)")
        root = folder.parent.parent

        def upstream(stage: str, name: str, manifest=manifest, root=root) -> Path:
            return Manifest.read(root / stage / manifest.upstream[stage]).path(name)

        row = stage_row(
            folder, upstream("semantic_ids", "sid_map"), upstream("candidates", "slates")
        )
        rows.append({"stage": f"{folder.parent.name}/{folder.name}"} | row)
    table = to_markdown(pl.DataFrame(rows))
    print(table)
    if args.doc:
        shown = list(sys.argv)
        if "--note" in shown:  # the note is the prose after the command
            i = shown.index("--note")
            del shown[i : i + 2]
        body = f"Command: `python {shlex.join(shown)}`. {args.note}\n\n{table}"
        replace_section(Path(args.doc), args.heading, body, "Traces and SFT")


if __name__ == "__main__":
    main()
