"""`gr2 serve`: MLflow's own scoring app for a registered reranker, run by uvicorn in this process,
with what a shared endpoint needs in front of it.

The app is `mlflow.pyfunc.scoring_server.init(model)` (the one `mlflow models serve` runs:
`/invocations`, `/ping`, `/health`, `/version`, MLflow's request timeout). `Gate`, a plain ASGI
layer around it, adds three things for `/invocations`:
- a body limit: a request whose body is past `max_body_bytes` is answered 413 naming the limit
  before the body is parsed (the bundle's own limits on rows, candidates and history then give
  400s naming theirs);
- one prediction at a time, first come first served: a prediction already uses every core, so
  requests that ran side by side only slowed each other into MLflow's timeout (504s under 4
  clients). MLflow's timeout now counts a request's own work, not its wait in the queue;
- a bounded queue: past `max_waiting` queued requests, 503 with `Retry-After` at once.
SIGTERM (or Ctrl-C) is uvicorn's graceful shutdown: no new connections, requests in flight or
queued get `graceful_s` seconds to be answered (then are dropped), and the process ends by the
signal it got (uvicorn re-raises it).
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

CACHE_NEUTRAL = True  # serving: never shapes a stage's output

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MAX_BODY_BYTES = 4 * 1024 * 1024  # 64 rows x 5,000 history ids of ~10 bytes fit well within it
MAX_WAITING = 64
GRACEFUL_S = 30
_CODES = {413: "REQUEST_TOO_LARGE", 503: "SERVER_BUSY"}  # MLflow-style error codes


async def _reply(send: Send, status: int, message: str, headers: dict[str, str] | None = None):
    body = json.dumps({"error_code": _CODES.get(status, "ERROR"), "message": message}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class Gate:
    """Body limit, one prediction at a time and a bounded queue for `/invocations`."""

    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int = MAX_BODY_BYTES,
        max_waiting: int = MAX_WAITING,
        path: str = "/invocations",
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_waiting = max_waiting
        self.path = path
        self.waiting = 0
        self._turn: asyncio.Lock | None = None  # made in the server's event loop

    def _too_large(self) -> str:
        return (
            f"request body is larger than the server's limit of {self.max_body_bytes:,} bytes "
            "(`gr2 serve --max-body-bytes`); send fewer rows per request"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != self.path:
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await _reply(send, 413, self._too_large())
            return
        chunks, size = [], 0
        while True:  # read the body here, so a stream without a length is bounded too
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await _reply(send, 413, self._too_large())
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        if self.waiting >= self.max_waiting:
            await _reply(
                send,
                503,
                f"{self.waiting} requests are already queued (limit {self.max_waiting}, "
                "`gr2 serve --max-waiting`); retry later",
                {"retry-after": "5"},
            )
            return
        body = b"".join(chunks)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the client's disconnect, if any

        if self._turn is None:
            self._turn = asyncio.Lock()
        self.waiting += 1  # requests queued for their turn (not the one being answered)
        try:
            await self._turn.acquire()
        finally:  # acquired, or cancelled while queued (shutdown)
            self.waiting -= 1
        try:
            await self.app(scope, replay, send)
        finally:
            self._turn.release()


def port_free(host: str, port: int) -> bool:
    """Whether `host:port` can be bound now (checked before the model is loaded)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        # as uvicorn binds: connections of a server just stopped (TIME_WAIT) do not count
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def build_app(model_uri: str, tracking_uri: str, max_body_bytes: int, max_waiting: int) -> Gate:
    """Load the registered model (`models:/...` from the registry at `tracking_uri`) and wrap
    MLflow's scoring app for it."""
    import mlflow.pyfunc
    from mlflow.pyfunc import scoring_server

    mlflow.set_tracking_uri(tracking_uri)  # this process only serves: the global is its own
    mlflow.set_registry_uri(tracking_uri)
    model = mlflow.pyfunc.load_model(model_uri)
    return Gate(scoring_server.init(model), max_body_bytes, max_waiting)


def serve(
    model_uri: str,
    tracking_uri: str,
    host: str,
    port: int,
    max_body_bytes: int = MAX_BODY_BYTES,
    max_waiting: int = MAX_WAITING,
    graceful_s: int = GRACEFUL_S,
) -> None:
    """Load the model and answer until SIGTERM or Ctrl-C (graceful shutdown)."""
    import uvicorn

    app = build_app(model_uri, tracking_uri, max_body_bytes, max_waiting)
    uvicorn.run(
        app,
        host=host,
        port=port,
        workers=1,
        timeout_graceful_shutdown=graceful_s,
        log_level="info",
    )
