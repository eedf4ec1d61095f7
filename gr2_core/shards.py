"""A stage's batch work split into shards of whole batches, for its task runner (Ray tasks).

Each shard is a whole number of batches, so every batch holds the rows it holds in one pass and
the results are the one-pass results (the evaluation's answers, the item embeddings).
"""

from __future__ import annotations


def batch_ranges(n: int, batch_size: int, shards: int) -> list[tuple[int, int]]:
    """(start, stop) of at most `shards` contiguous parts of `n` rows, each a whole number of
    batches of `batch_size` (the last part may end on a short batch).

    >>> batch_ranges(10, 3, 2)
    [(0, 6), (6, 10)]
    >>> batch_ranges(2, 8, 4)
    [(0, 2)]
    """
    if n <= 0:
        return []
    batches = -(-n // batch_size)
    per = -(-batches // max(shards, 1)) * batch_size
    return [(a, min(a + per, n)) for a in range(0, n, per)]
