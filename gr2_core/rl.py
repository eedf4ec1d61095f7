"""DAPO on TRL's GRPOTrainer, with the dynamic sampling TRL lacks (SPEC section 5).

What TRL already provides and we only configure (`dapo_args`):
  - clip-higher: `epsilon` 0.2 (eps_low) and `epsilon_high` 0.28 (DAPO, arXiv 2503.14476);
  - token-level policy loss normalised over all tokens of the batch: `loss_type="dapo"`;
  - no KL term: `beta=0`;
  - several optimizer steps per rollout batch (DAPO: 16 mini-batches): TRL's
    `steps_per_generation` (the batch split into `mini_batches`) and `num_iterations`. Only then
    does the policy that is trained differ from the one that sampled, so the importance ratio
    leaves 1 and the clip range acts; with one step per batch the clip ratios are always 0;
  - overlong filtering: `mask_truncated_completions=True` (a completion cut at the length limit
    gets no gradient) and soft overlong punishment, TRL's `get_soft_overlong_punishment` reward
    (a linear penalty over the last `overlong_cache` tokens before the limit).

What we add (`dapo_trainer_class`): dynamic sampling. A group whose rewards are all equal has
zero advantage everywhere and teaches nothing, but it still dilutes the token-level average.
After each generation round, groups with zero reward variance are dropped and fresh prompts are
drawn from the training set and rolled out, up to `max_rounds` extra rounds, until the
generation batch holds as many informative groups as it had groups. If the rounds run out, the
batch is completed with dropped groups (zero advantage: they only count in the normalisation),
and that shortfall is logged. A group counts as informative when its *task* reward varies (the
reward functions named in `filter_on`, the ranking reward R by default), as DAPO filters on
accuracy: a length penalty that varies inside a group of equally wrong answers does not make it
informative. The extension lives in one override of `_generate_and_score_completions`: the
parent does the generation, scoring and advantages for every round, this class only selects and
concatenates groups.

Also added: every rollout is decoded by the answer machine (`gr2_core.decoding`), as evaluation
and serving decode: the explanation is closed at the reasoning budget
(`prompt.max_explanation_tokens`), and with `rl.slate_sids` the list is a permutation of the
slate ("constrained-rollout DAPO"), for students too small to copy SIDs reliably. Tokens the
machine forced (the only token it allowed: the answer's fixed segments, list separators, the
closing `"]}`, EOS, the rest of a SID once its prefix is unique) were not the policy's choice, so
they are masked out of the loss (TRL's `tool_mask`, which masks the loss but not attention).
Without the mask, a group with negative advantages would push down exactly the tokens that make
an answer valid. Tokens chosen among several allowed ones are scored under the unconstrained
policy.

In several processes (`rl.processes`, torchrun through `gr2_core.distributed`): each process
rolls out `prompts_per_step` groups; TRL gathers the rewards, so every process sees the global
batch's and takes the same dynamic-sampling decisions, and the chosen groups are gathered and
shared out again. Each group is sampled with a seed of its own (the step, the round, its place in
the global batch), so 2 processes of one group make the rollouts and updates of 1 process of two
(tests/scale/test_multiprocess.py). The loss normaliser counts every process's trained tokens,
as TRL's does; the monitors are means over processes and the main process writes the rollouts.

Monitors, logged with TRL's metrics every step (and so to MLflow when `report_to` has it):
each reward component (`rewards/<name>/mean`), `dynamic/zero_std_before` and `/after`,
`dynamic/extra_rounds`, `dynamic/shortfall_groups`, the rollouts' `monitor/identity_rate`,
`invalid_rate`, `truncated_rate`, `top1_demoted_rate`, `ndcg_at_5`, `forced_token_share`,
TRL's `completions/mean_length` and `clip_ratio/*`. Every rollout
is appended to `completions.jsonl` in the output folder (step, prompt index, completion,
reward, reason) so samples can be read or attached as an artifact.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import torch

from data_contracts.config import EngineConfig, PromptConfig, RLConfig
from gr2_core import distributed
from gr2_core.catalogue import Catalogue
from gr2_core.decoding import AnswerProcessor
from gr2_core.generation import SERVED_NAME, VLLMEngine, backend_of, machines_for, vllm_server
from gr2_core.metrics import ndcg_at_k
from gr2_core.output import Log, StageOutput
from gr2_core.prompts import CoWatch, student_messages
from gr2_core.rerank_eval import eval_slates
from gr2_core.rewards import (
    FormatReward,
    RankReward,
    RerankReward,
    completion_text,
    monitor,
)


def _pad_cat(tensors: list[torch.Tensor], value, left: bool) -> torch.Tensor:
    """Concatenate (B_i, T_i) tensors along the batch, padding the time axis to the widest."""
    width = max(t.shape[1] for t in tensors)
    out = []
    for t in tensors:
        gap = width - t.shape[1]
        if gap:
            fill = t.new_full((t.shape[0], gap), value)
            t = torch.cat([fill, t] if left else [t, fill], dim=1)
        out.append(t)
    return torch.cat(out)


# keys of the parent's output that this class knows how to select and concatenate
_PROMPT_KEYS = {"prompt_ids": "pad", "prompt_mask": 0}
_COMPLETION_KEYS = {
    "completion_ids": "pad",
    "completion_mask": 0,
    "old_per_token_logps": 0.0,
    "sampling_per_token_logps": 0.0,
    "ref_per_token_logps": 0.0,
    "importance_sampling_ratio": 1.0,
    "tool_mask": 1,
}


def select_groups(outputs: list[dict], picks: list[tuple[int, int]], group: int, pad_id: int):
    """One batch dict made of the chosen groups: `picks` = (output index, group index) pairs."""
    merged: dict = {}
    for key in outputs[0]:
        if key == "num_items_in_batch":
            continue
        parts = []
        for o, g in picks:
            value = outputs[o][key]
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"dynamic sampling cannot merge the non-tensor field {key!r}")
            parts.append(value[g * group : (g + 1) * group])
        if key == "advantages" or parts[0].dim() == 1:
            merged[key] = torch.cat(parts)
        elif key in _PROMPT_KEYS:
            fill = pad_id if _PROMPT_KEYS[key] == "pad" else _PROMPT_KEYS[key]
            merged[key] = _pad_cat(parts, fill, left=True)
        elif key in _COMPLETION_KEYS:
            fill = pad_id if _COMPLETION_KEYS[key] == "pad" else _COMPLETION_KEYS[key]
            merged[key] = _pad_cat(parts, fill, left=False)
        else:
            raise TypeError(f"dynamic sampling cannot merge the field {key!r} (multimodal input?)")
    mask = merged["completion_mask"]
    if "tool_mask" in merged:
        mask = mask * merged["tool_mask"]
    merged["num_items_in_batch"] = mask.sum()
    return merged


def completion_logps(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    keep: int,
    temperature: float,
    batch_size: int,
    entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probabilities (and entropies) of the last `keep` tokens of each row under
    `model` at `temperature`, in chunks of `batch_size` rows: the backbone runs over the whole
    sequence, the LM head over the `keep` positions that predict those tokens only."""
    from trl.trainer.utils import selective_log_softmax, selective_log_softmax_and_entropy

    logps, entropies = [], []
    for start in range(0, input_ids.size(0), batch_size):
        ids = input_ids[start : start + batch_size]
        out = model(
            input_ids=ids,
            attention_mask=attention_mask[start : start + batch_size],
            logits_to_keep=keep + 1,
            use_cache=False,
        )
        logits = out.logits[:, :-1].float()  # position t predicts token t + 1
        target = ids[:, -keep:]
        if entropy:
            lp, ent = selective_log_softmax_and_entropy(
                logits, target, entropy_requires_grad=False, temperature=temperature
            )
            entropies.append(ent)
        else:
            lp = selective_log_softmax(logits, target, temperature=temperature)
        logps.append(lp)
    return torch.cat(logps), torch.cat(entropies) if entropy else None


