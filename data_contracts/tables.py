"""pandera-polars schemas for every table that crosses a stage boundary.

Validation is always lazy (`lazy=True`) so one report lists every problem, and problems are
rendered by `ContractError` with the file, the column and the offending rows, so a user can fix a
file in one pass.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pandera.polars as pa
import polars as pl
from pandera.errors import SchemaErrors

SCHEMA_VERSION = "1"
SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class Problem:
    """One problem in one column of one file.

    `rows` are 0-based data-row indices (header excluded); `line` numbers for text files are
    rows + 2 (1-based, after the header line).
    """

    column: str | None
    message: str
    rows: tuple[int, ...] = ()
    values: tuple[str, ...] = ()

    def render(self, text_file: bool) -> str:
        where = f"column '{self.column}'" if self.column else "table"
        out = f"{where}: {self.message}"
        if self.rows:
            label = "lines" if text_file else "rows"
            shown = [r + 2 if text_file else r for r in self.rows[:10]]
            more = f" (+{len(self.rows) - 10} more)" if len(self.rows) > 10 else ""
            out += f"; {label} {', '.join(map(str, shown))}{more}"
        if self.values:
            vals = ", ".join(repr(v) for v in self.values[:5])
            more = f" (+{len(self.values) - 5} more)" if len(self.values) > 5 else ""
            out += f"; values {vals}{more}"
        return out


@dataclass
class ContractError(ValueError):
    """A file (or derived table) that breaks its contract; lists every problem found."""

    source: str
    problems: list[Problem] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__(str(self))

    @property
    def text_file(self) -> bool:
        return Path(self.source).suffix.lower() in {".csv", ".tsv", ".inter", ".item", ".user"}

    def __str__(self) -> str:
        lines = [f"{self.source}: {len(self.problems)} problem(s)"]
        lines += [f"  - {p.render(self.text_file)}" for p in self.problems]
        return "\n".join(lines)


def problems_from_pandera(err: SchemaErrors) -> list[Problem]:
    """Group pandera's failure cases by (column, check) into `Problem`s."""
    fc = err.failure_cases
    if not isinstance(fc, pl.DataFrame):  # pragma: no cover - pandas backend not used here
        fc = pl.from_pandas(fc)
    problems: list[Problem] = []
    grouped = fc.group_by(["column", "check"], maintain_order=True).agg(
        pl.col("index").drop_nulls().unique().sort(), pl.col("failure_case").cast(pl.Utf8)
    )
    for column, check, rows, values in grouped.iter_rows():
        if check == "column_in_dataframe":
            message, values = "missing column", []
        elif check == "not_nullable":
            message = "null values"
        elif check == "field_uniqueness":
            message = "duplicate values"
        elif check.startswith("dtype("):
            message = f"wrong dtype, expected {check[6:-1]}, got {values[0] if values else '?'}"
            values = []
        else:
            message = f"failed check {check}"
        uniq_vals = tuple(dict.fromkeys(v for v in values if v is not None and v != "null"))
        problems.append(Problem(column, message, tuple(int(r) for r in rows), uniq_vals))
    return problems


def validate(schema: pa.DataFrameSchema, df: pl.DataFrame, source: str) -> pl.DataFrame:
    """Validate `df` against `schema`, raising `ContractError` that names `source`."""
    try:
        return schema.validate(df, lazy=True)
    except SchemaErrors as err:
        raise ContractError(source, problems_from_pandera(err)) from None


def _list(inner: pl.DataType = pl.Utf8) -> pl.DataType:
    return pl.List(inner)


INTERACTIONS = pa.DataFrameSchema(
    {
        "user_id": pa.Column(pl.Utf8, nullable=False),
        "item_id": pa.Column(pl.Utf8, nullable=False),
        "timestamp": pa.Column(pl.Int64, nullable=False, checks=pa.Check.ge(0)),
        "rating": pa.Column(pl.Float64, nullable=True, required=False),
    },
    strict=False,
    name="interactions",
)

