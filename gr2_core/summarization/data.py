"""(document, summary) pairs: ACLSum from its package, or any user JSONL; simulated ASR noise.

ACLSum ships 250 ACL papers (train/val/test = 100/50/100), each with three one-sentence expert
summaries (challenge, approach, outcome) and the sentences of its abstract, introduction and
conclusion; `paper_jsons/<id>.json` holds the S2ORC parse of the full paper. Two variants:

- `aspects`: abstract + introduction + conclusion -> each aspect summary (three pairs per paper,
  the aspect recorded on the pair so one model can learn all three);
- `abstract`: the body text (S2ORC paragraphs) -> the paper's abstract.

A user's own corpus (LCSTS, Gigaword, meeting transcripts, ...) is a JSONL file with one object
per line holding a document and a summary field (names configurable) and optionally `id`,
`aspect` and `split`.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the stage function's types; a served model imports none of them
    from data_contracts.ctc import SummaryDataConfig
    from gr2_core.output import Log, StageOutput

ASPECTS = ("challenge", "approach", "outcome")
SECTIONS = ("abstract", "introduction", "conclusion")
SPLITS = {"train": "train", "valid": "val", "test": "test"}


class SummaryDataError(ValueError):
    """A bad record: the message names the file, the line (or record id) and the field."""


@dataclass(frozen=True)
class SummaryPair:
    """One training or evaluation example."""

    id: str  # unique per pair: "<document id>" or "<document id>:<aspect>"
    doc_id: str
    split: str  # train / valid / test
    aspect: str  # "" when the corpus has none
    document: str
    summary: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def aclsum_dir() -> Path:
    from gr2_core.data import package_dir  # imported here: a served model needs no polars

    return package_dir("aclsum") / "dataset"


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _body(doc_id: str, folder: Path) -> str:
    path = folder / "paper_jsons" / f"{doc_id}.json"
    paper = json.loads(path.read_text(encoding="utf-8"))
    paragraphs = (paper.get("pdf_parse") or {}).get("body_text") or []
    return _clean(" ".join(p.get("text", "") for p in paragraphs))


def load_aclsum(
    split: str, variant: str = "aspects", folder: Path | None = None
) -> list[SummaryPair]:
    """The pairs of one ACLSum split (`train`, `valid` or `test`)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
    folder = folder or aclsum_dir()
    path = folder / f"{SPLITS[split]}.jsonl"
    pairs: list[SummaryPair] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        doc_id = rec["id"]
        if variant == "aspects":
            sents = rec["sentences"]
            document = _clean(" ".join(s for sec in SECTIONS for s in sents.get(sec, [])))
            for aspect in ASPECTS:
                summary = _clean(rec["summary"][aspect])
                pairs.append(
                    SummaryPair(f"{doc_id}:{aspect}", doc_id, split, aspect, document, summary)
                )
        elif variant == "abstract":
            abstract = _clean(" ".join(rec["sentences"]["abstract"]))
            pairs.append(SummaryPair(doc_id, doc_id, split, "", _body(doc_id, folder), abstract))
        else:
            raise ValueError(
                f"unknown ACLSum variant {variant!r}; expected 'aspects' or 'abstract'"
            )
    check_pairs(pairs, str(path))
    return pairs


def load_jsonl(
    path: str | Path,
    split: str | None = None,
    document_field: str = "document",
    summary_field: str = "summary",
) -> list[SummaryPair]:
    """Pairs from a user JSONL file. A record's own `split` wins over `split` (default train);
    `id` defaults to the line number. Every problem names the file, the line and the field."""
    path = Path(path)
    raw = path.read_bytes()
    pairs: list[SummaryPair] = []
    for line_no, line in enumerate(raw.splitlines(), 1):
        where = f"{path}, line {line_no}"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as err:
            raise SummaryDataError(
                f"{where}: not valid UTF-8 (byte {err.start}: "
                f"{line[err.start : err.start + 4]!r}); re-encode the file as UTF-8"
            ) from None
        if not text.strip():
            continue
        try:
            rec = json.loads(text)
        except json.JSONDecodeError as err:
            raise SummaryDataError(f"{where}: not a JSON object ({err.msg})") from None
        if not isinstance(rec, dict):
            raise SummaryDataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        for name in (document_field, summary_field):
            if not isinstance(rec.get(name), str):
                raise SummaryDataError(f"{where}: field {name!r} missing or not a string")
        rid = str(rec.get("id", line_no))
        pairs.append(
            SummaryPair(
                rid,
                str(rec.get("doc_id", rid)),
                str(rec.get("split", split or "train")),
                str(rec.get("aspect", "")),
                _clean(rec[document_field]),
                _clean(rec[summary_field]),
            )
        )
    check_pairs(pairs, str(path))
    return pairs


