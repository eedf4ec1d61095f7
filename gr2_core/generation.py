"""Answers from a reranker: budget-forced generation on a transformers model.

Every method of answering a slate goes through `AnswerMachine` (`gr2_core.decoding`), so the
explanation is always closed within the reasoning budget and the list always opened:

- `free`: the model writes the list itself (closed for it after a generous length);
- `constrained`: the list is decoded among the slate's SIDs, a permutation by construction, and
  a SID the explanation cites is one of the slate's or the shown history's;
- `scored` (FIRST, arXiv 2406.15657): the list is not decoded; the slate is ordered by the
  model's log-probability of each candidate's SID as the first list item, after the opened list
  (and, optionally, a budget-forced explanation), in one forward pass over the shared prefix.

`HFEngine` runs the machines inside `model.generate` (left-padded batches, one logits processor
per batch); `VLLMEngine` drives a vLLM server's completions endpoint with them. `open_engine`
picks the backend from the `engine` config section: greedy for evaluation and serving, sampled
for RL rollouts.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from gr2_core.decoding import AnswerMachine, AnswerProcessor, AnswerTokens, answer_text
from gr2_core.shards import batch_ranges
from gr2_core.training import autocast

METHODS = ("free", "constrained")  # decoded lists; `scored` ranks without decoding one
SCORED = ("scored", "scored_explained")


@dataclass(frozen=True)
class Completion:
    """One decoded answer: its text (EOS removed), token ids (EOS kept), per-token forced flags,
    whether the budget closed the explanation, and its share of the batch's wall time."""

    text: str
    token_ids: list[int]
    forced: list[bool]
    forced_close: bool
    seconds: float
    scores: list[float] | None = None  # scoring mode: per slate SID, in slate order


def prompt_ids(tok, messages: list[dict]) -> list[int]:
    """The chat prompt's token ids, generation prompt included."""
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


def scoring_head(tok, prompt: list[int]) -> list[int]:
    """Scoring mode's prefix without an explanation: the prompt's tokens, then the answer opened
    with an empty explanation up to where the list's first SID goes."""
    fmt = AnswerTokens.of(tok)
    return [*prompt, *fmt.open, *fmt.close]


def sid_ids(tok, sids: Sequence[str]) -> list[list[int]]:
    return [tok(s, add_special_tokens=False)["input_ids"] for s in sids]


def machines_for(
    tok,
    slates: Sequence[Sequence[str]],
    method: str,
    budget: int,
    histories: Sequence[Sequence[str]] | None = None,
) -> list[AnswerMachine]:
    """One machine per slate; a free list may take the slate's own list length plus 8 tokens.
    `histories`: per slate, the SIDs of the history shown, citable under `constrained`."""
    if method not in METHODS:
        raise ValueError(f"unknown decoding method {method!r}; one of {METHODS}")
    fmt = AnswerTokens.of(tok)
    out = []
    for i, slate in enumerate(slates):
        ids = sid_ids(tok, slate)
        length = sum(map(len, ids)) + (len(ids) - 1) * len(fmt.sep) + len(fmt.end) + 8
        if method == "free":
            out.append(AnswerMachine(fmt, budget, None, list_budget=length))
            continue
        cite = ids + sid_ids(tok, histories[i]) if histories is not None else ids
        out.append(AnswerMachine(fmt, budget, ids, list_budget=length, cite=cite))
    return out


def _check_pairs(prompts: Sequence, machines: Sequence) -> None:
    if len(prompts) != len(machines):
        raise ValueError(f"{len(prompts)} prompts for {len(machines)} answer machines")


