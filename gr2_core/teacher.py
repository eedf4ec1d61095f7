"""Teacher backends behind one interface: an OpenAI-compatible server, or a local HF model.

`Teacher.sample(request)` returns `request.n` answer texts for one chat prompt. Backends:

- `OpenAITeacher`: any chat-completions endpoint (vLLM, llama.cpp's server, a hosted provider).
  A bounded number of requests in flight, a timeout per request, retries with exponential
  backoff (and the server's Retry-After) on 429, 5xx, timeouts and connection errors, a seed per
  request. Capabilities are settings, since servers differ: `n` (several samples per request),
  structured output (`json_schema`, llama.cpp's `json_object` + schema, or none) and `stepwise`
  answer decoding (vLLM only: the explanation first, then each recommendation chosen among the
  slate's SIDs not yet used, via `continue_final_message` + `structured_outputs.choice`, so every
  answer is a permutation of the slate; the top-1 stays the teacher's choice). The API key comes
  from the caller (environment variable or secret store) and is never logged or repr'd.
- `HFTeacher`: a local transformers model, left-padded batched sampling.
- `gr2_core.grounded.GroundedTeacher` (mode `grounded`): no model; it composes the answer from
  the request's slate and the facts its prompt shows.

Whatever a backend promises, the caller's parser and filter stay strict.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, Literal, Protocol

import httpx

log = logging.getLogger(__name__)

StructuredOutput = Literal["json_schema", "json_object", "none"]


@dataclass(frozen=True)
class TeacherRequest:
    """One prompt: `n` samples wanted, a seed, the slate's SIDs for structured decoding, and
    the slate it was written from (`slate_facts`: the traces stage's job; only the grounded
    teacher reads it, model teachers answer the messages)."""

    messages: list[dict[str, str]]
    n: int = 1
    seed: int = 0
    slate: tuple[str, ...] = ()
    slate_facts: Any = field(default=None, compare=False, repr=False)


@dataclass
class TeacherReply:
    """The samples for one request, with usage and wall time (seconds)."""

    texts: list[str]
    finish_reasons: list[str]
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0


class TeacherError(RuntimeError):
    """A request that failed for good (after retries, or a 4xx that retrying cannot fix)."""


class Teacher(Protocol):
    name: str

    def sample_many(
        self,
        requests: Sequence[TeacherRequest],
        on_reply: Callable[[int, TeacherReply | TeacherError], None],
    ) -> None:
        """Answer every request, calling `on_reply(index, reply)` as each finishes."""


def answer_schema(slate: Sequence[str], explanation_chars: int) -> dict:
    """JSON schema of one answer: an explanation and exactly |slate| SIDs from the slate.

    (Uniqueness cannot be expressed: vLLM's grammar engine rejects `uniqueItems`.)
    """
    return {
        "type": "object",
        "properties": {
            "explanation": {"type": "string", "maxLength": explanation_chars},
            "recommendations": {
                "type": "array",
                "items": {"type": "string", "enum": list(slate)},
                "minItems": len(slate),
                "maxItems": len(slate),
            },
        },
        "required": ["explanation", "recommendations"],
        "additionalProperties": False,
    }


@dataclass
class Retry:
    """Retry policy: attempts, exponential backoff from `base` seconds capped at `cap`."""

    max_retries: int = 5
    base: float = 1.0
    cap: float = 30.0

    def delay(self, attempt: int, retry_after: str | None = None) -> float:
        if retry_after:
            try:
                return min(float(retry_after), self.cap)
            except ValueError:
                pass
        return min(self.cap, self.base * 2**attempt) * (0.5 + random.random() / 2)


RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


async def post_retrying(
    client: httpx.AsyncClient,
    url: str,
    body: dict,
    retry: Retry,
    error: type[Exception],
    who: str,
) -> dict:
    """POST `body` and return the JSON answer, retrying 429/5xx/timeouts/connection errors with
    backoff (the server's Retry-After first); any other status, or the last failure, raises
    `error` naming `who` and the URL."""
    for attempt in range(retry.max_retries + 1):
        retry_after = None
        try:
            resp = await client.post(url, json=body)
            if resp.status_code == 200:
                return resp.json()
            if resp.status_code not in RETRY_STATUS:
                raise error(f"{who} {url} answered {resp.status_code}: {resp.text[:300]}")
            problem = f"HTTP {resp.status_code}"
            retry_after = resp.headers.get("retry-after")
        except (httpx.TransportError, httpx.TimeoutException) as exc:
            problem = f"{type(exc).__name__}: {exc}"
        if attempt == retry.max_retries:
            raise error(f"{who} {url} failed after {attempt + 1} tries, last: {problem}")
        wait = retry.delay(attempt, retry_after)
        log.warning("%s: %s; retry %d in %.1f s", who, problem, attempt + 1, wait)
        await asyncio.sleep(wait)
    raise AssertionError("unreachable")


@dataclass
class OpenAITeacher:
    """Chat-completions client with concurrency limit, timeouts, retries and seeds."""

    base_url: str
    model: str
    _: KW_ONLY  # every setting below by name
    api_key: str | None = field(default=None, repr=False)
    concurrency: int = 4
    timeout_s: float = 300.0
    retry: Retry = field(default_factory=Retry)
    max_tokens: int = 512
    temperature: float = 0.8
    top_p: float = 0.95
    structured: StructuredOutput = "json_schema"
    use_n: bool = True
    stepwise: bool = False
    explanation_chars: int = 400
    name: str = "openai"

    def __post_init__(self) -> None:
        self.base_url = self.base_url.rstrip("/")
        if not self.base_url.endswith("/v1"):
            self.base_url += "/v1"

    # -- one HTTP call with retries -------------------------------------------------------
    async def _post(self, client: httpx.AsyncClient, body: dict) -> dict:
        url = f"{self.base_url}/chat/completions"
        return await post_retrying(client, url, body, self.retry, TeacherError, "teacher")

    def _body(self, messages: list[dict], n: int, seed: int, slate: Sequence[str]) -> dict:
        body: dict = {
            "model": self.model,
            "messages": messages,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": seed,
        }
        if n > 1:
            body["n"] = n
        if self.structured != "none" and slate:
            schema = answer_schema(slate, self.explanation_chars)
            if self.structured == "json_schema":
                body["response_format"] = {
                    "type": "json_schema",
                    "json_schema": {"name": "rerank_answer", "schema": schema, "strict": True},
                }
            else:  # llama.cpp: json_object with a schema
                body["response_format"] = {"type": "json_object", "schema": schema}
        return body

    async def _free(self, client: httpx.AsyncClient, req: TeacherRequest) -> TeacherReply:
        """n samples: one request with `n`, or n requests with seeds seed, seed+1, ..."""
        start = time.perf_counter()
        if self.use_n or req.n == 1:
            calls = [self._body(req.messages, req.n, req.seed, req.slate)]
        else:
            calls = [self._body(req.messages, 1, req.seed + i, req.slate) for i in range(req.n)]
        outs = await asyncio.gather(*(self._post(client, b) for b in calls))
        reply = TeacherReply([], [])
        for out in outs:
            for choice in out["choices"]:
                reply.texts.append(choice["message"]["content"] or "")
                reply.finish_reasons.append(choice.get("finish_reason") or "unknown")
            usage = out.get("usage") or {}
            reply.prompt_tokens += usage.get("prompt_tokens", 0)
            reply.completion_tokens += usage.get("completion_tokens", 0)
        reply.seconds = time.perf_counter() - start
        return reply

    async def _stepwise_one(
        self, client: httpx.AsyncClient, req: TeacherRequest, seed: int, explanation: str
    ) -> tuple[str, int]:
        """Choose the recommendations one at a time among the SIDs not yet chosen."""
        text = '{"explanation": ' + json.dumps(explanation, ensure_ascii=False)
        text += ', "recommendations": ["'
        left, tokens = list(req.slate), 0
        for step in range(len(req.slate)):
            end = '", "' if len(left) > 1 else '"]}'
            if len(left) == 1:
                choice = left[0]
            else:
                body = self._continue(req.messages, text, seed + step)
                body["structured_outputs"] = {"choice": left}
                body["max_tokens"] = 64
                out = await self._post(client, body)
                choice = out["choices"][0]["message"]["content"] or ""
                tokens += (out.get("usage") or {}).get("completion_tokens", 0)
                if choice not in left:  # a server that ignored the constraint
                    return text + choice, tokens
            left.remove(choice)
            text += choice + end
        return text, tokens

    def _continue(self, messages: list[dict], partial: str, seed: int) -> dict:
        body = self._body(messages + [{"role": "assistant", "content": partial}], 1, seed, ())
        body["continue_final_message"] = True
        body["add_generation_prompt"] = False
        return body

    async def _stepwise(self, client: httpx.AsyncClient, req: TeacherRequest) -> TeacherReply:
        start = time.perf_counter()
        head = '{"explanation": "'
        body = self._continue(req.messages, head, req.seed)
        # a JSON string body without quotes or backslashes, then the closing quote
        body["structured_outputs"] = {"regex": f'[^"\\\\\\n]{{1,{self.explanation_chars}}}"'}
        if req.n > 1:
            body["n"] = req.n
        out = await self._post(client, body)
        reply = TeacherReply([], [])
        reply.prompt_tokens = (out.get("usage") or {}).get("prompt_tokens", 0)
        reply.completion_tokens = (out.get("usage") or {}).get("completion_tokens", 0)
        jobs = []
        for i, choice in enumerate(out["choices"]):
            raw = choice["message"]["content"] or ""
            if choice.get("finish_reason") == "length" or not raw.endswith('"'):
                jobs.append(None)
                reply.texts.append(head + raw)
                reply.finish_reasons.append(choice.get("finish_reason") or "length")
                continue
            seed = req.seed + 1000 * (i + 1)
            jobs.append(self._stepwise_one(client, req, seed, raw[:-1]))
            reply.texts.append("")
            reply.finish_reasons.append("stop")
        done = await asyncio.gather(*(j for j in jobs if j is not None))
        it = iter(done)
        for i, job in enumerate(jobs):
            if job is not None:
                reply.texts[i], tokens = next(it)
                reply.completion_tokens += tokens
        reply.seconds = time.perf_counter() - start
        return reply

    async def _run(self, requests: Sequence[TeacherRequest], on_reply) -> None:
        logging.getLogger("httpx").setLevel(logging.WARNING)  # not one INFO line per request
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        limits = httpx.Limits(max_connections=self.concurrency * 4)
        gate = asyncio.Semaphore(self.concurrency)
        timeout = httpx.Timeout(self.timeout_s, connect=min(10.0, self.timeout_s))
        async with httpx.AsyncClient(headers=headers, timeout=timeout, limits=limits) as client:

            async def one(i: int, req: TeacherRequest):
                async with gate:
                    try:
                        if self.stepwise and req.slate:
                            return i, await self._stepwise(client, req)
                        return i, await self._free(client, req)
                    except TeacherError as exc:
                        return i, exc
                    except (ValueError, KeyError, IndexError, TypeError) as exc:  # bad reply body
                        return i, TeacherError(f"teacher sent an unreadable reply: {exc!r}")

            for fut in asyncio.as_completed([one(i, r) for i, r in enumerate(requests)]):
                i, reply = await fut
                on_reply(i, reply)

    def sample_many(self, requests, on_reply) -> None:
        asyncio.run(self._run(requests, on_reply))

    def served_models(self) -> list[str]:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        resp = httpx.get(f"{self.base_url}/models", headers=headers, timeout=10)
        resp.raise_for_status()
        return [m["id"] for m in resp.json()["data"]]


@dataclass
class HFTeacher:
    """A local transformers chat model; requests are sampled in left-padded batches."""

    model_path: str
    max_tokens: int = 512
    temperature: float = 0.8
    top_p: float = 0.95
    batch_size: int = 8
    num_threads: int = 2
    name: str = "hf"

    def sample_many(self, requests, on_reply) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(self.num_threads)
        tok = AutoTokenizer.from_pretrained(self.model_path, padding_side="left")
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        model = AutoModelForCausalLM.from_pretrained(self.model_path).eval()
        flat = [(i, k) for i, r in enumerate(requests) for k in range(r.n)]
        texts: dict[int, list[str]] = {i: [] for i in range(len(requests))}
        reasons: dict[int, list[str]] = {i: [] for i in range(len(requests))}
        usage = {i: [0, 0, 0.0] for i in range(len(requests))}
        for b in range(0, len(flat), self.batch_size):
            chunk = flat[b : b + self.batch_size]
            prompts = [
                tok.apply_chat_template(
                    requests[i].messages, tokenize=False, add_generation_prompt=True
                )
                for i, _ in chunk
            ]
            enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            torch.manual_seed(requests[chunk[0][0]].seed + chunk[0][1])
            start = time.perf_counter()
            with torch.no_grad():
                out = model.generate(
                    **enc,
                    max_new_tokens=self.max_tokens,
                    do_sample=self.temperature > 0,
                    temperature=self.temperature if self.temperature > 0 else None,
                    top_p=self.top_p,
                    pad_token_id=tok.pad_token_id,
                )
            seconds = time.perf_counter() - start
            new = out[:, enc["input_ids"].shape[1] :]
            for row, (i, _) in enumerate(chunk):
                ids = new[row]
                done = (ids == tok.eos_token_id).nonzero()
                length = int(done[0]) if len(done) else len(ids)
                texts[i].append(tok.decode(ids[:length], skip_special_tokens=True))
                reasons[i].append("stop" if len(done) else "length")
                usage[i][0] += int(enc["attention_mask"][row].sum())
                usage[i][1] += length
                usage[i][2] += seconds / len(chunk)
            finished = {i for i, _ in chunk} - {i for i, _ in flat[b + self.batch_size :]}
            for i in sorted(finished):
                p, c, s = usage[i]
                on_reply(i, TeacherReply(texts[i], reasons[i], int(p), int(c), s))
