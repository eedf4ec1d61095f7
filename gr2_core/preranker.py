"""SASRec-style pre-ranker and faiss candidate generation.

The model is a causal transformer over item-id sequences (Kang & McAuley, 2018) trained with a
full softmax over the catalogue at every position of a window (the "CE" variant, which beats the
original one-negative BCE on MovieLens and costs little with a few thousand items). Training
sequences are cut into right-aligned windows of `max_len + 1` items from the end, so one pass
over a window trains every position in it; this is why an epoch here is much cheaper than
RecBole's, which materialises every prefix as its own sample.

The user representation at a position is the last hidden state over its (capped) history; the
item representations are the input embedding rows (tied weights), indexed with faiss
`IndexFlatIP`; candidates are the top `slate_size` items by inner product, excluding every item
already in the user's prefix.

Early stopping needs a position that is out of sample twice: the pre-ranker must not train on it,
and it must not be a reranker sample, or choosing the epoch on it fits the pre-ranker to the very
slates it later produces. The split gives the pre-ranker each user's items[: n-m]; reranker
samples are positions n-m..n-1. `hold_out_monitor` takes one more item off every prefix: the
model trains on items[: n-m-1] and is monitored on predicting s_{n-m-1} from items[: n-m-1], a
position that is neither (the last item of the prefix, before the first reranker sample). The
cost is one training transition per user.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import polars as pl
import torch
from torch import nn
from tqdm.auto import tqdm

from data_contracts.config import PrerankerConfig
from data_contracts.tables import SLATES, validate
from gr2_core import plots
from gr2_core.output import Log, OnMetrics, StageOutput

LOG = logging.getLogger(__name__)

PAD = 0
Monitor = tuple[list[list[int]], list[int]]  # (histories, targets) scored by early stopping


class SASRec(nn.Module):
    """Causal self-attention over item sequences; item ids start at 1, 0 is padding."""

    def __init__(self, num_items: int, cfg: PrerankerConfig):
        super().__init__()
        self.cfg = cfg
        self.num_items = num_items
        self.item_emb = nn.Embedding(num_items + 1, cfg.hidden_dim, padding_idx=PAD)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.hidden_dim)
        layer = nn.TransformerEncoderLayer(
            cfg.hidden_dim,
            cfg.num_heads,
            dim_feedforward=cfg.hidden_dim * 4,
            dropout=cfg.dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.hidden_dim)
        self.drop = nn.Dropout(cfg.dropout)
        nn.init.normal_(self.item_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb.weight, std=0.02)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """seq: (B, L) right-aligned item ids -> hidden states (B, L, D)."""
        b, length = seq.shape
        pos = torch.arange(length, device=seq.device).unsqueeze(0)  # (1, L)
        x = self.item_emb(seq) * math.sqrt(self.cfg.hidden_dim) + self.pos_emb(pos)
        x = self.drop(x * (seq != PAD).unsqueeze(-1))
        # additive mask (B*H, L, L): causal, and no attention to padding (except to itself,
        # which keeps padded query rows finite; their outputs are never used)
        causal = torch.ones(length, length, dtype=torch.bool, device=seq.device).tril()
        allowed = causal.unsqueeze(0) & (seq != PAD).unsqueeze(1)  # (B, L, L)
        allowed |= torch.eye(length, dtype=torch.bool, device=seq.device).unsqueeze(0)
        mask = torch.zeros(b, length, length, device=seq.device).masked_fill(~allowed, -1e4)
        mask = mask.repeat_interleave(self.cfg.num_heads, dim=0)
        return self.norm(self.encoder(x, mask=mask))

    def item_vectors(self) -> torch.Tensor:
        """(N, D) output embeddings of items 1..N (tied with the input embeddings)."""
        return self.item_emb.weight[1:]

    @torch.no_grad()
    def user_vectors(self, histories: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """(B, L) right-aligned histories -> (B, D) last hidden states."""
        self.eval()
        out = [
            self(histories[i : i + batch_size])[:, -1] for i in range(0, len(histories), batch_size)
        ]
        return torch.cat(out) if out else torch.zeros(0, self.cfg.hidden_dim)


@dataclass
class ItemVocab:
    """item_id string <-> contiguous index (1-based; 0 is padding)."""

    items: list[str]

    def __post_init__(self) -> None:
        self.index = {item: i + 1 for i, item in enumerate(self.items)}

    def encode(self, seq: Sequence[str]) -> list[int]:
        return [self.index[i] for i in seq]


def pad_left(seqs: Sequence[Sequence[int]], length: int) -> torch.Tensor:
    """Right-align the last `length` ids of each sequence, padding on the left: (B, length)."""
    out = torch.zeros(len(seqs), length, dtype=torch.long)
    for row, seq in enumerate(seqs):
        tail = list(seq)[-length:]
        if tail:
            out[row, length - len(tail) :] = torch.tensor(tail)
    return out


def training_windows(seqs: Sequence[Sequence[int]], max_len: int) -> torch.Tensor:
    """Cut each sequence into windows of max_len + 1 ids from its end: (W, max_len + 1)."""
    windows = []
    for seq in seqs:
        end = len(seq)
        while end >= 2:
            start = max(0, end - max_len - 1)
            windows.append(seq[start:end])
            end = start + 1 if start > 0 else 0
    return pad_left(windows, max_len + 1)


def hold_out_monitor(prefixes: Sequence[Sequence[int]]) -> tuple[list[list[int]], Monitor]:
    """Training sequences and the early-stopping monitor from the split's pre-ranker prefixes.

    Each prefix (a user's items[: n-m], at least 2 items) loses its last item: training gets
    items[: n-m-1] and the monitor scores (items[: n-m-1] -> s_{n-m-1}), a position that is
    neither trained on nor a reranker sample (see the module docstring)."""
    short = sum(len(p) < 2 for p in prefixes)
    if short:
        raise ValueError(f"{short} pre-ranker prefixes have fewer than 2 items: no monitor target")
    train = [list(p[:-1]) for p in prefixes]
    return train, (train, [p[-1] for p in prefixes])


@torch.no_grad()
def full_rank_metrics(
    model: SASRec,
    histories: Sequence[Sequence[int]],
    targets: Sequence[int],
    k: int = 10,
    exclude_history: bool = True,
) -> dict[str, float]:
    """HR@k and NDCG@k of the target among all items (history items masked out)."""
    if not targets:
        return {f"hr@{k}": 0.0, f"ndcg@{k}": 0.0}
    seqs = pad_left(histories, model.cfg.max_len)
    users = model.user_vectors(seqs)
    items = model.item_vectors()
    hits, ndcg = 0.0, 0.0
    for lo in range(0, len(targets), 1024):
        scores = users[lo : lo + 1024] @ items.T  # (b, N)
        if exclude_history:
            for r, hist in enumerate(histories[lo : lo + 1024]):
                scores[r, [h - 1 for h in hist if h != targets[lo + r]]] = -torch.inf
        tgt = torch.tensor(targets[lo : lo + 1024]) - 1
        tscore = scores.gather(1, tgt.unsqueeze(1))
        rank = (scores > tscore).sum(1) + 1  # 1-based
        hits += (rank <= k).sum().item()
        ndcg += torch.where(rank <= k, 1 / torch.log2(rank.float() + 1), 0.0).sum().item()
    n = len(targets)
    return {f"hr@{k}": hits / n, f"ndcg@{k}": ndcg / n}


def train_sasrec(
    train_seqs: Sequence[Sequence[int]],
    num_items: int,
    cfg: PrerankerConfig,
    monitor: tuple[Sequence[Sequence[int]], Sequence[int]] | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    checkpoint: Path | None = None,
    patience: int = 3,
) -> tuple[SASRec, list[dict[str, float]]]:
    """Train SASRec on `train_seqs` (lists of 1-based ids); returns the best model and history.

    `monitor` = (histories, targets) scored each epoch by full-ranking NDCG@10; the best epoch's
    weights are kept and training stops after `patience` epochs without improvement. With
    `checkpoint`, state is saved after every epoch and a rerun resumes from it.
    """
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.num_threads)
    model = SASRec(num_items, cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    windows = training_windows(train_seqs, cfg.max_len)  # (W, L+1)
    history: list[dict[str, float]] = []
    best, best_state, start = -1.0, None, 0
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        history, best, best_state, start = (
            state["history"],
            state["best"],
            state["best_state"],
            state["epoch"],
        )
        if "rng" in state:  # dropout continues as if never stopped (older checkpoints: not)
            torch.set_rng_state(state["rng"])
        LOG.warning("preranker: resuming from %s after epoch %d", checkpoint, start)
    gen = torch.Generator().manual_seed(cfg.seed)
    for epoch in range(start, cfg.epochs):
        gen.manual_seed(cfg.seed + epoch)
        order = torch.randperm(len(windows), generator=gen)
        model.train()
        total, count = 0.0, 0
        bar = tqdm(
            range(0, len(order), cfg.batch_size),
            desc=f"sasrec epoch {epoch + 1}/{cfg.epochs}",
            leave=False,
        )
        for lo in bar:
            batch = windows[order[lo : lo + cfg.batch_size]]
            inp, tgt = batch[:, :-1], batch[:, 1:]
            hidden = model(inp)  # (B, L, D)
            keep = tgt != PAD
            logits = hidden[keep] @ model.item_vectors().T  # (T, N)
            loss = nn.functional.cross_entropy(logits, tgt[keep] - 1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * keep.sum().item()
            count += keep.sum().item()
            bar.set_postfix(loss=f"{total / count:.4f}")
        row = {"epoch": float(epoch + 1), "train_loss": total / max(count, 1)}
        if monitor is not None:
            row.update({f"monitor_{k}": v for k, v in full_rank_metrics(model, *monitor).items()})
        score = row.get("monitor_ndcg@10", -row["train_loss"])
        if score > best:
            best, best_state = score, {k: v.clone() for k, v in model.state_dict().items()}
        history.append(row)
        if on_epoch is not None:
            on_epoch(epoch + 1, row)
        if checkpoint is not None:  # written aside, then moved in: a crash never tears it
            partial = checkpoint.with_name(checkpoint.name + ".tmp")
            torch.save(
                {
                    "model": model.state_dict(),
                    "opt": opt.state_dict(),
                    "history": history,
                    "best": best,
                    "best_state": best_state,
                    "epoch": epoch + 1,
                    "rng": torch.get_rng_state(),
                },
                partial,
            )
            os.replace(partial, checkpoint)
        epochs_since_best = (
            len(history)
            - 1
            - max(
                range(len(history)),
                key=lambda i: history[i].get("monitor_ndcg@10", -history[i]["train_loss"]),
            )
        )
        if monitor is not None and epochs_since_best >= patience:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return model, history


def build_index(item_vectors: np.ndarray) -> faiss.Index:
    """Exact inner-product index over (N, D) float32 item vectors."""
    index = faiss.IndexFlatIP(item_vectors.shape[1])
    index.add(np.ascontiguousarray(item_vectors, dtype=np.float32))
    return index


def search_excluding(
    index: faiss.Index,
    queries: np.ndarray,
    exclude: Sequence[set[int]],
    k: int,
    margin: int = 50,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (0-based ids, scores) per query with each row's `exclude` ids removed.

    One batched search with k + margin; rows that lose too many hits to exclusion are searched
    again with k + len(exclude) so the result is always exact.
    """
    nq = len(queries)
    ids_out = np.full((nq, k), -1, dtype=np.int64)
    scores_out = np.zeros((nq, k), dtype=np.float32)
    kk = min(k + margin, index.ntotal)
    scores, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), kk)
    for r in range(nq):
        row_ids, row_scores = ids[r], scores[r]
        keep = [j for j, i in enumerate(row_ids) if i >= 0 and i not in exclude[r]][:k]
        if len(keep) < k and kk < index.ntotal:
            full = min(k + len(exclude[r]), index.ntotal)
            row_scores, row_ids = (
                a[0] for a in index.search(queries[r : r + 1].astype(np.float32), full)
            )
            keep = [j for j, i in enumerate(row_ids) if i >= 0 and i not in exclude[r]][:k]
        ids_out[r, : len(keep)] = row_ids[keep]
        scores_out[r, : len(keep)] = row_scores[keep]
    return ids_out, scores_out


