"""Causal-LM training with transformers' Trainer: token warm-up, then all parameters.

One Trainer run covers both phases, so steps, the learning-rate schedule, checkpoints and
`resume_from_checkpoint` are the Trainer's own. `TokenWarmup` implements the warm-up phase: for
the first `warmup_steps` optimizer steps only the embedding (and, if untied, output) rows of the
added tokens learn. Every other parameter has `requires_grad=False` (no gradient, so AdamW skips
it and creates no state), and a gradient hook zeroes the old rows of the embedding matrices (zero
gradient and zero Adam moments give a zero update; weight decay must be 0 in this phase).
The new rows start far from where they need to be and only they move, so the warm-up phase runs
at `warmup_lr_scale` times the learning rate (on top of the usual schedule); at the base rate a
short warm-up barely moves them (measured: the held-out loss on SID targets stayed at the level of
a uniform guess over the vocabulary after 20 warm-up steps at 3e-4).
The same code runs on one CPU, one GPU, or in several data-parallel processes (`processes > 1`:
`gr2_core.distributed` relaunches the call under torchrun).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import polars as pl
import torch
from transformers import (
    AutoModelForCausalLM,
    PreTrainedModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.trainer_pt_utils import LengthGroupedSampler

from gr2_core import distributed
from gr2_core.midtrain import IGNORE

LOG = logging.getLogger(__name__)


class TokenWarmup(TrainerCallback):
    """Freeze all but the new token rows for the first `warmup_steps` optimizer steps."""

    def __init__(self, model: PreTrainedModel, first_new_token: int, warmup_steps: int):
        self.model, self.first_new, self.steps = model, first_new_token, warmup_steps
        self.active = False
        self.matrices = {id(model.get_input_embeddings().weight): model.get_input_embeddings()}
        out = model.get_output_embeddings()
        if out is not None:
            self.matrices[id(out.weight)] = out
        for module in self.matrices.values():
            module.weight.register_hook(self._mask_old_rows)

    def _mask_old_rows(self, grad: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return grad
        grad = grad.clone()
        grad[: self.first_new] = 0
        return grad

    def set_phase(self, step: int) -> None:
        self.active = step < self.steps
        for p in self.model.parameters():
            p.requires_grad_(not self.active or id(p) in self.matrices)

    def on_step_begin(self, args, state, control, **kwargs):
        self.set_phase(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self.set_phase(self.steps)  # leave the model fully trainable


class WarmupTrainer(Trainer):
    """Trainer whose learning rate is `token_lr_scale` times higher during the token warm-up."""

    def __init__(self, *args, token_steps: int = 0, token_lr_scale: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.token_steps, self.token_lr_scale = token_steps, token_lr_scale

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        created = self.lr_scheduler is None
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        if created and self.token_steps and self.token_lr_scale != 1.0:
            steps, scale = self.token_steps, self.token_lr_scale
            wrapped = [
                (lambda step, f=f: f(step) * (scale if step < steps else 1.0))
                for f in scheduler.lr_lambdas
            ]
            # same schedule, scaled during the warm-up; the groups keep their `initial_lr`
            scheduler = torch.optim.lr_scheduler.LambdaLR(scheduler.optimizer, wrapped)
            self.lr_scheduler = scheduler
        return scheduler

    def _get_train_sampler(self, train_dataset=None):
        sampler = super()._get_train_sampler(train_dataset)
        if isinstance(sampler, LengthGroupedSampler) and self.args.world_size > 1:
            # length groups of the global batch, not of one process's share: the same sample
            # order, so the same optimizer steps, on any number of processes
            size = self.args.train_batch_size * self.args.gradient_accumulation_steps
            sampler = LengthGroupedSampler(size * self.args.world_size, lengths=sampler.lengths)
        return sampler


class StopAfter(TrainerCallback):
    """Stop (as a crash would) once `step` optimizer steps are done: for resume tests."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            raise KeyboardInterrupt(f"stopped after step {state.global_step}")


