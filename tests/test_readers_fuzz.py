"""The data readers never crash: whatever bytes a user's file holds, reading it gives tables or a
`ContractError` naming the file (and, for bad values, the column and rows), never another
exception (property tests with hypothesis)."""

from __future__ import annotations

import string
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_contracts.tables import ContractError
from gr2_core.data import read_interactions, read_items, read_users

READERS = {
    "interactions": (read_interactions, "user_id,item_id,timestamp,rating"),
    "items": (read_items, "item_id,title,year,categories"),
    "users": (read_users, "user_id,age,gender"),
}
SPECIAL = ["nan", "NaN", "inf", "-inf", "1e308", "1e309", "-0", "9" * 40, "", " ", '"', "'"]
CELL = st.one_of(
    st.sampled_from(SPECIAL),
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(alphabet=string.printable + "é漢\u200b\ufeff", max_size=12),
)
SEPARATORS = st.sampled_from([",", "\t", ";", "|", ",,", ""])
SETTINGS = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _read(kind: str, path: Path) -> None:
    reader, _ = READERS[kind]
    try:
        df = reader(path)
    except ContractError as err:
        assert str(path) in str(err)
        return
    assert df.height > 0


@pytest.mark.parametrize("kind", list(READERS))
@SETTINGS
@given(data=st.binary(max_size=400), suffix=st.sampled_from([".csv", ".tsv", ".parquet", ".txt"]))
def test_random_bytes_are_read_or_refused_by_name(kind, data, suffix):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{kind}{suffix}"
        path.write_bytes(data)
        _read(kind, path)


@pytest.mark.parametrize("kind", list(READERS))
@SETTINGS
@given(
    rows=st.lists(st.lists(CELL, min_size=0, max_size=6), min_size=0, max_size=8),
    sep=SEPARATORS,
    header=st.booleans(),
    bom=st.booleans(),
    crlf=st.booleans(),
)
def test_odd_values_separators_and_encodings_are_read_or_refused_by_name(
    kind, rows, sep, header, bom, crlf
):
    """The expected header (or none), then rows of special floats, huge integers, quotes,
    non-Latin text and zero-width characters under any separator, with or without a BOM and
    CRLF line ends."""
    _, columns = READERS[kind]
    lines = [columns.replace(",", sep or ",")] if header else []
    lines += [(sep or ",").join(r) for r in rows]
    text = ("\r\n" if crlf else "\n").join(lines)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{kind}.csv"
        path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
        _read(kind, path)


@pytest.mark.parametrize("kind", list(READERS))
def test_a_directory_or_a_missing_file_is_refused_by_name(kind, tmp_path):
    folder = tmp_path / "a-folder.csv"
    folder.mkdir()
    _read(kind, folder)
    reader, _ = READERS[kind]
    with pytest.raises(FileNotFoundError, match="gone.csv"):
        reader(tmp_path / "gone.csv")
