"""Evaluation of a mid-trained student: next-item retrieval by constrained beam search, captions.

Next item: the sequential-task prompt of a user's history, then beam search (beam 10 by default)
over the trie of every item's SID, i.e. the whole catalogue; the rank of the target among the
returned beams gives Recall@K and NDCG@K. Every returned beam is checked to be a valid SID and
the beams of one prompt to be distinct: both rates are reported and must be 0.
Captions: greedy decoding after `SID + Caption:`; accuracy is the exact title match rate.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch
from tqdm.auto import tqdm

from data_contracts.config import EvalConfig, MidtrainConfig
from gr2_core.catalogue import Catalogue
from gr2_core.constrained import SIDTrie, constrained_generate
from gr2_core.midtrain import caption_prompt, eval_prompts, parse_title, sequential_prompt
from gr2_core.output import Log, StageOutput


def sid_trie(cat: Catalogue, tok) -> tuple[SIDTrie, dict[tuple[int, ...], str]]:
    """The trie over every item's SID tokens, and token sequence -> item id."""
    seqs = {tuple(tok.encode(s, add_special_tokens=False)): item for item, s in cat.sid.items()}
    return SIDTrie(seqs), seqs


@torch.inference_mode()
def next_item_ranks(
    model,
    tok,
    cat: Catalogue,
    rows: pl.DataFrame,
    num_beams: int,
    batch_size: int,
    max_length: int,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, object]:
    """Per row: the target's rank among the beams (None if absent); invalid and duplicate rates."""
    trie, item_of = sid_trie(cat, tok)
    depth = max(len(s) for s in item_of)
    model.eval()
    ranks: list[int | None] = []
    invalid = duplicate = total = 0
    histories, targets = rows["history"].to_list(), rows["target"].to_list()
    bar = tqdm(total=len(targets), desc="next-item beam search", unit="user")
    for start in range(0, len(targets), batch_size):
        prompts = [
            tok.encode(sequential_prompt(h, cat), add_special_tokens=False)[-max_length:]
            for h in histories[start : start + batch_size]
        ]
        beams = constrained_generate(
            model, prompts, trie, tok.eos_token_id, num_beams=num_beams, max_new_tokens=depth + 1
        )
        for target, found in zip(targets[start : start + batch_size], beams, strict=True):
            items = [item_of.get(tuple(b)) for b in found]
            total += len(found)
            invalid += sum(i is None for i in items)
            duplicate += len(found) - len(set(map(tuple, found)))
            ranks.append(items.index(target) + 1 if target in items else None)
        bar.update(len(prompts))
        if progress:
            progress(len(ranks), len(targets))
    bar.close()
    return {
        "ranks": ranks,
        "invalid_rate": invalid / max(total, 1),
        "duplicate_rate": duplicate / max(total, 1),
    }


