"""The item catalogue every prompt is written from: per item its SID, inline name and caption."""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl


@dataclass(frozen=True)
class Catalogue:
    """Per item: its SID string, inline name `Title (year)`, and caption."""

    sid: dict[str, str]
    name: dict[str, str]
    caption: dict[str, str]

    @classmethod
    def build(cls, items: pl.DataFrame, sid_map: pl.DataFrame) -> Catalogue:
        sid = dict(zip(sid_map["item_id"].to_list(), sid_map["sid"].to_list(), strict=True))
        missing = [i for i in items["item_id"].to_list() if i not in sid]
        if missing:
            raise ValueError(f"{len(missing)} items have no SID (first: {missing[:3]})")
        name, caption = {}, {}
        years = items["year"].to_list() if "year" in items.columns else [None] * items.height
        cats = (
            items["categories"].to_list() if "categories" in items.columns else [[]] * items.height
        )
        for item, title, year, cat in zip(
            items["item_id"].to_list(), items["title"].to_list(), years, cats, strict=True
        ):
            name[item] = f"{title} ({year if year is not None else 'n/a'})"
            genres = ", ".join(cat or []) or "unknown"
            caption[item] = f"{name[item]} | {genres}"
        return cls(sid, name, caption)
