"""Markdown helpers for the tables the pipeline and the benchmarks write into docs/."""

from __future__ import annotations

import re
from pathlib import Path

import polars as pl


def to_markdown(df: pl.DataFrame) -> str:
    """A GitHub-flavoured markdown table of `df`."""
    head = "| " + " | ".join(df.columns) + " |"
    sep = "|" + "|".join("---" for _ in df.columns) + "|"
    body = [
        "| " + " | ".join("" if v is None else str(v) for v in row) + " |" for row in df.iter_rows()
    ]
    return "\n".join([head, sep, *body])


def replace_section(path: Path, heading: str, body: str, title: str) -> str:
    """Put `## heading` + body into the markdown file at `path`, replacing an older copy.

    Other sections are kept, so several commands can each own a section of one page.
    """
    section = f"## {heading}\n\n{body.strip()}\n"
    text = path.read_text() if path.exists() else f"# {title}\n"
    pattern = re.compile(rf"^## {re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text).rstrip("\n") + "\n"
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return section