def dapo_trainer_class():
    """GRPOTrainer with dynamic sampling and the reranking monitors (TRL imported lazily)."""
    from trl import GRPOTrainer

    class DAPOTrainer(GRPOTrainer):
        """TRL's GRPOTrainer plus DAPO's dynamic sampling; see the module docstring.

        Extra arguments: `dynamic_sampling` (bool), `max_rounds` (extra generation rounds per
        batch), `filter_on` (names of the reward functions whose weighted sum decides whether a
        group is informative: the task reward), `monitor_reward` (a `RerankReward` whose
        judgements feed the monitors), `rollout_log` (path of the JSONL of rollouts; None: none
        written), `budget` (the reasoning budget every rollout is forced to), `slate_sids`
        (the list constrained to the slate); forced tokens are masked out of the loss.
        `engine` (a `VLLMEngine` on a server started with weight reloads allowed): rollouts come
        from it, the policy's weights written to `sync_dir` and reloaded by the server whenever
        the optimizer has stepped since the last rollout batch; the loss's log-probabilities
        still come from the trainer's model. None: transformers' generate in this process.
        """

        def __init__(
            self,
            *args,
            dynamic_sampling: bool = True,
            max_rounds: int = 4,
            filter_on: tuple[str, ...] = ("rerank",),
            monitor_reward: RerankReward | None = None,
            rollout_log: str | Path | None = None,
            budget: int = 64,
            slate_sids: bool = False,
            engine=None,
            sync_dir: str | Path | None = None,
            **kwargs,
        ):
            super().__init__(*args, **kwargs)
            if engine is not None and sync_dir is None:
                raise ValueError("rollouts from an engine need a sync_dir for the weights")
            if engine is not None and sharded_weights(self):
                raise NotImplementedError(
                    "rollouts from a vLLM server need the whole policy in the main process to "
                    "sync it; with FSDP or DeepSpeed ZeRO-3 it holds a shard: train DAPO with "
                    "DDP or ZeRO-2 (rl.launch_config), or set engine.backend=transformers"
                )
            self.engine, self.sync_dir = engine, sync_dir
            self._served_step = -1  # the first rollout batch syncs (a resumed policy too)
            self._rollout_batches = 0
            self.budget = budget
            self.slate_sids = slate_sids
            self._slates: list[list[str]] | None = None
            self.dynamic_sampling = dynamic_sampling
            self.max_rounds = max_rounds
            unknown = set(filter_on) - set(self.reward_func_names)
            if unknown:
                raise ValueError(
                    f"filter_on names {sorted(unknown)}, not among the reward functions "
                    f"{self.reward_func_names}"
                )
            self.filter_on = tuple(filter_on)
            self._forced: list[set[int]] | None = None
            self.monitor_reward = monitor_reward
            self.rollout_log = Path(rollout_log) if rollout_log else None
            self.dynamic_history: list[dict] = []
            self._round_rewards: torch.Tensor | None = None
            self._round = 0  # the generation round of the rollout batch (dynamic sampling)

        # -- log-probabilities of the completion tokens only, on CPU ---------------------------
        def _get_per_token_logps_and_entropies(
            self,
            model,
            input_ids,
            attention_mask,
            logits_to_keep,
            batch_size=None,
            compute_entropy=False,
            compute_aux_loss=False,
            **multimodal,
        ):
            """TRL's fused LM head scores only the completion's positions where Triton runs; on
            CPU it projects every position, prompt included, through the 49k-way head in fp32
            tiles (about 40% of a DAPO step here, with prompts 4x longer than the completions).
            On CPU the head projects the completion's positions only; elsewhere TRL's path."""
            if (
                input_ids.device.type != "cpu"
                or compute_aux_loss
                or self.args.entropy_coef  # an entropy bonus needs the entropy's gradient
                or any(v is not None for v in multimodal.values())
            ):
                return super()._get_per_token_logps_and_entropies(
                    model,
                    input_ids,
                    attention_mask,
                    logits_to_keep,
                    batch_size,
                    compute_entropy,
                    compute_aux_loss,
                    **multimodal,
                )
            with self.accelerator.autocast():  # as TRL's path, under the trainer's precision
                return completion_logps(
                    model,
                    input_ids,
                    attention_mask,
                    logits_to_keep,
                    self.temperature,
                    batch_size or input_ids.size(0),
                    compute_entropy,
                ) + (None,)

        # -- budget-forced rollouts, the list optionally constrained to the slate ---------------
        def _generate_single_turn(self, prompt_ids, *args, **kwargs):
            """Rollouts through the answer machine: from the engine, or from transformers'
            generate one group at a time, each group with its own seed (`_group_seed`), so the
            rollouts do not depend on how the batch is split into processes."""
            if self._slates is None:
                return super()._generate_single_turn(prompt_ids, *args, **kwargs)
            if self.use_vllm or self.use_transformers_continuous_batching:
                raise NotImplementedError(
                    "budget-forced rollouts use transformers' generate; vLLM and continuous "
                    "batching are not wired to the answer machine"
                )
            if len(self._slates) != len(prompt_ids):
                raise RuntimeError(f"{len(prompt_ids)} prompts for {len(self._slates)} slates")
            from transformers import LogitsProcessorList

            method = "constrained" if self.slate_sids else "free"
            machines = machines_for(self._tokenizer, self._slates, method, self.budget)
            longest = max(m.max_tokens() for m in machines)
            if longest > self.max_completion_length:
                raise ValueError(
                    f"rl.max_completion_length ({self.max_completion_length}) is below the "
                    f"longest answer the budget allows ({longest} tokens): raise it"
                )
            if self.engine is not None:
                return self._engine_rollouts(prompt_ids, machines)
            g = self.num_generations if self.model.training else len(prompt_ids)
            completions, forced = [], []
            for start in range(0, len(prompt_ids), g):
                rows = prompt_ids[start : start + g]
                if self.model.training and any(r != rows[0] for r in rows):
                    raise RuntimeError("a rollout group holds different prompts")
                processor = AnswerProcessor(machines[start : start + g])
                seed = self._group_seed(start // g)
                done, _ = self._sample(rows, LogitsProcessorList([processor]), seed, args, kwargs)
                completions += done
                forced += [{i for i, f in enumerate(row) if f} for row in processor.forced]
            self._forced = forced
            return completions, None

        def _group_seed(self, group: int) -> int:
            """The sampling seed of one group of this rollout batch: the step, the generation
            round and the group's place in the global batch (so the same on any number of
            processes)."""
            first = self.accelerator.process_index * len(self._slates) // self.num_generations
            base = self.args.seed * 1_000_003 + self.state.global_step * 101 + self._round
            return base * 7_919 + first + group

        def _sample(self, prompt_ids, processor, seed: int, args, kwargs):
            """TRL's generation of one group with the answer machine's logits processor and a
            seed of its own (the global random state is left as it was)."""
            model = self.accelerator.unwrap_model(self.model)
            # TRL calls model.generate(**inputs, generation_config=...) and has no argument for
            # a logits processor: add it to that one call, then restore the method
            own = vars(model).get("generate")  # an instance-level generate, if any, comes back
            model.generate = functools.partial(model.generate, logits_processor=processor)
            devices = [self.accelerator.device] if self.accelerator.device.type == "cuda" else []
            try:
                with torch.random.fork_rng(devices=devices):
                    torch.manual_seed(seed)
                    return super()._generate_single_turn(prompt_ids, *args, **kwargs)
            finally:
                if own is None:
                    del model.generate
                else:
                    model.generate = own

        def _engine_rollouts(self, prompt_ids, machines):
            """Rollouts sampled by the engine from the current policy: its weights are synced
            first if the optimizer stepped since the server last loaded them."""
            mode = "train" if self.model.training else "eval"
            if self._served_step != self.state.global_step:
                # one server for every process: the main one writes the weights (the same on
                # every data-parallel process) and has it reload them, the others wait
                if self.accelerator.is_main_process:
                    model = self.accelerator.unwrap_model(self.model)
                    took = self.engine.load_weights(model, self.sync_dir)
                    self._metrics[mode]["timing/weight_sync_s"].append(took)
                self.accelerator.wait_for_everyone()
                self._served_step = self.state.global_step
            self._rollout_batches += 1
            seed = self.args.seed * 1_000_003 + self._rollout_batches * 10_007
            seed += self.accelerator.process_index * len(prompt_ids)  # a seed per global row
            start = time.perf_counter()
            done = self.engine.complete(
                prompt_ids, machines, temperature=self.temperature, top_p=self.top_p, seed=seed
            )
            self._metrics[mode]["timing/generate_s"].append(time.perf_counter() - start)
            self._forced = [{i for i, f in enumerate(c.forced) if f} for c in done]
            return [list(c.token_ids) for c in done], None

        # -- rewards of the round (every process's), kept for the group selection -------------
        def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
            per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
            weights = self.reward_weights.to(per_func.device)
            self._round_rewards = task_signal(
                per_func, weights, self.reward_func_names, self.filter_on
            )
            total = (per_func * weights.unsqueeze(0)).nansum(dim=1)
            mine = self.accelerator.process_index * len(prompts)  # TRL gathered every process's
            self._record(inputs, completions, completion_ids_list, total[mine:][: len(prompts)])
            return per_func

        # -- forced tokens of constrained rollouts: out of the loss ---------------------------
        def _mask_forced(self, out: dict) -> dict:
            """Zero the loss mask (`tool_mask`) at the tokens the slate processor forced."""
            forced, self._forced = self._forced, None
            if forced is None:
                return out
            mask = out["completion_mask"]
            out["tool_mask"] = loss_mask_without(mask, out.get("tool_mask"), forced)
            # the loss is normalised by the trained tokens of every process (as TRL counts them)
            out["num_items_in_batch"] = self.accelerator.gather((mask * out["tool_mask"]).sum())
            out["num_items_in_batch"] = out["num_items_in_batch"].sum()
            if self.model.training:
                tokens = self.accelerator.gather(mask.sum()).sum().clamp(min=1)
                share = 1.0 - float(out["num_items_in_batch"] / tokens)
                self._metrics["train"]["monitor/forced_token_share"].append(share)
            return out

        def _generate_round(self, inputs):
            """One generation round (parent), with forced tokens masked out of the loss."""
            self._slates = [x["slate"] for x in inputs]
            return self._mask_forced(super()._generate_and_score_completions(inputs))

        def _record(self, inputs, completions, completion_ids_list, rewards) -> None:
            if self.monitor_reward is None or not self.model.training:
                return
            slates = [x["slate"] for x in inputs]
            targets = [x["target"] for x in inputs]
            judged = self.monitor_reward.judgements(
                completions, slates, targets, completion_ids_list
            )
            # every process judges its own rollouts (as many on each): the means over processes
            values = monitor(judged)
            ndcg = ndcg_at_k([j.output_rank for j in judged], 5)  # 0 = miss or unrankable
            values["ndcg_at_5"] = float(ndcg.mean())
            local = torch.tensor(list(values.values()), device=self.accelerator.device)
            means = self.accelerator.gather(local).view(-1, len(values)).mean(dim=0).tolist()
            for name, value in zip(values, means, strict=True):
                self._metrics["train"][f"monitor/{name}"].append(value)
            if self.rollout_log is None:
                return
            rows = [
                {
                    "step": self.state.global_step,
                    "prompt": x.get("prompt_index"),
                    "completion": completion_text(c),
                    "reward": r,
                    "reason": j.reason,
                    "identity": j.identity,
                }
                for x, c, r, j in zip(inputs, completions, rewards.tolist(), judged, strict=True)
            ]
            rows = self._gather_objects(rows)  # in the global batch's order
            if self.accelerator.is_main_process:
                self.rollout_log.parent.mkdir(parents=True, exist_ok=True)
                with self.rollout_log.open("a", encoding="utf-8") as f:
                    for row in rows:
                        f.write(json.dumps(row, ensure_ascii=False) + "\n")

        def _gather_objects(self, items: list) -> list:
            """Every process's `items`, concatenated in process order (on every process)."""
            if self.accelerator.num_processes == 1:
                return items
            from accelerate.utils import gather_object

            return gather_object(items)

        # -- dynamic sampling -----------------------------------------------------------------
        def _informative(self, rewards: torch.Tensor) -> torch.Tensor:
            """Per group: True if its rewards are not all equal."""
            grouped = rewards.view(-1, self.num_generations)
            spread = grouped.max(dim=1).values - grouped.min(dim=1).values
            return spread > 1e-6

        def _draw(self, groups: int, round_: int) -> list[dict]:
            """`groups` fresh prompts from the training set for this process, each repeated for
            its group: this process's share of one draw for the global batch (the same draw on
            any number of processes)."""
            gen = torch.Generator().manual_seed(
                self.args.seed * 1_000_003 + self.state.global_step * 101 + round_
            )
            total = groups * self.accelerator.num_processes
            idx = torch.randint(len(self.train_dataset), (total,), generator=gen).tolist()
            mine = idx[self.accelerator.process_index * groups :][:groups]
            return [dict(self.train_dataset[i]) for i in mine for _ in range(self.num_generations)]

        def _generate_and_score_completions(self, inputs):
            """One rollout batch; with dynamic sampling, rounds of fresh prompts until the global
            batch holds as many informative groups as it had groups (or the rounds run out).
            The rewards are every process's (TRL gathers them), so every process takes the same
            decisions; the chosen groups are gathered and each process keeps its share."""
            self._round = 0
            out = self._generate_round(inputs)
            if not (self.dynamic_sampling and self.model.training):
                return out
            g = self.num_generations
            local = len(inputs) // g  # groups on this process
            need = local * self.accelerator.num_processes  # groups in the global batch
            outputs = [out]  # this process's part of each round
            keep = self._informative(self._round_rewards)
            before = 1.0 - keep.float().mean().item()
            picks = [(0, i) for i in range(need) if keep[i]]
            spare = [(0, i) for i in range(need) if not keep[i]]
            rounds = 0
            while len(picks) < need and rounds < self.max_rounds:
                rounds += 1
                self._round = rounds
                outputs.append(self._generate_round(self._draw(local, rounds)))
                ok = self._informative(self._round_rewards)
                picks += [(rounds, i) for i in range(need) if ok[i]]
                spare += [(rounds, i) for i in range(need) if not ok[i]]
            shortfall = max(need - len(picks), 0)
            picks = (picks + spare[:shortfall])[:need]
            if picks != [(0, i) for i in range(need)]:
                out = self._take_groups(outputs, picks, local)
            stats = {
                "step": self.state.global_step,
                "zero_std_before": before,
                "zero_std_after": shortfall / need,
                "extra_rounds": rounds,
                "shortfall_groups": shortfall,
            }
            self.dynamic_history.append(stats)
            for k in ("zero_std_before", "zero_std_after", "extra_rounds", "shortfall_groups"):
                self._metrics["train"][f"dynamic/{k}"].append(float(stats[k]))
            return out

        def _take_groups(self, outputs: list[dict], picks: list[tuple[int, int]], local: int):
            """This process's share of the batch made of the `picks` (round, global group):
            every process's rounds are gathered, the picked groups merged in order (the loss
            normaliser counts them all), and the process keeps its `local` groups."""
            procs, rank = self.accelerator.num_processes, self.accelerator.process_index
            device = self.accelerator.device
            if procs > 1:  # round r of process p at index r * procs + p
                parts = [{k: v.cpu() for k, v in o.items()} for o in outputs]
                outputs = self._gather_objects(parts)
                outputs = [
                    outputs[p * len(parts) + r] for r in range(len(parts)) for p in range(procs)
                ]
            at = [(r * procs + i // local, i % local) for r, i in picks]
            merged = select_groups(outputs, at, self.num_generations, self._tokenizer.pad_token_id)
            rows = slice(
                rank * local * self.num_generations, (rank + 1) * local * self.num_generations
            )
            mine = {k: v[rows].to(device) for k, v in merged.items() if k != "num_items_in_batch"}
            mine["num_items_in_batch"] = merged["num_items_in_batch"].to(device)
            return mine

    return DAPOTrainer


def sharded_weights(trainer) -> bool:
    """Whether the trainer's processes each hold only a shard of the weights (FSDP, ZeRO-3)."""
    if getattr(trainer, "is_fsdp_enabled", False):
        return True
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    return plugin is not None and getattr(plugin, "zero_stage", 0) == 3


def loss_mask_without(
    completion_mask: torch.Tensor, tool_mask: torch.Tensor | None, forced: list[set[int]]
) -> torch.Tensor:
    """The loss mask (TRL's `tool_mask`, 1 = trained) with the forced positions of each row
    zeroed; attention still sees those tokens (`completion_mask` is left as it is).

    >>> loss_mask_without(torch.ones(2, 3), None, [{0, 2}, {5}]).tolist()
    [[0.0, 1.0, 0.0], [1.0, 1.0, 1.0]]
    """
    keep = torch.ones_like(completion_mask) if tool_mask is None else tool_mask.clone()
    for row, positions in enumerate(forced):
        cols = [p for p in positions if p < keep.shape[1]]
        if cols:
            keep[row, cols] = 0
    return keep


def task_signal(
    per_func: torch.Tensor, weights: torch.Tensor, names: list[str], filter_on: tuple[str, ...]
) -> torch.Tensor:
    """Per completion: the weighted sum of the reward functions named in `filter_on` (NaN as 0),
    the signal dynamic sampling reads; shaping rewards (soft overlong) are left out.

    >>> task_signal(torch.tensor([[0.2, -0.5], [0.2, 0.0]]), torch.ones(2),
    ...             ["rerank", "soft_overlong"], ("rerank",)).tolist()
    [0.20000000298023224, 0.20000000298023224]
    """
    pick = torch.tensor([n in filter_on for n in names], device=per_func.device)
    return (per_func * (weights * pick).unsqueeze(0)).nansum(dim=1)


def reward_functions(
    known_sids: frozenset[str],
    eos_token_ids: tuple[int, ...],
    conditional: bool,
    alpha: float,
    max_completion_length: int,
    overlong_cache: int,
) -> tuple[list, list[float]]:
    """The reward functions and their weights: the training reward R (weight 1), soft overlong
    punishment (weight 1, when `overlong_cache` > 0), and R_rank and R_fmt logged at weight 0."""
    from trl.rewards import get_soft_overlong_punishment

    main = RerankReward(known_sids, eos_token_ids, alpha=alpha, conditional=conditional)
    funcs: list = [main]
    weights = [1.0]
    if overlong_cache > 0:
        overlong = get_soft_overlong_punishment(max_completion_length, overlong_cache)
        overlong.__name__ = "soft_overlong"
        funcs.append(overlong)
        weights.append(1.0)
    funcs += [RankReward(known_sids, eos_token_ids), FormatReward(known_sids, eos_token_ids)]
    weights += [0.0, 0.0]
    return funcs, weights


def dapo_args(cfg, output_dir: Path, report_to: tuple[str, ...] = ()):
    """TRL's GRPOConfig for DAPO from an `RLConfig`."""
    from trl import GRPOConfig

    from gr2_core.training import common_args

    accumulation = cfg.mini_batch // cfg.micro_batch
    return GRPOConfig(
        output_dir=str(output_dir),
        loss_type="dapo",
        epsilon=cfg.epsilon_low,
        epsilon_high=cfg.epsilon_high,
        beta=0.0,
        mask_truncated_completions=cfg.mask_truncated,
        scale_rewards="group",
        num_generations=cfg.group_size,
        # one rollout batch of prompts_per_step groups, shuffled and split into `mini_batches`
        # optimizer steps (each accumulating micro-batches), reused `num_iterations` times; TRL
        # keeps the sampling policy's log-probs whenever the batch outlives one optimizer step
        per_device_train_batch_size=cfg.micro_batch,
        gradient_accumulation_steps=accumulation,
        steps_per_generation=cfg.rollout_batch // cfg.micro_batch,
        num_iterations=cfg.num_iterations,
        max_completion_length=cfg.max_completion_length,
        temperature=cfg.temperature,
        top_p=1.0,
        learning_rate=cfg.lr,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=cfg.warmup_steps,
        max_steps=cfg.max_steps,
        logging_steps=1,
        gradient_checkpointing=cfg.gradient_checkpointing,
        shuffle_dataset=True,
        **common_args(cfg.seed, cfg.save_steps, report_to),
        log_completions=False,
    )


@distributed.relaunched("cfg")
def train_dapo(
    model_dir,
    rows: list[dict],
    out_dir: Path,
    cfg,
    tok,
    known_sids: frozenset[str],
    conditional: bool = True,
    report_to: tuple[str, ...] = (),
    callbacks: tuple = (),
    extra_rewards: tuple = (),
    budget: int = 64,
    engine=None,
):
    """DAPO from `model_dir` on `rows` (prompt, slate, target, prompt_index) with the
    conditional (GR2) or unconditional reward, resuming from the newest checkpoint in
    `out_dir/checkpoints`. `extra_rewards` are more task rewards (weight 1, part of the
    dynamic-sampling signal); `engine`: a `VLLMEngine` serving `model_dir` with weight reloads
    allowed, for the rollouts (None: transformers' generate). Returns (model, log history).
    With `cfg.processes > 1` the same call runs in that many torchrun processes
    (`gr2_core.distributed`): the rollout batch of each process is `cfg.prompts_per_step` groups,
    dynamic sampling decides on the global batch, and the processes share the engine (the main
    one syncs the weights)."""
    from datasets import Dataset

    from gr2_core.training import load_trainable, resume_point

    model = load_trainable(model_dir, cfg.num_threads)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    eos = eos_token_ids(tok, model)
    funcs, weights = reward_functions(
        known_sids,
        eos,
        conditional,
        cfg.alpha,
        cfg.max_completion_length,
        cfg.overlong_cache,
    )
    funcs += list(extra_rewards)
    weights += [1.0] * len(extra_rewards)
    args = dapo_args(cfg, out_dir / "checkpoints", report_to)
    args.reward_weights = weights
    ckpt = out_dir / "checkpoints"
    trainer = dapo_trainer_class()(
        model=model,
        reward_funcs=funcs,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        callbacks=list(callbacks),
        dynamic_sampling=cfg.dynamic_sampling,
        max_rounds=cfg.max_sampling_rounds,
        filter_on=("rerank", *(f.__name__ for f in extra_rewards)),
        monitor_reward=funcs[0],
        rollout_log=out_dir / "completions.jsonl",
        budget=budget,
        slate_sids=cfg.slate_sids,
        engine=engine,
        sync_dir=out_dir / "served_weights" if engine is not None else None,
    )
    distributed.check_world(trainer.args.world_size, cfg.processes)
    resume = resume_point(ckpt)
    if resume and trainer.is_world_process_zero():  # the main process writes the rollouts
        # rollouts after the checkpoint are generated again: drop their old records
        trim_rollouts(out_dir / "completions.jsonl", int(resume.rsplit("-", 1)[-1]))
    trainer.train(resume_from_checkpoint=resume)
    distributed.finish(trainer)
    return trainer.model, trainer.state.log_history


def eos_token_ids(tok, model) -> tuple[int, ...]:
    """Token ids that end a completion: the tokenizer's EOS and the generation config's."""
    ids = {tok.eos_token_id}
    gen = model.generation_config.eos_token_id
    ids |= {gen} if isinstance(gen, int) else set(gen or ())
    return tuple(sorted(i for i in ids if i is not None))


def trim_rollouts(path: Path, step: int) -> None:
    """Keep the rollout records of steps before `step` (the resume point); a torn last line
    from a crash is dropped too."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("step", 0) < step:
            kept.append(line)
    path.write_text("".join(k + "\n" for k in kept), encoding="utf-8")


def training_rows(
    slates: pl.DataFrame,
    cat: Catalogue,
    prompt: PromptConfig,
    count: int,
    seed: int,
    cowatch: CoWatch | None = None,
) -> list[dict]:
    """Up to `count` training-split slates that contain their target, as DAPO's dataset rows:
    the student prompt, the slate's SIDs and the target's SID."""
    pool = eval_slates(slates, "train", count, seed)
    return [
        {
            "prompt": student_messages(
                r["history"], r["candidates"], cat, prompt, cowatch, r["user_id"]
            ),
            "slate": [cat.sid[c] for c in r["candidates"]],
            "target": cat.sid[r["target"]],
            "prompt_index": k,
        }
        for k, r in enumerate(pool.iter_rows(named=True))
    ]


LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class RLInputs:
    variant: str  # the RL variant's name (data_contracts.rerankers.RL_VARIANTS)
    conditional: bool  # the conditional reward; False: the unconditional ablation
    start: str  # the SFT stage the policy starts from (for the log)
    model: Path  # that SFT stage's model folder
    items: Path  # the data stage's items
    sid_map: Path  # the semantic-ID stage's SID map
    sequences: Path  # the split stage's sequences (co-watch notes)
    slates: Path  # the candidates stage's slates (training slates holding their target)
    prompt: PromptConfig  # the student prompt's settings


def run(
    inputs: RLInputs,
    cfg: RLConfig,
    out: Path,
    report_to: Sequence[str] = (),
    log: Log = LOG,
    engine_cfg: EngineConfig | None = None,
) -> StageOutput:
    """Stage `rl_<variant>`: DAPO with dynamic sampling from an SFT reranker on training slates
    that hold their target; the unconditional variant pays the format bonus unconditionally.
    Rollouts come from the engine of `engine_cfg` (a vLLM server synced to the policy where
    installed; None: transformers' generate). Resumes from its newest checkpoint."""
    from transformers import AutoTokenizer

    from gr2_core.plots import close, rl_curves

    variant = inputs.variant
    tok = AutoTokenizer.from_pretrained(inputs.model)
    cat = Catalogue.build(pl.read_parquet(inputs.items), pl.read_parquet(inputs.sid_map))
    prompt = inputs.prompt
    cowatch = CoWatch(pl.read_parquet(inputs.sequences)) if prompt.cowatch_notes else None
    slates = pl.read_parquet(inputs.slates)
    rows = training_rows(slates, cat, prompt, cfg.slates, cfg.seed, cowatch)
    if not rows:
        raise ValueError(f"rl_{variant}: no training slate contains its target")
    conditional = inputs.conditional
    log.info(
        "rl_%s: DAPO from %s on %d slates, %d steps x %d groups of %d, %s reward",
        variant,
        inputs.start,
        len(rows),
        cfg.max_steps,
        cfg.prompts_per_step,
        cfg.group_size,
        "conditional" if conditional else "unconditional",
    )
    engine_cfg = engine_cfg or EngineConfig(backend="transformers")
    served = backend_of(engine_cfg) == "vllm"
    server = (
        vllm_server(inputs.model, engine_cfg, out / "engine.log", dev_mode=True)
        if served
        else nullcontext()
    )
    with server as url:
        engine = VLLMEngine(url, SERVED_NAME, tok, engine_cfg.concurrency) if served else None
        log.info(
            "rl_%s: rollouts from %s", variant, engine.describe() if served else "transformers"
        )
        model, history = train_dapo(
            inputs.model,
            rows,
            out,
            cfg,
            tok,
            frozenset(cat.sid.values()),
            conditional=conditional,
            report_to=tuple(report_to),
            budget=inputs.prompt.max_explanation_tokens,
            engine=engine,
        )
    model.save_pretrained(out / "model", safe_serialization=True)
    tok.save_pretrained(out / "model")
    (out / "log_history.json").write_text(json.dumps(history, indent=1))
    close(rl_curves({f"rl-{variant}": history}, out / "curves.png"))
    steps = [r for r in history if "monitor/identity_rate" in r]
    steps_done = max((r.get("step", 0) for r in history), default=0)
    metrics = {"train_slates": float(len(rows)), "steps": float(steps_done)}
    if steps:
        last = steps[-1]
        for k in ("monitor/identity_rate", "monitor/invalid_rate", "monitor/ndcg_at_5"):
            metrics[f"final_{k.split('/')[1]}"] = float(last[k])
        metrics["zero_std_before_mean"] = sum(
            r.get("dynamic/zero_std_before", 0.0) for r in steps
        ) / len(steps)
    files = {
        "model": "model",
        "log_history": "log_history.json",
        "rollouts": "completions.jsonl",
        "curves": "curves.png",
    }
    attach = {"curves.png": "", "completions.jsonl": ""}
    return StageOutput(files, metrics, scratch=["checkpoints", "served_weights"], attach=attach)