class Engine:
    """What every backend shares: answers by method, scoring mode on top of `complete` and
    `_first_item_logprobs`, which a backend provides."""

    tok = None
    batch_size = 8
    score_batch_size: int | None = None  # slates per scoring call (None: batch_size)

    def describe(self, method: str | None = None) -> str:
        """The engine and its batching for `method` (None: decoding), for tables and logs."""
        raise NotImplementedError

    def complete(self, prompts, machines, temperature=0.0, top_p=1.0, progress=None):
        raise NotImplementedError

    def _first_item_logprobs(self, heads, slates):
        raise NotImplementedError

    def answers(
        self,
        messages: Sequence[list[dict]],
        slates: Sequence[Sequence[str]],
        method: str,
        budget: int,
        progress: Callable[[int, int], None] | None = None,
        histories: Sequence[Sequence[str]] | None = None,
    ) -> list[Completion]:
        """Greedy answers to chat prompts by `method` (free or constrained list); `histories`:
        the SIDs of each prompt's history (citable under `constrained`)."""
        prompts = [prompt_ids(self.tok, m) for m in messages]
        machines = machines_for(self.tok, slates, method, budget, histories)
        return self.complete(prompts, machines, progress=progress)

    def run(
        self,
        messages: Sequence[list[dict]],
        slates: Sequence[Sequence[str]],
        method: str,
        budget: int,
        histories: Sequence[Sequence[str]] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[Completion]:
        """Answers by any method of `data_contracts.config.ANSWER_METHODS`."""
        if method in SCORED:
            explain = budget if method == "scored_explained" else 0
            return self.scores(messages, slates, explain, histories, progress)
        return self.answers(messages, slates, method, budget, progress, histories)

    def scores(
        self,
        messages: Sequence[list[dict]],
        slates: Sequence[Sequence[str]],
        budget: int = 0,
        histories: Sequence[Sequence[str]] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[Completion]:
        """Scoring mode: each slate ordered by log P(SID as the first list item | prefix). With
        `budget` > 0 the prefix holds a greedy, budget-forced explanation (citations from the
        slate and `histories`); with 0 it is the opened answer with an empty explanation. The
        completion's text is the answer written out: valid by construction."""
        prompts = [prompt_ids(self.tok, m) for m in messages]
        fmt = AnswerTokens.of(self.tok)
        explanations = [""] * len(prompts)
        heads = [scoring_head(self.tok, p) for p in prompts]
        seconds = [0.0] * len(prompts)
        if budget > 0:
            machines = machines_for(self.tok, slates, "constrained", budget, histories)
            for m in machines:
                m.stop_after_close = True
            done = self.complete(prompts, machines)
            for i, c in enumerate(done):
                ids = c.token_ids[:-1]  # EOS written after the closed explanation
                heads[i] = [*prompts[i], *ids]
                body = ids[len(fmt.open) : len(ids) - len(fmt.close)]
                explanations[i] = json.loads('"' + self.tok.decode(body) + '"')
                seconds[i] = c.seconds
        out = []
        step = self.score_batch_size or self.batch_size
        for b in range(0, len(prompts), step):
            chunk = range(b, min(b + step, len(prompts)))
            start = time.perf_counter()
            logp = self._first_item_logprobs([heads[i] for i in chunk], [slates[i] for i in chunk])
            took = (time.perf_counter() - start) / len(chunk)
            for i, values in zip(chunk, logp, strict=True):
                order = sorted(range(len(values)), key=lambda k: -values[k])
                ranked = [slates[i][k] for k in order]
                text = answer_text(explanations[i], ranked)
                out.append(Completion(text, [], [], False, seconds[i] + took, values))
            if progress:
                progress(len(out), len(prompts))
        return out


class HFEngine(Engine):
    """Budget-forced answers from a transformers causal LM, `batch_size` rows per `generate`,
    its matmuls in bf16 where that is fast (`gr2_core.training.autocast`)."""

    def __init__(self, model, tok, batch_size: int = 8):
        self.model, self.tok, self.batch_size = model, tok, batch_size
        # on CPU one slate per scoring forward is the fastest per slate (the tree mask's
        # attention grows with the batch's padding): 0.42 s a slate at 1, 0.65 at 8 here
        self.score_batch_size = batch_size if model.device.type == "cuda" else 1

    @property
    def precision(self) -> str:
        """bf16 where the model's matmuls run in bf16 (weights or autocast), else fp32."""
        from gr2_core.training import cpu_bf16

        fast = self.model.dtype == torch.bfloat16 or self.model.device.type == "cuda" or cpu_bf16()
        return "bf16" if fast else "fp32"

    def describe(self, method: str | None = None) -> str:
        precision = self.precision
        if method == "scored":
            per = self.score_batch_size or self.batch_size
            return f"transformers, one tree-masked forward per {per} slate(s) ({precision})"
        return f"transformers generate ({precision}), batch {self.batch_size}"

    def complete(
        self,
        prompts: Sequence[Sequence[int]],
        machines: Sequence[AnswerMachine],
        temperature: float = 0.0,
        top_p: float = 1.0,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[Completion]:
        """One completion per (prompt, machine) pair; temperature 0 decodes greedily."""
        _check_pairs(prompts, machines)
        tok, out = self.tok, []
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        for b in range(0, len(prompts), self.batch_size):
            rows = [list(p) for p in prompts[b : b + self.batch_size]]
            batch = list(machines[b : b + self.batch_size])
            width = max(map(len, rows))
            ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
            processor = AnswerProcessor(batch)
            sampling = {"do_sample": False}
            if temperature > 0:
                sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p}
            start = time.perf_counter()
            with torch.no_grad(), autocast(self.model.device):
                gen = self.model.generate(
                    input_ids=ids.to(self.model.device),
                    attention_mask=mask.to(self.model.device),
                    logits_processor=[processor],
                    max_new_tokens=max(m.max_tokens() for m in batch),
                    pad_token_id=pad,
                    eos_token_id=tok.eos_token_id,
                    **sampling,
                )
            took = (time.perf_counter() - start) / len(rows)
            eos = tok.eos_token_id
            for row, m, forced in zip(
                gen[:, width:].tolist(), batch, processor.forced, strict=True
            ):
                n = row.index(eos) + 1 if eos in row else len(row)  # up to and with EOS
                text = tok.decode(row[: n - 1] if row[n - 1] == eos else row[:n])
                out.append(Completion(text, row[:n], forced[:n], m.forced_close, took))
            if progress:
                progress(len(out), len(prompts))
        return out

    def _first_item_logprobs(
        self, heads: list[list[int]], slates: Sequence[Sequence[str]]
    ) -> list[list[float]]:
        """Per head, per slate SID: the summed log-probability of its tokens right after the
        head, in one forward per batch. Each row holds its head followed by every candidate's
        SID tokens; a candidate's tokens attend to the head and to their own earlier tokens
        only, at the positions they would have right after the head (a tree-shaped attention
        mask), so the candidates share the head's prefill with no copy of its cache. The LM
        head runs over the rows' last positions only (the head's last token and the SIDs)."""
        tok, model = self.tok, self.model
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        rows = []  # (tokens, positions, owner per token: -1 head, j candidate j, candidates)
        for head, slate in zip(heads, slates, strict=True):
            cands = sid_ids(tok, slate)
            seq, pos, owner = list(head), list(range(len(head))), [-1] * len(head)
            for j, ids in enumerate(cands):
                seq += ids
                pos += range(len(head), len(head) + len(ids))
                owner += [j] * len(ids)
            rows.append((seq, pos, owner, cands))
        width = max(len(r[0]) for r in rows)
        keep = max(len(r[0]) - r[2].count(-1) for r in rows) + 1  # the SIDs and the head's end
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        allowed = torch.zeros((len(rows), 1, width, width), dtype=torch.bool)
        for b, (seq, pos, owner, _) in enumerate(rows):
            off = width - len(seq)  # left padding
            ids[b, off:] = torch.tensor(seq)
            positions[b, off:] = torch.tensor(pos)
            o = torch.tensor(owner)
            mine = (o[:, None] == o[None, :]) | (o[None, :] == -1)
            allowed[b, 0, off:, off:] = torch.tril(mine)
            allowed[b, 0, range(off), range(off)] = True  # a padding row sees itself only
        with torch.no_grad(), autocast(model.device):
            out = model(
                input_ids=ids.to(model.device),
                attention_mask=allowed.to(model.device),
                position_ids=positions.to(model.device),
                logits_to_keep=keep,
            )
        logp = torch.log_softmax(out.logits.float(), dim=-1).cpu()  # (rows, keep, V)
        result = []
        for b, (seq, _, owner, cands) in enumerate(rows):
            start = keep - (len(seq) - owner.count(-1)) - 1  # the head's last token, in `keep`
            scores, at = [], start + 1
            for c in cands:
                prev = [start] + list(range(at, at + len(c) - 1))  # the position before each
                scores.append(float(logp[b, prev, c].sum()))
                at += len(c)
            result.append(scores)
        return result


class EngineError(RuntimeError):
    """The generation server failed or answered something the answer machine cannot use."""


class VLLMEngine(Engine):
    """Budget-forced answers and scores from a vLLM server's `/v1/completions`, with token ids
    in and out (`return_token_ids`), so the answer machine drives the server exactly as it
    drives `generate`: a free stretch is one request (`max_tokens` = what the machine lets run
    free, `stop_token_ids` = where it changes state, banned tokens at -100 `logit_bias`); a
    choice among several tokens is one request of one token (`allowed_token_ids`); a forced
    token costs no request. Every request resends the prompt so far, and the server's prefix
    cache makes that a lookup, not a prefill: a group of rollouts of one prompt shares its
    prefill. Scoring asks, per node of the slate's SID trie, for the log-probabilities of the
    node's children (`logprob_token_ids`), one token per request, all of a slate at once.
    `concurrency` requests are in flight (the server batches them)."""

    def __init__(
        self,
        base_url: str,
        model: str,
        tok,
        concurrency: int = 16,
        timeout_s: float = 300.0,
        retry=None,
    ):
        from gr2_core.teacher import Retry

        base = base_url.rstrip("/")
        self.base_url = base if base.endswith("/v1") else f"{base}/v1"
        self.model, self.tok, self.concurrency = model, tok, concurrency
        self.batch_size = concurrency
        self.timeout_s = timeout_s
        self.retry = retry or Retry()

    def describe(self, method: str | None = None) -> str:
        if method == "scored":
            return (
                f"vLLM server, one-token requests over the SID trie, {self.concurrency} in flight"
            )
        return f"vLLM server, {self.concurrency} requests in flight"

    # -- transport ----------------------------------------------------------------------------
    def _gather(self, jobs: list) -> list:
        """Run coroutine factories `job(client)` with `concurrency` in flight; results in order."""
        import asyncio

        import httpx

        async def main():
            limit = asyncio.Semaphore(self.concurrency)
            async with httpx.AsyncClient(timeout=self.timeout_s) as client:

                async def one(job):
                    async with limit:
                        return await job(client)

                return await asyncio.gather(*(one(j) for j in jobs))

        return asyncio.run(main())

    async def _completion(self, client, body: dict) -> dict:
        from gr2_core.teacher import post_retrying

        url = f"{self.base_url}/completions"
        answer = await post_retrying(client, url, body, self.retry, EngineError, "engine")
        return answer["choices"][0]

    # -- weights -------------------------------------------------------------------------------
    def load_weights(self, model, folder: str | Path) -> float:
        """Serve `model`'s current weights: write them to `folder` (safetensors), have every
        worker re-read them (`/collective_rpc` `reload_weights`), and drop the prefix cache,
        whose keys and values came from the old weights. The server must run with
        `VLLM_SERVER_DEV_MODE=1` (`serving.vllm_env(dev_mode=True)`). Returns the seconds taken."""
        import httpx

        start = time.perf_counter()
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(folder, safe_serialization=True)
        root = self.base_url.removesuffix("/v1")
        with httpx.Client(timeout=self.timeout_s) as client:
            for path, body in (
                (
                    "/collective_rpc",
                    {"method": "reload_weights", "kwargs": {"weights_path": str(folder)}},
                ),
                ("/reset_prefix_cache", None),
            ):
                resp = client.post(root + path, json=body)
                if resp.status_code != 200:
                    raise EngineError(
                        f"engine {root}{path} answered {resp.status_code}: {resp.text[:300]} "
                        "(weight updates need the server started with VLLM_SERVER_DEV_MODE=1)"
                    )
        return time.perf_counter() - start

    # -- answers ------------------------------------------------------------------------------
    def complete(
        self,
        prompts: Sequence[Sequence[int]],
        machines: Sequence[AnswerMachine],
        temperature: float = 0.0,
        top_p: float = 1.0,
        progress: Callable[[int, int], None] | None = None,
        seed: int = 0,
    ) -> list[Completion]:
        _check_pairs(prompts, machines)
        done = [0]

        def job(i: int):
            async def run(client):
                start = time.perf_counter()
                out = await self._drive(
                    client, list(prompts[i]), machines[i], temperature, top_p, seed + i
                )
                done[0] += 1
                if progress:
                    progress(done[0], len(prompts))
                return out, time.perf_counter() - start

            return run

        start = time.perf_counter()
        results = self._gather([job(i) for i in range(len(prompts))])
        wall = (time.perf_counter() - start) / max(len(prompts), 1)
        eos = self.tok.eos_token_id
        out = []
        for (ids, forced), m in zip((r[0] for r in results), machines, strict=True):
            text = self.tok.decode(ids[:-1] if ids and ids[-1] == eos else ids)
            out.append(Completion(text, ids, forced, m.forced_close, wall))
        return out

    async def _drive(self, client, prompt, m: AnswerMachine, temperature, top_p, seed):
        ids: list[int] = []
        forced: list[bool] = []
        while not m.done:
            allowed = m.allowed()
            if allowed is not None and len(allowed) == 1:
                ids.append(allowed[0])
                forced.append(True)
                m.push(allowed[0])
                continue
            body = {
                "model": self.model,
                "prompt": prompt + ids,
                "temperature": temperature,
                "top_p": top_p,
                "seed": seed * 7919 + len(ids),
                "return_token_ids": True,
            }
            if allowed is None:
                limit, stops = m.free_run()
                body |= {"max_tokens": limit, "stop_token_ids": list(stops)}
                banned = m.banned()
                if banned:
                    body["logit_bias"] = {str(t): -100 for t in banned}
            else:
                body |= {"max_tokens": 1, "allowed_token_ids": list(allowed)}
            choice = await self._completion(client, body)
            got = list(choice.get("token_ids") or [])
            if choice.get("finish_reason") == "stop":  # a stop token (or EOS) may be left out
                stop = choice.get("stop_reason")
                end = stop if isinstance(stop, int) else self.tok.eos_token_id
                if not got or got[-1] != end:
                    got.append(end)
            if not got:
                raise EngineError(f"the server returned no token: {json.dumps(choice)[:300]}")
            for t in got:
                if m.done:
                    break
                ids.append(t)
                forced.append(False)
                try:
                    m.push(t)
                except Exception as exc:
                    raise EngineError(f"the server broke the answer's rules: {exc}") from exc
        return ids, forced

    # -- scoring ------------------------------------------------------------------------------
    def _first_item_logprobs(
        self, heads: list[list[int]], slates: Sequence[Sequence[str]]
    ) -> list[list[float]]:
        """Per head, per slate SID: the summed log-probability of its tokens after the head,
        from one request per node of the slate's SID trie (the node's children scored with
        `logprob_token_ids`). The head's own prefill is done once, before the rest."""
        cands = [sid_ids(self.tok, s) for s in slates]
        nodes: list[tuple[int, tuple[int, ...], list[int]]] = []  # (head, prefix, children)
        for h, row in enumerate(cands):
            children: dict[tuple[int, ...], set[int]] = {}
            for sid in row:
                for k in range(len(sid)):
                    children.setdefault(tuple(sid[:k]), set()).add(sid[k])
            nodes += [(h, p, sorted(c)) for p, c in children.items()]

        def job(h: int, prefix: tuple[int, ...], kids: list[int]):
            async def run(client):
                body = {
                    "model": self.model,
                    "prompt": heads[h] + list(prefix),
                    "max_tokens": 1,
                    "temperature": 0.0,
                    "logprobs": 0,
                    "logprob_token_ids": kids,
                    "return_tokens_as_token_ids": True,
                }
                choice = await self._completion(client, body)
                top = (choice.get("logprobs") or {}).get("top_logprobs") or [None]
                scores = {int(k.split(":", 1)[1]): v for k, v in (top[0] or {}).items()}
                missing = [t for t in kids if t not in scores]
                if missing:
                    raise EngineError(f"no log-probability for tokens {missing[:5]} in {choice}")
                return (h, prefix), scores

            return run

        roots = [n for n in nodes if not n[1]]
        rest = [n for n in nodes if n[1]]
        logp: dict[tuple[int, tuple[int, ...]], dict[int, float]] = {}
        for batch in (roots, rest):  # the heads' prefill first, then every node at once
            logp |= dict(self._gather([job(*n) for n in batch]))
        return [
            [sum(logp[(h, tuple(sid[:k]))][sid[k]] for k in range(len(sid))) for sid in row]
            for h, row in enumerate(cands)
        ]


SERVED_NAME = "student"
LOG = logging.getLogger(__name__)


def vllm_python(cfg) -> Path:
    """The vLLM virtualenv's python of an `EngineConfig` (relative: from the project root)."""
    from gr2_core.serving import server_python

    return server_python(cfg.vllm_python)


def backend_of(cfg) -> str:
    """`vllm` or `transformers`: what `cfg.backend` resolves to on this machine."""
    if cfg.backend == "transformers":
        return "transformers"
    if vllm_python(cfg).exists():
        return "vllm"
    if cfg.backend == "vllm":
        raise FileNotFoundError(
            f"engine.backend is vllm but {vllm_python(cfg)} does not exist: run `make "
            "teacher-env` (vLLM on CPU), point engine.vllm_python at a vLLM virtualenv, or set "
            "engine.backend=transformers"
        )
    return "transformers"


@contextmanager
def vllm_server(model_dir: str | Path, cfg, log_path: Path, dev_mode: bool = False):
    """A vLLM server on 127.0.0.1 serving `model_dir` as `student` for the block; yields its
    base URL. `dev_mode` opens the weight-reload endpoints (RL rollouts from the policy)."""
    from gr2_core.serving import ManagedServer, free_port, vllm_command, vllm_env

    port = free_port()
    cmd = vllm_command(
        str(vllm_python(cfg)), str(model_dir), SERVED_NAME, port, cfg.max_model_len, (), cfg.dtype
    )
    server = ManagedServer(
        cmd, port, log_path, vllm_env(cfg.kv_cache_gib, dev_mode=dev_mode), cfg.start_timeout_s
    )
    start = time.perf_counter()
    with server:
        LOG.info(
            "vLLM serving %s on 127.0.0.1:%d, up in %.0f s (log %s)",
            model_dir,
            port,
            time.perf_counter() - start,
            log_path,
        )
        yield f"http://127.0.0.1:{port}"


@dataclass(frozen=True)
class AnswerShard:
    """One shard of an evaluation's answers, answered by a transformers engine of its own (a
    task on the stage's task runner, e.g. a Ray worker): `Engine.run`'s arguments."""

    model_dir: str
    messages: list[list[dict]]
    slates: list[list[str]]
    method: str
    budget: int
    histories: list[list[str]] | None
    batch_size: int
    num_threads: int
    index: int = 0  # the shard's place in the list


def answer_shard(shard: AnswerShard) -> list[Completion]:
    """A shard's answers from the transformers model in `shard.model_dir`."""
    from transformers import AutoTokenizer

    from data_contracts.config import EngineConfig

    tok = AutoTokenizer.from_pretrained(shard.model_dir)
    local = EngineConfig(backend="transformers")
    with open_engine(
        shard.model_dir, tok, local, Path(), shard.batch_size, shard.num_threads
    ) as engine:
        return engine.run(shard.messages, shard.slates, shard.method, shard.budget, shard.histories)


MapShards = Callable[[list[AnswerShard]], list[list[Completion]]]


class ShardedEngine(Engine):
    """The transformers engine's answers computed in `shards` parts through `map_shards` (the
    stage's task runner: Ray tasks), each a whole number of batches of `batch_size`, so every
    generate call holds the same rows as in one process and the answers are the same."""

    def __init__(
        self, model_dir, tok, batch_size: int, num_threads: int, shards: int, map_shards: MapShards
    ):
        self.model_dir, self.tok, self.batch_size = str(model_dir), tok, batch_size
        self.num_threads, self.shards, self.map_shards = num_threads, shards, map_shards

    def describe(self, method: str | None = None) -> str:
        return f"transformers, batch {self.batch_size}, in {self.shards} shards on the runner"

    def run(self, messages, slates, method, budget, histories=None, progress=None):
        n = len(messages)
        if n == 0:
            return []
        parts = [
            AnswerShard(
                self.model_dir,
                list(messages[a:b]),
                [list(x) for x in slates[a:b]],
                method,
                budget,
                [list(h) for h in histories[a:b]] if histories is not None else None,
                self.batch_size,
                self.num_threads,
                k,
            )
            for k, (a, b) in enumerate(batch_ranges(n, self.batch_size, self.shards))
        ]
        done = [c for part in self.map_shards(parts) for c in part]
        if progress:
            progress(len(done), n)
        return done


@contextmanager
def open_engine(
    model_dir: str | Path, tok, cfg, log_path: Path, batch_size: int = 8, num_threads: int = 2
) -> Iterator[Engine]:
    """The engine of an `EngineConfig` for the reranker in `model_dir`, for the block: a vLLM
    server started on it (stopped after), or the transformers model loaded in this process
    (`batch_size` rows per `generate`, on the GPU when there is one)."""
    if backend_of(cfg) == "vllm":
        with vllm_server(model_dir, cfg, log_path) as url:
            yield VLLMEngine(url, SERVED_NAME, tok, concurrency=cfg.concurrency)
        return
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(num_threads)
    lm = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    if torch.cuda.is_available():
        lm = lm.to("cuda", dtype=torch.bfloat16)
    yield HFEngine(lm, tok, batch_size)