def generate_slates(
    model: SASRec,
    vocab: ItemVocab,
    samples: pl.DataFrame,
    sequences: pl.DataFrame,
    slate_size: int,
) -> pl.DataFrame:
    """Candidate slates for every sample: top items by inner product, excluding the prefix."""
    index = build_index(model.item_vectors().detach().numpy())
    prefixes = dict(zip(sequences["user_id"], sequences["items"], strict=True))
    hist_ids = [vocab.encode(h) for h in samples["history"]]
    users = model.user_vectors(pad_left(hist_ids, model.cfg.max_len)).numpy()
    exclude = [
        {vocab.index[i] - 1 for i in prefixes[u][:p]}
        for u, p in zip(samples["user_id"], samples["position"], strict=True)
    ]
    ids, scores = search_excluding(index, users, exclude, slate_size)
    names = np.array(vocab.items, dtype=object)
    cands = [list(names[row[row >= 0]]) for row in ids]
    ranks = [
        (c.index(t) + 1) if t in c else None for c, t in zip(cands, samples["target"], strict=True)
    ]
    slates = samples.with_columns(
        pl.Series("candidates", cands, dtype=pl.List(pl.Utf8)),
        pl.Series(
            "scores",
            [list(s[: len(c)]) for s, c in zip(scores, cands, strict=True)],
            dtype=pl.List(pl.Float32),
        ),
        pl.Series("target_rank", ranks, dtype=pl.Int64),
    )
    return validate(SLATES, slates, "slates")