def check_pairs(pairs: list[SummaryPair], source: str) -> None:
    """Empty documents or summaries, duplicate ids and unknown splits, all named at once."""
    problems = []
    seen: set[str] = set()
    for p in pairs:
        if not p.document:
            problems.append(f"record {p.id!r}: empty document")
        if not p.summary:
            problems.append(f"record {p.id!r}: empty summary")
        if p.split not in SPLITS:
            problems.append(f"record {p.id!r}: split {p.split!r} is not one of {sorted(SPLITS)}")
        if p.id in seen:
            problems.append(f"record {p.id!r}: duplicate id")
        seen.add(p.id)
    if not pairs:
        problems.append("no records")
    if problems:
        shown = "\n  - ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise SummaryDataError(f"{source}: {len(problems)} problem(s)\n  - {shown}{more}")


def truncate_words(text: str, max_words: int) -> str:
    """The first `max_words` whitespace words (every system sees the same truncated input)."""
    words = text.split()
    return text if len(words) <= max_words else " ".join(words[:max_words])


def asr_noise(text: str, rate: float, seed: int, vocabulary: list[str] | None = None) -> str:
    """Simulated ASR errors: each word is deleted, substituted or followed by an inserted word,
    each with probability rate/3 (seeded, so the same text and seed give the same noise).
    Substitutes and insertions are drawn from `vocabulary` (default: the text's own words).
    This is a simulation of recognition errors, not real ASR output.

    >>> asr_noise("the cat sat on the mat", 0.0, 1)
    'the cat sat on the mat'
    >>> asr_noise("the cat sat on the mat", 0.5, 1) == asr_noise("the cat sat on the mat", 0.5, 1)
    True
    """
    if not 0 <= rate <= 1:
        raise ValueError(f"noise rate must be in [0, 1], got {rate}")
    words = text.split()
    if rate == 0 or not words:
        return text
    rng = random.Random(f"{seed}:{text[:64]}:{len(words)}")
    pool = vocabulary or words
    out: list[str] = []
    for w in words:
        u = rng.random()
        if u < rate / 3:
            continue  # deletion
        if u < 2 * rate / 3:
            out.append(rng.choice(pool))  # substitution
            continue
        out.append(w)
        if u < rate:
            out.append(rng.choice(pool))  # insertion
    return " ".join(out) if out else words[0]


def cap_pairs(pairs: list[SummaryPair], n: int | None, seed: int) -> list[SummaryPair]:
    """At most n pairs, whole documents first (a seeded choice of documents)."""
    if n is None or len(pairs) <= n:
        return pairs
    docs = list(dict.fromkeys(p.doc_id for p in pairs))
    random.Random(seed).shuffle(docs)
    rank = {d: i for i, d in enumerate(docs)}
    return sorted(pairs, key=lambda p: (rank[p.doc_id], p.id))[:n]


def read_pairs(path: Path, split: str) -> list[SummaryPair]:
    """The pairs of one split from the `ctc_data` stage's table."""
    import polars as pl

    df = pl.read_parquet(path).filter(pl.col("split") == split)
    return [SummaryPair(**row) for row in df.iter_rows(named=True)]


def run(cfg: SummaryDataConfig, out: Path, log: Log | None = None) -> StageOutput:
    """Stage `ctc_data`: read and check the (document, summary) pairs of every split, capped as
    configured, into `pairs.parquet`."""
    import polars as pl

    from data_contracts.summaries import SUMMARY_PAIRS
    from data_contracts.tables import validate
    from gr2_core.output import InputTable, StageOutput

    if cfg.source == "jsonl":
        pairs = load_jsonl(cfg.jsonl_path, None, cfg.document_field, cfg.summary_field)
        source = str(cfg.jsonl_path)
    else:
        pairs = [p for s in SPLITS for p in load_aclsum(s, cfg.aclsum_variant)]
        source = f"aclsum ({cfg.aclsum_variant})"
    by_split = {s: [p for p in pairs if p.split == s] for s in SPLITS}
    by_split["train"] = cap_pairs(by_split["train"], cfg.max_train_pairs, cfg.seed)
    for s in ("valid", "test"):
        by_split[s] = cap_pairs(by_split[s], cfg.max_eval_pairs, cfg.seed)
    missing = [s for s in ("train", "test") if not by_split[s]]
    if missing:
        raise ValueError(f"{source}: no {' or '.join(missing)} pairs (record field 'split')")
    rows = [p.to_dict() for s in SPLITS for p in by_split[s]]
    df = validate(SUMMARY_PAIRS, pl.DataFrame(rows), f"{source} (pairs)")
    df.write_parquet(out / "pairs.parquet")
    metrics = {f"pairs_{s}": float(len(v)) for s, v in by_split.items()}
    words = df.select(
        pl.col("document").str.split(" ").list.len().mean().alias("document_words"),
        pl.col("summary").str.split(" ").list.len().mean().alias("summary_words"),
    )
    metrics |= {k: float(v) for k, v in words.row(0, named=True).items()}
    if log:
        log.info("ctc_data: %s", metrics)
    dataset = InputTable(df, f"summaries-{cfg.source}", source, "training")
    return StageOutput({"pairs": "pairs.parquet"}, metrics, datasets=[dataset])
