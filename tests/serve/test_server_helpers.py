"""Helpers for the server tests: a real `python -m tessera.serve.api` subprocess on
127.0.0.1, shared by every test module that asks for the same arguments, and small
bounded polling helpers. (No tests here.)"""

from __future__ import annotations

import atexit
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai

MODEL = "smollm2-135m-instruct"
MAX_MODEL_LEN = 1024
START_TIMEOUT_S = 240.0  # loading takes seconds; a busy 2-core machine stretches that
REQUEST_TIMEOUT_S = 120.0
SERVE_COMMAND = (sys.executable, "-m", "tessera.serve.api")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    process: subprocess.Popen
    port: int
    log_path: Path
    api_key: str | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.api_key or "unused",
                             max_retries=0, timeout=REQUEST_TIMEOUT_S, **kwargs)

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=self.api_key or "unused",
                                  max_retries=0, timeout=REQUEST_TIMEOUT_S)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        self.log_path.unlink(missing_ok=True)


def start_server(*extra_args: str, api_key: str | None = None,
                 command: Sequence[str] = SERVE_COMMAND, model: str = MODEL) -> Server:
    """Start a server (`command model ...`) and wait (bounded) until /health answers 200."""
    port = free_port()
    log = Path(tempfile.mkstemp(prefix="tessera-server-", suffix=".log")[1])
    args = [*command, model, "--port", str(port),
            "--max-model-len", str(MAX_MODEL_LEN), "--log-level", "warning", *extra_args]
    if api_key is not None:
        args += ["--api-key", api_key]
    env = {k: v for k, v in os.environ.items() if k != "TESSERA_API_KEY"}
    with open(log, "wb") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
    server = Server(process, port, log, api_key)
    try:
        wait_healthy(server)
    except BaseException:
        server.stop()
        raise
    return server


def wait_healthy(server: Server, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise AssertionError(f"the server exited with {server.process.returncode}:\n"
                                 f"{server.log()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise AssertionError(f"the server was not healthy within {timeout:.0f} s:\n{server.log()}")


_shared: dict[tuple[str, ...], Server] = {}


def shared_server(*extra_args: str) -> Server:
    """One server per argument list for the whole test session, stopped at exit."""
    server = _shared.get(extra_args)
    if server is None or server.process.poll() is not None:
        server = _shared[extra_args] = start_server(*extra_args)
    return server


@atexit.register
def _stop_shared() -> None:
    for server in _shared.values():
        server.stop()


def metric_values(url: str) -> dict[str, float]:
    """`name -> value` of the unlabelled-by-anything-but-model series of /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    values = {}
    for match in re.finditer(r"^(tessera:[a-z_:]+)\{[^}]*\} (\S+)$", text, re.M):
        values.setdefault(match.group(1), float(match.group(2)))
    return values


def wait_until_idle(url: str, timeout: float = 60.0) -> dict[str, float]:
    """Poll /metrics until no request runs or waits and no KV block is held."""
    deadline = time.monotonic() + timeout
    while True:
        values = metric_values(url)
        idle = (values["tessera:num_requests_running"] == 0
                and values["tessera:num_requests_waiting"] == 0
                and values["tessera:kv_cache_usage_perc"] == 0)
        if idle or time.monotonic() > deadline:
            return values
        time.sleep(0.2)
