"""Student provisioning (real SmolLM2 GGUF), SID vocabulary, and constrained SID beam search."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gr2_core.constrained import ConstraintError, SIDTrie, constrained_generate
from gr2_core.models import add_sid_vocabulary, export_student
from gr2_core.semantic_ids.sidmap import assign_last_level, decode_sid, encode_sid

LEVELS, SIZE = 4, 8


def test_export_adds_sid_tokens_as_single_tokens(tiny, tmp_path):
    out = export_student(
        tmp_path / "student", source=str(tiny), levels=LEVELS, sizes=[SIZE] * LEVELS
    )
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    sid = encode_sid([1, 7, 0, 3])
    ids = tok.encode(sid, add_special_tokens=False)
    assert len(ids) == LEVELS + 2  # begin, one per level, end
    assert tok.decode(ids) == sid and decode_sid(tok.decode(ids)) == [1, 7, 0, 3]
    # new rows start near the mean of the old ones, not at random
    emb = model.get_input_embeddings().weight.detach()
    n_new = 2 + LEVELS * SIZE
    old_mean = emb[:-n_new].mean(0)
    assert torch.allclose(emb[-n_new:].mean(0), old_mean, atol=0.05)
    assert add_sid_vocabulary(model, tok, LEVELS, [SIZE] * LEVELS) == 0  # idempotent


def test_default_student_is_the_real_smollm2(tmp_path):
    out = export_student(tmp_path / "smol")
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert 130e6 < model.num_parameters() < 140e6


def _sid_setup(tiny):
    tok = AutoTokenizer.from_pretrained(tiny)
    model = AutoModelForCausalLM.from_pretrained(tiny)
    add_sid_vocabulary(model, tok, LEVELS, [SIZE] * LEVELS)
    rng = np.random.default_rng(0)
    prefixes = rng.integers(0, SIZE, size=(40, LEVELS - 1))
    codes = assign_last_level([f"i{i}" for i in range(40)], prefixes, SIZE)
    sids = [encode_sid(c) for c in codes]
    seqs = [tok.encode(s, add_special_tokens=False) for s in sids]
    return model.eval(), tok, SIDTrie(seqs), set(map(tuple, seqs))


def test_constrained_beam_search_returns_only_valid_distinct_sids(tiny):
    model, tok, trie, valid = _sid_setup(tiny)
    prompt = torch.tensor([tok.encode("Next item:", add_special_tokens=False)])
    beams = constrained_generate(
        model, prompt, trie, tok.eos_token_id, num_beams=10, max_new_tokens=LEVELS + 3
    )
    assert len(beams) == 10
    invalid_rate = sum(tuple(b) not in valid for b in beams) / len(beams)
    duplicate_rate = 1 - len(set(map(tuple, beams))) / len(beams)
    assert invalid_rate == 0 and duplicate_rate == 0


def test_impossible_prefix_raises_instead_of_decoding_freely(tiny):
    model, tok, trie, _ = _sid_setup(tiny)
    prompt = torch.tensor([tok.encode("Next item:", add_special_tokens=False)])
    bad = tok.encode("<|sid_begin|><s_b_1>", add_special_tokens=False)  # level b cannot come first
    with pytest.raises(ConstraintError, match="not a prefix"):
        constrained_generate(
            model,
            prompt,
            trie,
            tok.eos_token_id,
            num_beams=2,
            max_new_tokens=LEVELS + 3,
            prefix=bad,
        )


def test_trie_allowed():
    trie = SIDTrie([[1, 2, 3], [1, 4, 5]])
    assert sorted(trie.allowed([1])) == [2, 4]
    assert trie.allowed([1, 2, 3]) == []
    assert trie.allowed([9]) is None and trie.size == 2
