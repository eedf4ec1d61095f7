"""Semantic-ID tokenizer (SPEC section 2).

- `embeddings`: item text embeddings with all-MiniLM-L6-v2 (offline, from its package).
- `rqvae`: RQ-VAE with the paper's techniques as switches.
- `rqkmeans`: residual k-means (faiss), the simple baseline.
- `sidmap`: the assigned last level, the versioned SID map, token strings, stable re-encoding.
"""

from gr2_core.semantic_ids.sidmap import (  # noqa: F401
    SID_BEGIN,
    SID_END,
    assign_last_level,
    decode_sid,
    encode_sid,
    extend_sid_map,
    sid_tokens,
)
