"""A real ``python -m llama_cpp.server`` on loopback, serving the embedded GGUF.

The OpenAI-compatible backend is tested against it: it can be killed (SIGKILL,
as a crash) and started again on the same port.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from taled.models.backends.llamacpp import embedded_model_path

READY_TIMEOUT = 60.0
ALIAS = "smollm2"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class LlamaServer:
    """One llama_cpp.server process; ``start`` again after ``kill`` reuses the port."""

    def __init__(
        self, n_ctx: int = 2048, api_key: str | None = None, interrupt_requests: bool = False
    ) -> None:
        self.port = free_port()
        self.n_ctx = n_ctx
        self.api_key = api_key
        self.interrupt_requests = interrupt_requests
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = Path(tempfile.mkstemp(prefix="llama-server-", suffix=".log")[1])

    @property
    def url(self) -> str:
        """The server root (tokenizer endpoints live here)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI-compatible base URL, as an ``openai:`` model spec names it."""
        return f"{self.url}/v1"

    def start(self) -> LlamaServer:
        """Start the server and wait until it lists its model."""
        auth = ["--api_key", self.api_key] if self.api_key else []
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "llama_cpp.server",
                    "--model",
                    str(embedded_model_path()),
                    "--model_alias",
                    ALIAS,
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--n_ctx",
                    str(self.n_ctx),
                    "--verbose",
                    "False",
                    # The server's default (True) ends a running answer when another
                    # request arrives; a server shared by two callers needs False.
                    "--interrupt_requests",
                    str(self.interrupt_requests),
                    *auth,
                ],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )
        self.wait_ready()
        return self

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Poll /v1/models until it answers; on failure, raise with the server's log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"llama_cpp.server exited with {self.proc.returncode}:\n{self.log_text()}"
                )
            try:
                # Any HTTP answer (401 included, with an api key) means it is serving.
                httpx.get(f"{self.base_url}/models", timeout=2)
                return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"llama_cpp.server not ready after {timeout} s:\n{self.log_text()}")

    def log_text(self) -> str:
        """What the server wrote to stdout and stderr."""
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL the server, as a crash would, and reap it."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        """Tear-down: end the server if it still runs, and delete its log."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.unlink(missing_ok=True)
