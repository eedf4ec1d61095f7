"""RQ-KMeans: residual k-means with faiss, the simple baseline tokenizer.

Level l runs k-means on the residuals left by levels < l; an item's code at level l is its
residual's nearest centroid. No encoder, no training beyond k-means.
"""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np


def kmeans(x: np.ndarray, k: int, seed: int, niter: int = 25) -> np.ndarray:
    """(k, D) centroids; with fewer points than k, the points themselves fill the codebook."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if len(x) <= k:
        rng = np.random.default_rng(seed)
        extra = x[rng.integers(0, len(x), size=k - len(x))] if len(x) else np.zeros((k, x.shape[1]))
        noise = rng.normal(scale=1e-4, size=extra.shape).astype(np.float32)
        return np.concatenate([x, extra + noise]).astype(np.float32)
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, verbose=False, spherical=False)
    km.train(x)
    return km.centroids.astype(np.float32)


def nearest(x: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """Index of the nearest code (L2) for each row."""
    index = faiss.IndexFlatL2(codebook.shape[1])
    index.add(np.ascontiguousarray(codebook, dtype=np.float32))
    _, ids = index.search(np.ascontiguousarray(x, dtype=np.float32), 1)
    return ids[:, 0].astype(np.int64)


class RQKMeans:
    """Residual k-means tokenizer over raw embeddings."""

    def __init__(self, codebooks: list[np.ndarray]):
        self.codebooks = codebooks

    @classmethod
    def fit(cls, x: np.ndarray, levels: int, size: int, seed: int = 0) -> RQKMeans:
        residual = x.astype(np.float32).copy()
        books = []
        for lvl in range(levels):
            book = kmeans(residual, size, seed + lvl)
            residual -= book[nearest(residual, book)]
            books.append(book)
        return cls(books)

    @property
    def dim(self) -> int:
        return self.codebooks[0].shape[1]

    def encode(self, x: np.ndarray, batch_size: int = 65536) -> np.ndarray:
        """(N, D) -> (N, L) codes."""
        out = np.zeros((len(x), len(self.codebooks)), dtype=np.int64)
        for lo in range(0, len(x), batch_size):
            residual = x[lo : lo + batch_size].astype(np.float32).copy()
            for lvl, book in enumerate(self.codebooks):
                ids = nearest(residual, book)
                out[lo : lo + batch_size, lvl] = ids
                residual -= book[ids]
        return out

    def reconstruct(self, codes: np.ndarray) -> np.ndarray:
        return sum(book[codes[:, i]] for i, book in enumerate(self.codebooks))

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / "codebooks.npy", np.stack(self.codebooks))

    @classmethod
    def load(cls, folder: Path) -> RQKMeans:
        return cls(list(np.load(folder / "codebooks.npy")))
