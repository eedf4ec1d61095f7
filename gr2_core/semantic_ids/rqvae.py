"""RQ-VAE semantic-ID tokenizer with the GR2 paper's techniques as switches.

x (item embedding) -> MLP encoder -> latent h -> L residual levels: level l picks the code of
C_l nearest to the residual r_l, r_{l+1} = r_l - q_l; h_hat = sum_l q_l -> MLP decoder -> x_hat.
Loss = ||x - x_hat||^2 + beta * sum_l ||r_l - sg[q_l]||^2 (commitment), plus, without EMA, the
codebook term sum_l ||sg[r_l] - q_l||^2; gradients pass the quantiser straight through.

Switches (`SemanticIdConfig`):
1. `kmeans_init`: before training, each level's codebook is k-means (faiss) of its residuals.
   Off, each level's codes are residuals of randomly drawn items (`init_from_data`). Codes that
   start far from the encoder's outputs (the constructor's `randn * 0.1`) are never picked, and
   the catalogue collapses onto a few codes per level unless dead-code reset revives the rest.
2. `ema`: codebooks follow exponential moving averages of their assigned residuals (gamma =
   `ema_decay`) instead of a codebook loss.
3. `diversity_weight` (lambda): adds lambda * C * sum_j p_j^2, p_j the batch-mean soft usage of
   code j (1 when usage is uniform, C when one code takes everything). The soft assignment is
   softmax_j(-||r - c_j||^2 / tau) with tau the batch's mean squared distance to the nearest
   code (no gradient), so its sharpness does not depend on the latents' scale: with tau = 1 the
   latents' small squared distances (well under 1) made every p nearly uniform and the loss
   nearly inert.
4. `dead_code_reset`: a code unused for `dead_code_after` batches is moved onto the residual that
   the current batch reconstructs worst.
5. the assigned last level lives in `sidmap.assign_last_level`.
Optional `contrastive_weight`: InfoNCE pulling latents of co-interacted items together.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl
import torch
from torch import nn
from tqdm.auto import tqdm

from data_contracts.config import SemanticIdConfig
from gr2_core.semantic_ids.rqkmeans import kmeans


def mlp(dims: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims, dims[1:], strict=False)):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


class RQVAE(nn.Module):
    def __init__(self, input_dim: int, cfg: SemanticIdConfig):
        super().__init__()
        self.cfg = cfg
        self.input_dim = input_dim
        dims = [input_dim, *cfg.hidden_dims, cfg.latent_dim]
        self.encoder = mlp(dims)
        self.decoder = mlp(dims[::-1])
        k, d = cfg.codebook_size, cfg.latent_dim
        # placeholder values: `train_rqvae` initialises from data, `load` from a checkpoint
        self.codebooks = nn.Parameter(torch.randn(cfg.levels, k, d) * 0.1)  # (L, K, D)
        self.register_buffer("ema_count", torch.ones(cfg.levels, k))
        self.register_buffer("ema_sum", self.codebooks.detach().clone())
        self.register_buffer("idle", torch.zeros(cfg.levels, k, dtype=torch.long))

    def quantize(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """h (B, D) -> codes (B, L), h_hat (B, D), residuals per level [(B, D)]."""
        residual, codes, quantized, residuals = h, [], torch.zeros_like(h), []
        for lvl in range(self.cfg.levels):
            book = self.codebooks[lvl]  # (K, D)
            idx = torch.cdist(residual.detach(), book.detach()).argmin(dim=1)  # (B,)
            q = book[idx]
            residuals.append(residual)
            codes.append(idx)
            quantized = quantized + q
            residual = residual - q.detach() if self.cfg.ema else residual - q
        return torch.stack(codes, 1), quantized, residuals

    @torch.no_grad()
    def encode(self, x: np.ndarray, batch_size: int = 65536) -> np.ndarray:
        """(N, input_dim) -> (N, L) learned codes."""
        self.eval()
        out = []
        for lo in range(0, len(x), batch_size):
            h = self.encoder(torch.from_numpy(np.ascontiguousarray(x[lo : lo + batch_size])))
            out.append(self.quantize(h)[0].numpy())
        return np.concatenate(out) if out else np.zeros((0, self.cfg.levels), np.int64)

    @torch.no_grad()
    def reconstruction_error(self, x: np.ndarray) -> float:
        self.eval()
        xt = torch.from_numpy(x)
        _, h_hat, _ = self.quantize(self.encoder(xt))
        return float(((self.decoder(h_hat) - xt) ** 2).sum(1).mean())

    @torch.no_grad()
    def init_kmeans(self, x: torch.Tensor) -> None:
        """Level by level: the codebook is k-means (faiss) of that level's residuals."""
        k, seed = self.cfg.codebook_size, self.cfg.seed
        self._init_levels(x, lambda r, lvl: torch.from_numpy(kmeans(r.numpy(), k, seed + lvl)))

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor) -> None:
        """Level by level: the codebook is the residuals of K items drawn at random (seeded).

        Levels draw disjoint items while the catalogue has L x K of them (an item drawn at one
        level has a zero residual at the next), then items repeat."""
        k, levels = self.cfg.codebook_size, self.cfg.levels
        gen = torch.Generator().manual_seed(self.cfg.seed)
        order = torch.randperm(len(x), generator=gen)
        rows = order.repeat(-(-levels * k // len(x)))[: levels * k].view(levels, k)  # (L, K)
        self._init_levels(x, lambda r, lvl: r[rows[lvl]].clone())

    def _init_levels(
        self, x: torch.Tensor, fit: Callable[[torch.Tensor, int], torch.Tensor]
    ) -> None:
        """Set each level's codebook (and EMA state) to `fit(residuals (N, D), level)` (K, D)."""
        residual = self.encoder(x)  # (N, D)
        for lvl in range(self.cfg.levels):
            book = fit(residual, lvl)
            self.codebooks.data[lvl] = book
            self.ema_sum[lvl] = book
            self.ema_count[lvl] = 1.0
            residual = residual - book[torch.cdist(residual, book).argmin(1)]

    @torch.no_grad()
    def ema_update(self, residuals: list[torch.Tensor], codes: torch.Tensor) -> None:
        g = self.cfg.ema_decay
        k = self.cfg.codebook_size
        for lvl, r in enumerate(residuals):
            onehot = nn.functional.one_hot(codes[:, lvl], k).float()  # (B, K)
            self.ema_count[lvl].mul_(g).add_(onehot.sum(0), alpha=1 - g)
            self.ema_sum[lvl].mul_(g).add_(onehot.T @ r.detach(), alpha=1 - g)
            n = self.ema_count[lvl].sum()
            smoothed = (self.ema_count[lvl] + 1e-5) / (n + k * 1e-5) * n  # Laplace smoothing
            self.codebooks.data[lvl] = self.ema_sum[lvl] / smoothed.unsqueeze(1)

    @torch.no_grad()
    def reset_dead(self, residuals: list[torch.Tensor], codes: torch.Tensor) -> int:
        """Move codes idle for `dead_code_after` batches onto the worst-fit residuals."""
        reset = 0
        for lvl, r in enumerate(residuals):
            used = torch.zeros(self.cfg.codebook_size, dtype=torch.bool)
            used[codes[:, lvl]] = True
            self.idle[lvl] = torch.where(used, 0, self.idle[lvl] + 1)
            dead = torch.nonzero(self.idle[lvl] >= self.cfg.dead_code_after).flatten()
            if len(dead) == 0:
                continue
            err = (r - self.codebooks[lvl][codes[:, lvl]]).pow(2).sum(1)  # (B,)
            worst = err.argsort(descending=True)[: len(dead)]
            dead = dead[: len(worst)]
            self.codebooks.data[lvl, dead] = r[worst].detach()
            self.ema_sum[lvl, dead] = r[worst].detach()
            self.ema_count[lvl, dead] = 1.0
            self.idle[lvl, dead] = 0
            reset += len(dead)
        return reset

    def soft_usage(self, r: torch.Tensor, level: int) -> torch.Tensor:
        """(B, D) residuals -> (K,) batch-mean soft assignment to level `level`'s codes."""
        d2 = torch.cdist(r, self.codebooks[level]) ** 2  # (B, K)
        tau = d2.min(1).values.mean().detach().clamp_min(1e-8)  # scale of the nearest distances
        return torch.softmax(-d2 / tau, dim=1).mean(0)

    def diversity_loss(self, residuals: list[torch.Tensor]) -> torch.Tensor:
        """lambda * C * sum_j p_j^2 with p the batch-mean soft assignment, summed over levels."""
        total = torch.zeros(())
        for lvl, r in enumerate(residuals):
            p = self.soft_usage(r, lvl)  # (K,)
            total = total + self.cfg.codebook_size * (p**2).sum()
        return self.cfg.diversity_weight * total

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({"state": self.state_dict(), "input_dim": self.input_dim}, folder / "rqvae.pt")
        (folder / "tokenizer_config.json").write_text(self.cfg.model_dump_json(indent=2))

    @classmethod
    def load(cls, folder: Path) -> RQVAE:
        cfg = SemanticIdConfig.model_validate_json((folder / "tokenizer_config.json").read_text())
        blob = torch.load(folder / "rqvae.pt", weights_only=True)
        model = cls(blob["input_dim"], cfg)
        model.load_state_dict(blob["state"])
        return model.eval()


def contrastive_loss(
    model: RQVAE, x: torch.Tensor, pairs: torch.Tensor, temp: float
) -> torch.Tensor:
    """InfoNCE over co-interacted item pairs (P, 2), in-batch negatives."""
    z = nn.functional.normalize(model.encoder(x[pairs.flatten()]), dim=-1).view(len(pairs), 2, -1)
    logits = z[:, 0] @ z[:, 1].T / temp  # (P, P)
    return nn.functional.cross_entropy(logits, torch.arange(len(pairs)))


def train_rqvae(
    x: np.ndarray,
    cfg: SemanticIdConfig,
    pairs: np.ndarray | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> tuple[RQVAE, list[dict[str, float]]]:
    """Train on (N, D) embeddings; `pairs` (P, 2) are co-interacted item rows for the
    contrastive loss. Returns the model and per-epoch metrics."""
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.num_threads)
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    model = RQVAE(x.shape[1], cfg)
    if cfg.kmeans_init:
        model.init_kmeans(xt)
    else:
        model.init_from_data(xt)
    params = [p for n, p in model.named_parameters() if not (cfg.ema and n == "codebooks")]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    pairs_t = torch.from_numpy(pairs) if pairs is not None and len(pairs) else None
    history = []
    start = time.perf_counter()
    for epoch in tqdm(range(cfg.epochs), desc="rq-vae", leave=False):
        model.train()
        totals = {"recon": 0.0, "commit": 0.0, "resets": 0.0}
        order = torch.randperm(len(xt), generator=gen)
        for lo in range(0, len(xt), cfg.batch_size):
            batch = xt[order[lo : lo + cfg.batch_size]]
            h = model.encoder(batch)
            codes, h_hat, residuals = model.quantize(h)
            h_st = h + (h_hat - h).detach()  # straight-through
            recon = ((model.decoder(h_st) - batch) ** 2).sum(1).mean()
            commit = sum(
                ((r - model.codebooks[i][codes[:, i]].detach()) ** 2).sum(1).mean()
                for i, r in enumerate(residuals)
            )
            loss = recon + cfg.beta * commit
            if not cfg.ema:
                loss = loss + sum(
                    ((r.detach() - model.codebooks[i][codes[:, i]]) ** 2).sum(1).mean()
                    for i, r in enumerate(residuals)
                )
            if cfg.diversity_weight > 0:
                loss = loss + model.diversity_loss(residuals)
            if pairs_t is not None and cfg.contrastive_weight > 0:
                pick = torch.randint(len(pairs_t), (cfg.batch_size,), generator=gen)
                loss = loss + cfg.contrastive_weight * contrastive_loss(
                    model, xt, pairs_t[pick], cfg.contrastive_temperature
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if cfg.ema:
                model.ema_update(residuals, codes)
            if cfg.dead_code_reset:
                totals["resets"] += model.reset_dead(residuals, codes)
            totals["recon"] += recon.item() * len(batch)
            totals["commit"] += float(commit.detach()) * len(batch)
        row = {
            "epoch": float(epoch + 1),
            "recon": totals["recon"] / len(xt),
            "commit": totals["commit"] / len(xt),
            "dead_code_resets": totals["resets"],
            "seconds": time.perf_counter() - start,
        }
        history.append(row)
        if on_epoch:
            on_epoch(epoch + 1, row)
    return model.eval(), history


def co_interaction_pairs(
    sequences: pl.DataFrame, ids: list[str], limit: int, seed: int
) -> np.ndarray:
    """(P, 2) rows of consecutively interacted items in the pre-ranker's training prefixes."""
    index = {item: i for i, item in enumerate(ids)}
    pairs = [
        (index[a], index[b])
        for seq in sequences["items"].to_list()
        for a, b in zip(seq, seq[1:], strict=False)
        if a in index and b in index
    ]
    arr = np.array(pairs, dtype=np.int64).reshape(-1, 2)
    if len(arr) > limit:
        arr = arr[np.random.default_rng(seed).choice(len(arr), limit, replace=False)]
    return arr