@torch.inference_mode()
def caption_accuracy(
    model, tok, cat: Catalogue, items: Sequence[str], batch_size: int, max_new_tokens: int = 32
) -> tuple[float, list[dict[str, str]]]:
    """Exact title match rate of greedy captions, and the generated captions."""
    model.eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out_rows: list[dict[str, str]] = []
    hits = 0
    for start in range(0, len(items), batch_size):
        chunk = list(items[start : start + batch_size])
        prompts = [tok.encode(caption_prompt(i, cat), add_special_tokens=False) for i in chunk]
        width = max(map(len, prompts))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        gen = model.generate(
            ids.to(model.device),
            attention_mask=mask.to(model.device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=pad,
        )
        for item, seq in zip(chunk, gen[:, width:].tolist(), strict=True):
            text = tok.decode(seq, skip_special_tokens=True)
            expected = cat.name[item].rsplit(" (", 1)[0]
            ok = parse_title(text) == expected
            hits += ok
            out_rows.append({"item_id": item, "expected": cat.caption[item], "generated": text})
    return hits / max(len(items), 1), out_rows


def preranker_ranks(rows: pl.DataFrame, slates: pl.DataFrame, split: str) -> np.ndarray:
    """The pre-ranker's rank of each row's target (0 if outside its slate), for the same users."""
    joined = rows.join(
        slates.filter(pl.col("split") == split).select("user_id", "target_rank"),
        on="user_id",
        how="left",
    )
    return rank_array(joined["target_rank"].to_list())


def rank_array(ranks: Sequence[int | None]) -> np.ndarray:
    return np.array([r or 0 for r in ranks], dtype=np.int64)


LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class MidtrainEvalInputs:
    model: Path  # the midtrain stage's model folder
    heldout_items: Path  # the midtrain stage's captioning hold-out
    items: Path  # the data stage's items
    sid_map: Path  # the semantic-ID stage's SID map
    sequences: Path  # the split stage's sequences
    slates: Path  # the candidates stage's slates (the pre-ranker's ranks of the same targets)
    title: str  # the report's heading
    bootstrap: EvalConfig  # interval settings (`evaluation` section)


def run(inputs: MidtrainEvalInputs, cfg: MidtrainConfig, out: Path, log: Log = LOG) -> StageOutput:
    """Stage `midtrain_eval`: next-item R@K/NDCG@K over the whole catalogue by constrained beam
    search against the pre-ranker on the same users; caption accuracy on held-out and trained
    items."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gr2_core.baselines import format_table
    from gr2_core.metrics import metrics_table
    from gr2_core.report import to_markdown

    ev = inputs.bootstrap
    torch.set_num_threads(cfg.num_threads)
    tok = AutoTokenizer.from_pretrained(inputs.model)
    model = AutoModelForCausalLM.from_pretrained(inputs.model)
    if torch.cuda.is_available():
        model = model.to("cuda", dtype=torch.bfloat16)
    cat = Catalogue.build(pl.read_parquet(inputs.items), pl.read_parquet(inputs.sid_map))
    sequences = pl.read_parquet(inputs.sequences)
    slates = pl.read_parquet(inputs.slates)
    tables, metrics = [], {}
    ks = [k for k in (1, 5, 10) if k <= cfg.num_beams]
    ndcg_ks = [k for k in (5, 10) if k <= cfg.num_beams]
    for split in ("valid", "test"):
        rows = eval_prompts(sequences, split, cfg.history_items, cfg.eval_users, cfg.seed)

        def progress(done: int, total: int, s: str = split) -> None:
            if done % max(1, total // 5) < cfg.eval_batch_size or done == total:
                log.info("midtrain_eval %s: %d/%d users", s, done, total)

        found = next_item_ranks(
            model, tok, cat, rows, cfg.num_beams, cfg.eval_batch_size, cfg.max_length, progress
        )
        metrics[f"{split}/invalid_rate"] = found["invalid_rate"]
        metrics[f"{split}/duplicate_rate"] = found["duplicate_rate"]
        for method, ranks in (
            (f"student beam{cfg.num_beams}", rank_array(found["ranks"])),
            ("preranker (SASRec)", preranker_ranks(rows, slates, split)),
        ):
            t = metrics_table(
                method, split, ranks, ks, ndcg_ks, ev.bootstrap_samples, ev.confidence, ev.seed
            ).filter((pl.col("mode") == "end_to_end") & (pl.col("metric") != "coverage"))
            tables.append(t)
    table = pl.concat(tables)
    heldout = json.loads(inputs.heldout_items.read_text())[: cfg.caption_eval_items]
    seen = sorted(set(cat.sid) - set(heldout))[: len(heldout)]
    captions = []
    for name, items in (("heldout", heldout), ("trained", seen)):
        if not items:
            continue
        acc, rows_out = caption_accuracy(model, tok, cat, items, cfg.eval_batch_size)
        metrics[f"caption_accuracy/{name}"] = acc
        captions += [r | {"set": name} for r in rows_out]
    for r in table.iter_rows(named=True):
        metrics[f"{r['split']}/{r['method'].split()[0]}.{r['metric']}"] = r["value"]
    table.write_parquet(out / "metrics.parquet")
    captions_table = pl.DataFrame(captions)
    captions_table.write_parquet(out / "captions.parquet")
    caption_line = ", ".join(
        f"{k.split('/')[1]} {v:.3f}" for k, v in metrics.items() if k.startswith("caption")
    )
    markdown = (
        f"# {inputs.title}\n\nvalue [95% bootstrap CI]; {cfg.eval_users} sampled users per "
        f"split; invalid-SID rate {metrics['test/invalid_rate']:.3f}, duplicate-beam rate "
        f"{metrics['test/duplicate_rate']:.3f}; caption exact-title accuracy: "
        f"{caption_line}\n\n{to_markdown(format_table(table))}\n"
    )
    (out / "metrics.md").write_text(markdown)
    log.info("midtrain_eval:\n%s", markdown)
    files = {"metrics": "metrics.parquet", "captions": "captions.parquet", "report": "metrics.md"}
    return StageOutput(
        files, metrics, texts={"metrics.md": markdown}, tables={"captions.csv": captions_table}
    )
