"""Loaders on the real packaged MovieLens files, and every bad-input case of the contract.

Each bad input is checked twice: through the pipeline's loading functions and through
`gr2 validate`; both must name the file and the offending column or rows.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from data_contracts.config import DataConfig
from data_contracts.tables import ContractError
from flows.cli import main as gr2
from gr2_core.data import (
    DataErrors,
    k_core,
    load_tables,
    preprocess,
    resolve_sources,
)
from tests.conftest import write_csv


def _load(
    inter: Path, items: Path, users: Path | None = None, min_user: int = 1, min_item: int = 1
):
    cfg = DataConfig(
        dataset="custom",
        interactions_path=str(inter),
        items_path=str(items),
        users_path=str(users) if users else None,
        min_user_interactions=min_user,
        min_item_interactions=min_item,
    )
    src = resolve_sources(cfg)
    return preprocess(load_tables(src), cfg, str(src.interactions))


def test_movielens_100k_from_package():
    cfg = DataConfig(dataset="ml-100k")
    src = resolve_sources(cfg)
    assert "site-packages" in str(src.interactions) or "dist-packages" in str(src.interactions)
    tables = preprocess(load_tables(src), cfg, str(src.interactions))
    inter = tables.interactions
    assert (
        inter.height == 99287 and tables.items.height == 1349 and inter["user_id"].n_unique() == 943
    )
    # 5-core holds after filtering
    assert inter.group_by("item_id").len()["len"].min() >= 5
    assert inter.group_by("user_id").len()["len"].min() >= 5
    # chronological, ties by source row
    for _, grp in inter.group_by("user_id"):
        ts = grp["timestamp"].to_list()
        rows = grp["source_row"].to_list()
        assert all((a, b) <= (c, d) for a, b, c, d in zip(ts, rows, ts[1:], rows[1:], strict=False))
    assert tables.items["categories"].dtype == pl.List(pl.Utf8)


def test_movielens_1m_reads_titles_with_quotes_and_commas():
    src = resolve_sources(DataConfig(dataset="ml-1m"))
    tables = load_tables(src)
    assert tables.items.height == 3883
    ids = tables.items["item_id"]
    assert "$1,000,000 Duck (1971)" in ids.to_list()
    assert ids.str.starts_with("'").sum() > 0
    assert tables.users is not None and {"age", "gender", "occupation"} <= set(tables.users.columns)


def test_valid_custom_files(tiny_files):
    inter, items, users = tiny_files
    tables = _load(inter, items, users, 5, 5)
    assert tables.interactions.height == 36
    assert tables.items["categories"][0].to_list() == ["Drama", "Comedy"]
    assert (
        gr2(
            ["validate", "--interactions", str(inter), "--items", str(items), "--users", str(users)]
        )
        == 0
    )


def test_tie_rule_is_source_order(tmp_path):
    items = write_csv(tmp_path / "items.csv", "item_id,title", [f"i{j},T{j}" for j in range(4)])
    inter = write_csv(
        tmp_path / "i.csv", "user_id,item_id,timestamp", ["u,i3,5", "u,i1,5", "u,i2,1", "u,i0,5"]
    )
    tables = _load(inter, items)
    assert tables.interactions["item_id"].to_list() == ["i2", "i3", "i1", "i0"]


def test_k_core_repeats_until_stable():
    # item c has 1 user; dropping it leaves user 3 with 1 item, so user 3 must go too
    df = pl.DataFrame(
        {"user_id": ["1", "1", "2", "2", "3", "3"], "item_id": ["a", "b", "a", "b", "a", "c"]}
    )
    out = k_core(df, min_user=2, min_item=2)
    assert sorted(out.select("user_id", "item_id").iter_rows()) == [
        ("1", "a"),
        ("1", "b"),
        ("2", "a"),
        ("2", "b"),
    ]


# ---------------------------------------------------------------------------- bad input


def _files(
    tmp_path: Path,
    inter_rows=None,
    inter_header="user_id,item_id,timestamp",
    item_rows=None,
    item_header="item_id,title",
):
    items = write_csv(
        tmp_path / "items.csv",
        item_header,
        item_rows if item_rows is not None else [f"i{j},T{j}" for j in range(3)],
    )
    rows = (
        inter_rows
        if inter_rows is not None
        else [f"u{u},i{j},{100 * u + j}" for u in range(3) for j in range(3)]
    )
    inter = write_csv(tmp_path / "interactions.csv", inter_header, rows)
    return inter, items


def _case_missing_file(tmp_path):
    inter, items = _files(tmp_path)
    inter.unlink()
    return inter, items, ["interactions.csv", "not found"]


def _case_missing_column(tmp_path):
    inter, items = _files(tmp_path, ["u0,i0", "u0,i1"], "user_id,item_id")
    return inter, items, ["interactions.csv", "column 'timestamp'", "missing column"]


def _case_misnamed_column(tmp_path):
    inter, items = _files(tmp_path, inter_header="user_id,item_id,timestmp")
    return inter, items, ["interactions.csv", "column 'timestamp'", "found 'timestmp'"]


def _case_wrong_dtype(tmp_path):
    rows = ["u0,i0,100", "u0,i1,yesterday", "u0,i2,102"]
    inter, items = _files(tmp_path, rows)
    return (
        inter,
        items,
        ["interactions.csv", "column 'timestamp'", "wrong dtype", "lines 3", "yesterday"],
    )


def _case_null_timestamp(tmp_path):
    rows = ["u0,i0,100", "u0,i1,101", "u0,i2,"]
    inter, items = _files(tmp_path, rows)
    return inter, items, ["interactions.csv", "column 'timestamp'", "null values", "lines 4"]


def _case_duplicate_items(tmp_path):
    inter, items = _files(tmp_path, item_rows=["i0,A", "i1,B", "i2,C", "i1,B again"])
    return inter, items, ["items.csv", "column 'item_id'", "duplicate", "lines 3, 5", "'i1'"]


def _case_unknown_items(tmp_path):
    rows = ["u0,i0,100", "u0,zzz,101", "u0,i2,102"]
    inter, items = _files(tmp_path, rows)
    return (
        inter,
        items,
        ["interactions.csv", "column 'item_id'", "absent from the items file", "'zzz'", "lines 3"],
    )


def _case_empty_file(tmp_path):
    inter, items = _files(tmp_path)
    items.write_text("")
    return inter, items, ["items.csv", "empty file"]


def _case_short_user(tmp_path):
    rows = [f"u{u},i{j},{100 * u + j}" for u in range(3) for j in range(3)] + ["u9,i0,5", "u9,i1,6"]
    inter, items = _files(tmp_path, rows)
    return (
        inter,
        items,
        ["interactions.csv", "column 'user_id'", "fewer than 3", "u9 (2)", "lines 11, 12"],
    )


def _case_not_utf8(tmp_path):
    inter, items = _files(tmp_path)
    items.write_bytes(b"item_id,title\ni0,Caf\xe9\ni1,B\ni2,C\n")
    return inter, items, ["items.csv", "not UTF-8", "line 2"]


CASES = [
    _case_missing_file,
    _case_missing_column,
    _case_misnamed_column,
    _case_wrong_dtype,
    _case_null_timestamp,
    _case_duplicate_items,
    _case_unknown_items,
    _case_empty_file,
    _case_short_user,
    _case_not_utf8,
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__[6:])
def test_bad_input_pipeline(case, tmp_path):
    inter, items, expected = case(tmp_path)
    with pytest.raises((ContractError, DataErrors, FileNotFoundError)) as info:
        _load(inter, items)
    message = str(info.value)
    for part in expected:
        assert part in message, f"{part!r} not in:\n{message}"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__[6:])
def test_bad_input_validate_command(case, tmp_path, capsys):
    inter, items, expected = case(tmp_path)
    code = gr2(
        [
            "validate",
            "--interactions",
            str(inter),
            "--items",
            str(items),
            "--min-user-interactions",
            "1",
            "--min-item-interactions",
            "1",
        ]
    )
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err  # 1: the data failed the check
    for part in expected:
        assert part in err, f"{part!r} not in:\n{err}"


def test_problems_in_several_files_reported_together(tmp_path):
    inter, items = _files(tmp_path, ["u0,i0,x"], item_rows=["i0,A", "i0,B"])
    with pytest.raises(DataErrors) as info:
        _load(inter, items)
    text = str(info.value)
    assert "interactions.csv" in text and "items.csv" in text
    assert "wrong dtype" in text and "duplicate" in text


def test_parquet_with_wrong_dtype(tmp_path):
    items = tmp_path / "items.parquet"
    pl.DataFrame({"item_id": ["a", "b"], "title": ["A", "B"]}).write_parquet(items)
    inter = tmp_path / "inter.parquet"
    pl.DataFrame(
        {"user_id": ["u"] * 3, "item_id": ["a", "b", "a"], "timestamp": ["1", "2", "soon"]}
    ).write_parquet(inter)
    with pytest.raises(ContractError) as info:
        _load(inter, items)
    assert "inter.parquet" in str(info.value) and "rows 2" in str(info.value)
