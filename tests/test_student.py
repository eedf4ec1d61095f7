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
    assert add_sid_vocabulary(model, tok, LEVELS, [SIZE] * LEVELS) == 0  # idempotent


def test_sid_rows_start_from_their_spelling_so_two_sids_differ(tiny):
    base = AutoTokenizer.from_pretrained(tiny)
    model = AutoModelForCausalLM.from_pretrained(tiny)
    old = model.get_input_embeddings().weight.detach().clone()
    tok = AutoTokenizer.from_pretrained(tiny)
    add_sid_vocabulary(model, tok, LEVELS, [SIZE] * LEVELS)
    emb = model.get_input_embeddings().weight.detach()
    assert model.get_output_embeddings().weight.data_ptr() == emb.data_ptr()  # tied: one table

    def row(token):
        return emb[tok.convert_tokens_to_ids(token)]

    # <s_a_7>: the mean of its own pieces, without the pieces every SID token shares (< _ >)
    pieces = base.convert_ids_to_tokens(base.encode("<s_a_7>", add_special_tokens=False))
    own = [p for p in pieces if p not in base.convert_ids_to_tokens(base.encode("<_>"))]
    assert own and len(own) < len(pieces)
    assert torch.allclose(row("<s_a_7>"), old[base.convert_tokens_to_ids(own)].mean(0))
    # every new row is distinct: level and code tell two SID tokens apart from the first step
    new_rows = emb[len(base) :]
    assert len(new_rows) == 2 + LEVELS * SIZE
    assert torch.cdist(new_rows, new_rows).add(torch.eye(len(new_rows))).min() > 1e-3

    # transformers' mean_resizing alone: every new row at about the same vector
    flat = AutoModelForCausalLM.from_pretrained(tiny)
    tok = AutoTokenizer.from_pretrained(tiny)
    add_sid_vocabulary(flat, tok, LEVELS, [SIZE] * LEVELS, init="mean")
    rows = flat.get_input_embeddings().weight.detach()[len(base) :]
    assert torch.cdist(rows, rows).max() < 1e-3
    with pytest.raises(ValueError, match="SID embedding init"):
        add_sid_vocabulary(flat, AutoTokenizer.from_pretrained(tiny), 1, [2], init="random")


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