def save(model: SASRec, vocab: ItemVocab, folder: Path) -> None:
    """Self-describing checkpoint: weights, config, item vocabulary."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), folder / "model.pt")
    (folder / "config.json").write_text(model.cfg.model_dump_json(indent=2))
    pl.DataFrame({"item_id": vocab.items}).write_parquet(folder / "items.parquet")


def load(folder: Path) -> tuple[SASRec, ItemVocab]:
    cfg = PrerankerConfig.model_validate_json((folder / "config.json").read_text())
    vocab = ItemVocab(pl.read_parquet(folder / "items.parquet")["item_id"].to_list())
    model = SASRec(len(vocab.items), cfg)
    model.load_state_dict(torch.load(folder / "model.pt", weights_only=True))
    model.eval()
    return model, vocab


@dataclass(frozen=True)
class PrerankerInputs:
    items: Path  # the data stage's items (the vocabulary)
    prefixes: Path  # the split stage's pre-ranker training prefixes


def run(
    inputs: PrerankerInputs,
    cfg: PrerankerConfig,
    out: Path,
    on_metrics: OnMetrics | None = None,
    log: Log = LOG,
) -> StageOutput:
    """Stage `preranker`: train SASRec on the prefixes, early-stopped on each prefix's last item;
    resumes from `out/checkpoint.pt` after a crash."""
    vocab = ItemVocab(pl.read_parquet(inputs.items)["item_id"].to_list())
    prefixes = [vocab.encode(s) for s in pl.read_parquet(inputs.prefixes)["items"]]
    train, monitor = hold_out_monitor(prefixes)  # monitor: each prefix's last item
    log.info(
        "preranker: %d sequences, %d items, %d epochs", len(train), len(vocab.items), cfg.epochs
    )

    def on_epoch(epoch: int, row: dict[str, float]) -> None:
        if on_metrics is not None:
            on_metrics({k: v for k, v in row.items() if k != "epoch"}, epoch)
        log.info("preranker epoch %d: %s", epoch, {k: round(v, 4) for k, v in row.items()})

    model, history = train_sasrec(
        train, len(vocab.items), cfg, monitor, on_epoch, checkpoint=out / "checkpoint.pt"
    )
    save(model, vocab, out)
    pl.DataFrame(history).write_parquet(out / "history.parquet")
    plots.close(plots.preranker_curve(history, out / "training.png"))
    best = max(history, key=lambda r: r.get("monitor_ndcg@10", 0.0))
    files = {
        "model": "model.pt",
        "config": "config.json",
        "items": "items.parquet",
        "history": "history.parquet",
        "plot": "training.png",
    }
    metrics = {"best_epoch": best["epoch"], "epochs_run": float(len(history))}
    metrics |= {f"best_{k}": v for k, v in best.items() if k.startswith("monitor")}
    attach = {"training.png": "", "model.pt": "model", "config.json": "model"}
    return StageOutput(files, metrics, scratch=["checkpoint.pt"], attach=attach)
