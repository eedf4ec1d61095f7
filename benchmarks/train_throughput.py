"""Training throughput of the student's step: tokens/s and model FLOPs utilisation (MFU).

The step is the one mid-training runs (causal-LM loss over full sequences, backward, gradient
clipping, AdamW), timed on packed sequences: token streams cut into rows of exactly `seq_len`
tokens (GPT-style packing, no padding), so every position is a real training token.

Architectures are built from their configs (the weights do not change the arithmetic):
`smollm2-135m` (the default student, SmolLM2-135M) and `qwen2.5-0.5b` (the 0.5B-class config of
the GPU target). Model FLOPs per token follow the usual accounting:
6 * (non-embedding parameters + output projection d*V) + 12 * layers * d * seq_len (attention
scores and values, forward and backward). MFU = achieved model FLOP/s / the device's dense peak.

  python benchmarks/train_throughput.py                         # CPU, SmolLM2-135M, fp32
  python benchmarks/train_throughput.py --device cuda --dtype bf16 --arch qwen2.5-0.5b \
      --seq-len 2048 --batch-size 16 --compile                  # what benchmarks/gpu_check.sh runs

Prints one JSON line per configuration (append with --out FILE).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

ARCHS = {
    # SmolLM2-135M(-Instruct): LlamaForCausalLM, tied embeddings
    "smollm2-135m": dict(
        model_type="llama",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        rope_theta=100000.0,
        tie_word_embeddings=True,
    ),
    # Qwen2.5-0.5B: the 0.5B-class config of the GPU target, tied embeddings
    "qwen2.5-0.5b": dict(
        model_type="qwen2",
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
    ),
}

# dense bf16 tensor-core peaks (vendor datasheets, SXM parts); CPU has no meaningful entry
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}


def build(arch: str, seq_len: int, dtype: torch.dtype, device: str, attn: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(ARCHS[arch])
    config = AutoConfig.for_model(
        spec.pop("model_type"), max_position_embeddings=max(seq_len, 2048), **spec
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    model = model.to(device)
    return model, config


def flops_per_token(model, config, seq_len: int) -> float:
    n = sum(p.numel() for p in model.parameters())
    # every parameter multiplies each token except the input lookup table; a tied table is
    # also the output projection, so it counts once either way
    dense = n if config.tie_word_embeddings else n - config.vocab_size * config.hidden_size
    attn = 12 * config.num_hidden_layers * config.hidden_size * seq_len
    return 6 * dense + attn


def peak_tflops(device: str, override: float | None) -> float | None:
    if override:
        return override
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name()
        for key, value in PEAK_TFLOPS.items():
            if key in name:
                return value
    return None


def run(args: argparse.Namespace) -> dict:
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    device = args.device
    if device == "cpu":
        torch.set_num_threads(args.threads)
    model, config = build(args.arch, args.seq_len, dtype, device, args.attn)
    model.train()
    step_model = torch.compile(model) if args.compile else model
    fused = device.startswith("cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=fused)
    gen = torch.Generator().manual_seed(0)
    # packed rows: a stream of documents separated by EOS, cut at exactly seq_len tokens
    batches = [
        torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len), generator=gen)
        for _ in range(4)
    ]
    batches = [b.to(device) for b in batches]

    def step(ids: torch.Tensor) -> float:
        out = step_model(input_ids=ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.detach()

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for i in range(args.warmup):
        step(batches[i % len(batches)])
    sync()
    t0 = time.perf_counter()
    for i in range(args.steps):
        loss = step(batches[i % len(batches)])
    sync()
    seconds = time.perf_counter() - t0
    tokens = args.steps * args.batch_size * args.seq_len
    tps = tokens / seconds
    fpt = flops_per_token(model, config, args.seq_len)
    peak = peak_tflops(device, args.peak_tflops)
    result = {
        "arch": args.arch,
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "device": torch.cuda.get_device_name()
        if device.startswith("cuda")
        else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads() if device == "cpu" else None,
        "dtype": args.dtype,
        "attn": args.attn,
        "compile": args.compile,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "seconds": round(seconds, 2),
        "tokens_per_s": round(tps, 1),
        "model_tflops_per_s": round(tps * fpt / 1e12, 3),
        "mfu": round(tps * fpt / (peak * 1e12), 4) if peak else None,
        "peak_tflops": peak,
        "final_loss": round(float(loss), 4),
        "torch": torch.__version__,
    }
    if device.startswith("cuda"):
        result["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arch", choices=sorted(ARCHS), default="smollm2-135m")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--attn", default="sdpa", help="transformers attention implementation")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--peak-tflops", type=float, default=None, help="override the device peak")
    p.add_argument("--out", type=Path, default=None, help="append the JSON line to this file")
    args = p.parse_args()
    result = run(args)
    line = json.dumps(result)
    print(line, flush=True)
    if args.out:
        with args.out.open("a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