ITEMS = pa.DataFrameSchema(
    {
        "item_id": pa.Column(pl.Utf8, nullable=False, unique=True),
        "title": pa.Column(pl.Utf8, nullable=False),
        "year": pa.Column(pl.Int64, nullable=True, required=False),
        "categories": pa.Column(_list(), nullable=True, required=False),
    },
    strict=False,
    name="items",
)

USERS = pa.DataFrameSchema(
    {"user_id": pa.Column(pl.Utf8, nullable=False, unique=True)},
    strict=False,
    name="users",
)

SEQUENCES = pa.DataFrameSchema(
    {
        "user_id": pa.Column(pl.Utf8, nullable=False, unique=True),
        "items": pa.Column(_list(), nullable=False),
        "timestamps": pa.Column(_list(pl.Int64), nullable=False),
        "n": pa.Column(pl.Int64, nullable=False, checks=pa.Check.ge(3)),
    },
    strict=True,
    name="sequences",
)

SAMPLES = pa.DataFrameSchema(
    {
        "user_id": pa.Column(pl.Utf8, nullable=False),
        "position": pa.Column(pl.Int64, nullable=False, checks=pa.Check.ge(1)),
        "split": pa.Column(pl.Utf8, nullable=False, checks=pa.Check.isin(SPLITS)),
        "history": pa.Column(_list(), nullable=False),
        "target": pa.Column(pl.Utf8, nullable=False),
    },
    strict=True,
    unique=["user_id", "position"],
    name="samples",
)

SLATES = pa.DataFrameSchema(
    {
        "user_id": pa.Column(pl.Utf8, nullable=False),
        "position": pa.Column(pl.Int64, nullable=False, checks=pa.Check.ge(1)),
        "split": pa.Column(pl.Utf8, nullable=False, checks=pa.Check.isin(SPLITS)),
        "history": pa.Column(_list(), nullable=False),
        "target": pa.Column(pl.Utf8, nullable=False),
        "candidates": pa.Column(_list(), nullable=False),
        "scores": pa.Column(_list(pl.Float32), nullable=False),
        "target_rank": pa.Column(pl.Int64, nullable=True, checks=pa.Check.ge(1)),
    },
    strict=True,
    unique=["user_id", "position"],
    name="slates",
)

SID_MAP = pa.DataFrameSchema(
    {
        "item_id": pa.Column(pl.Utf8, nullable=False, unique=True),
        "codes": pa.Column(_list(pl.Int64), nullable=False),
        "sid": pa.Column(
            pl.Utf8,
            nullable=False,
            unique=True,
            checks=pa.Check.str_matches(r"^<\|sid_begin\|>(<s_[a-z]_\d+>)+<\|sid_end\|>$"),
        ),
        "version": pa.Column(pl.Utf8, nullable=False),
    },
    strict=True,
    name="sid_map",
)

METRICS = pa.DataFrameSchema(
    {
        "method": pa.Column(pl.Utf8, nullable=False),
        "split": pa.Column(pl.Utf8, nullable=False, checks=pa.Check.isin(SPLITS)),
        "mode": pa.Column(
            pl.Utf8, nullable=False, checks=pa.Check.isin(["conditional", "end_to_end"])
        ),
        "metric": pa.Column(pl.Utf8, nullable=False),
        "value": pa.Column(pl.Float64, nullable=False),
        "ci_low": pa.Column(pl.Float64, nullable=False),
        "ci_high": pa.Column(pl.Float64, nullable=False),
        "n": pa.Column(pl.Int64, nullable=False),
    },
    strict=True,
    name="metrics",
)


def require_columns(df: pl.DataFrame, columns: Iterable[str], source: str) -> None:
    """Raise `ContractError` listing every required column missing from `df`."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        import difflib

        problems = []
        for col in missing:
            close = difflib.get_close_matches(col, df.columns, n=1, cutoff=0.6)
            hint = f" (found '{close[0]}': misnamed?)" if close else ""
            problems.append(Problem(col, f"missing column{hint}; columns present: {df.columns}"))
        raise ContractError(source, problems)