class PadCollator:
    """Right-pads input_ids/labels of a batch; labels are IGNORE on padding."""

    def __init__(self, pad_id: int):
        self.pad = pad_id

    def __call__(self, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            labels[i, :n] = torch.tensor(r["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class Rows(torch.utils.data.Dataset):
    """A tokenized table as a map-style dataset."""

    def __init__(self, table: pl.DataFrame):
        self.ids = table["input_ids"].to_list()
        self.labels = table["labels"].to_list()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


@dataclass
class TrainSettings:
    """What the Trainer needs beyond the data (a subset of the stage config)."""

    max_steps: int
    batch_size: int
    grad_accum: int
    lr: float
    warmup_steps: int  # token warm-up (new rows only)
    warmup_lr_scale: float  # learning-rate multiplier during the token warm-up
    lr_warmup_ratio: float
    logging_steps: int
    save_steps: int
    eval_steps: int
    seed: int
    num_threads: int
    processes: int = 1  # data-parallel processes (torchrun)
    launch_config: str | None = None  # accelerate launch configuration (infra/launch/)
    report_to: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, cfg, report_to: tuple[str, ...] = ()) -> TrainSettings:
        """The same-named fields of a stage config (e.g. `MidtrainConfig`)."""
        names = [f.name for f in fields(cls) if f.name != "report_to"]
        return cls(**{n: getattr(cfg, n) for n in names}, report_to=report_to)


def use_cuda() -> bool:
    return torch.cuda.is_available()


def cpu_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX-512 BF16 or AMX, through oneDNN): there
    bf16 autocast over float32 weights trains and infers 2 to 2.5x faster than float32
    ("Mixed precision on this CPU" in docs/benchmarks.md); elsewhere it would be slower."""
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)  # private in torch 2
    return bool(torch.backends.mkldnn.is_available() and probe is not None and probe())


def autocast(device: torch.device | str):
    """bf16 autocast where it is fast (a GPU, or a CPU with native bf16), else a no-op."""
    kind = torch.device(device).type
    on = kind == "cuda" or (kind == "cpu" and cpu_bf16())
    return torch.autocast(kind, dtype=torch.bfloat16, enabled=on)


def load_trainable(model_dir, num_threads: int) -> PreTrainedModel:
    """The model to train: bf16 on a GPU, float32 on CPU (with `num_threads` torch threads; the
    trainer's autocast runs its matmuls in bf16 where the CPU has it, `common_args`)."""
    torch.set_num_threads(num_threads)
    dtype = torch.bfloat16 if use_cuda() else torch.float32
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)


def common_args(seed: int, save_steps: int, report_to: Sequence[str]) -> dict:
    """The TrainingArguments every GR2 trainer shares: a checkpoint every `save_steps` (two
    kept: the resume points), bf16 autocast on a GPU and on a CPU with native bf16 (float32
    master weights there), seeds, reporting, no workers."""
    cuda = use_cuda()
    return dict(
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=2,
        report_to=list(report_to),
        seed=seed,
        data_seed=seed,
        use_cpu=not cuda,
        bf16=cuda or cpu_bf16(),
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=False,
    )


def whole_json(path: Path) -> bool:
    """Whether `path` holds a complete JSON document (a file cut short by a kill does not)."""
    try:
        json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return False
    return True


def resume_point(ckpt_dir: Path) -> str | None:
    """The newest complete checkpoint under `ckpt_dir`, or None for a fresh start.

    The Trainer writes a checkpoint in place, `trainer_state.json` last, so a run killed while
    saving leaves a `checkpoint-N` without it (or with it cut short): such a folder is deleted
    and the one before is used, instead of failing the rerun on a torn file."""
    if not ckpt_dir.exists():
        return None
    found = [p for p in ckpt_dir.glob("checkpoint-*") if p.name.rsplit("-", 1)[-1].isdigit()]
    for path in sorted(found, key=lambda p: int(p.name.rsplit("-", 1)[-1]), reverse=True):
        if not whole_json(path / "trainer_state.json"):
            LOG.warning("%s is incomplete (a crash while saving); deleting it", path)
            shutil.rmtree(path)
            continue
        LOG.warning("resuming training from %s", path)
        return str(path)
    return None


@distributed.relaunched("settings")
def train(
    model_dir: Path,
    train_rows: pl.DataFrame,
    eval_rows: dict[str, pl.DataFrame],
    out_dir: Path,
    settings: TrainSettings,
    first_new_token: int,
    pad_id: int,
    callbacks: Sequence[TrainerCallback] = (),
) -> tuple[PreTrainedModel, list[dict]]:
    """Train (resuming from the newest checkpoint in `out_dir/checkpoints`); returns the model
    and the Trainer's log history. With `settings.processes > 1`, the same call runs in that
    many torchrun processes (`gr2_core.distributed`)."""
    model = load_trainable(model_dir, settings.num_threads)
    ckpt_dir = out_dir / "checkpoints"
    args = TrainingArguments(
        output_dir=str(ckpt_dir),
        max_steps=settings.max_steps,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        learning_rate=settings.lr,
        weight_decay=0.0,
        lr_scheduler_type="cosine",
        warmup_steps=int(settings.lr_warmup_ratio * settings.max_steps),
        logging_steps=settings.logging_steps,
        eval_strategy="steps" if eval_rows else "no",
        eval_steps=settings.eval_steps,
        train_sampling_strategy="group_by_length",  # less padding per batch
        **common_args(settings.seed, settings.save_steps, settings.report_to),
    )
    warmup = TokenWarmup(model, first_new_token, settings.warmup_steps)
    trainer = WarmupTrainer(
        token_steps=settings.warmup_steps,
        token_lr_scale=settings.warmup_lr_scale,
        model=model,
        args=args,
        train_dataset=Rows(train_rows),
        eval_dataset={k: Rows(v) for k, v in eval_rows.items()} or None,
        data_collator=PadCollator(pad_id),
        callbacks=[warmup, *callbacks],
    )
    distributed.check_world(trainer.args.world_size, settings.processes)
    trainer.train(resume_from_checkpoint=resume_point(ckpt_dir))
    distributed.finish(trainer)
    return model, trainer.state.log_history
