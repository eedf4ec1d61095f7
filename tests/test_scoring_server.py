"""The gate in front of MLflow's scoring app (`gr2 serve`): body limit (413), one prediction at a
time in arrival order, a bounded queue (503 + Retry-After), other paths never queued. The app
behind it here is a plain ASGI app that takes a while to answer, so the gate's ordering and
limits can be observed; the deployment test serves a real registered reranker through it."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from tasks.scoring_server import Gate


class SlowApp:
    """Answers `/invocations` after `seconds`, recording order and overlap; `/ping` at once."""

    def __init__(self, seconds: float = 0.2) -> None:
        self.seconds = seconds
        self.active = 0
        self.most_active = 0
        self.bodies: list[bytes] = []

    async def __call__(self, scope, receive, send) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if scope["path"] == "/invocations":
            self.active += 1
            self.most_active = max(self.most_active, self.active)
            await asyncio.sleep(self.seconds)
            self.active -= 1
            self.bodies.append(body)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body or b"pong"})


def _client(gate: Gate) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=gate), base_url="http://test")


def test_bodies_past_the_limit_get_413_naming_it_before_the_model_sees_them():
    inner = SlowApp(0)
    gate = Gate(inner, max_body_bytes=1000)

    async def go():
        async with _client(gate) as client:
            ok = await client.post("/invocations", content=b"x" * 1000)
            big = await client.post("/invocations", content=b"x" * 1001)

            async def stream():  # no Content-Length: counted as it arrives
                for _ in range(5):
                    yield b"y" * 300

            chunked = await client.post("/invocations", content=stream())
            return ok, big, chunked

    ok, big, chunked = asyncio.run(go())
    assert ok.status_code == 200
    for response in (big, chunked):
        assert response.status_code == 413
        body = response.json()
        assert body["error_code"] == "REQUEST_TOO_LARGE"
        assert "1,000 bytes" in body["message"] and "--max-body-bytes" in body["message"]
    assert inner.bodies == [b"x" * 1000]  # the refused bodies never reached the model


def test_one_prediction_at_a_time_in_arrival_order_and_pings_are_never_queued():
    inner = SlowApp(0.2)
    gate = Gate(inner)

    async def go():
        async with _client(gate) as client:
            posts = []
            for i in range(4):
                posts.append(asyncio.create_task(client.post("/invocations", content=b"%d" % i)))
                await asyncio.sleep(0.01)  # arrival order 0, 1, 2, 3
            await asyncio.sleep(0.05)
            loop = asyncio.get_running_loop()
            start = loop.time()
            ping = await client.get("/ping")  # answered while three predictions are queued
            ping_s = loop.time() - start
            return await asyncio.gather(*posts), ping, ping_s

    answers, ping, ping_s = asyncio.run(go())
    assert [a.status_code for a in answers] == [200] * 4
    assert inner.most_active == 1
    assert inner.bodies == [b"0", b"1", b"2", b"3"]
    assert ping.status_code == 200 and ping_s < 0.15
    assert gate.waiting == 0


def test_past_the_queue_limit_requests_get_503_with_retry_after_and_the_queue_drains():
    inner = SlowApp(0.3)
    gate = Gate(inner, max_waiting=1)

    async def go():
        async with _client(gate) as client:
            first = asyncio.create_task(client.post("/invocations", content=b"a"))
            await asyncio.sleep(0.05)  # answering a
            second = asyncio.create_task(client.post("/invocations", content=b"b"))
            await asyncio.sleep(0.05)  # b queued: the queue is full
            third = await client.post("/invocations", content=b"c")
            done = await asyncio.gather(first, second)
            later = await client.post("/invocations", content=b"d")
            return done, third, later

    (first, second), third, later = asyncio.run(go())
    assert (first.status_code, second.status_code, later.status_code) == (200, 200, 200)
    assert third.status_code == 503
    assert third.headers["retry-after"] == "5"
    assert "limit 1" in json.loads(third.text)["message"]
    assert inner.bodies == [b"a", b"b", b"d"]


@pytest.mark.parametrize("path", ["/ping", "/health", "/version"])
def test_other_paths_pass_through_untouched(path):
    inner = SlowApp(0)
    gate = Gate(inner, max_body_bytes=1)

    async def go():
        async with _client(gate) as client:
            return await client.get(path)

    assert asyncio.run(go()).status_code == 200


def test_a_port_with_a_listening_server_is_taken_and_free_once_it_closes():
    import socket

    from tasks.scoring_server import port_free

    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert not port_free("127.0.0.1", port)
    assert port_free("127.0.0.1", port)
