"""A real `leanserve serve` in a subprocess on a free port, for end-to-end tests."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

SRC = str(Path(__file__).resolve().parents[1] / "src")


def small_engine(max_num_seqs: int = 8) -> list[str]:
    """`serve` arguments for a small engine that starts fast on a laptop CPU."""
    return ["--max-num-seqs", str(max_num_seqs), "--max-num-batched-tokens", "256", "--kv-cache-gib", "0.5"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """Starts the server and waits until /ready answers 200; `stop()` sends SIGTERM."""

    def __init__(self, *args: str, env: dict | None = None, startup_timeout: float = 180):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix="leanserve-server-", suffix=".log", delete=False)
        environ = dict(os.environ, **(env or {}))
        environ["PYTHONPATH"] = os.pathsep.join(filter(None, [SRC, environ.get("PYTHONPATH")]))
        self.own_data_dir = None
        if "--data-dir" not in args:  # each server its own job store (a data dir is locked by one server)
            self.own_data_dir = tempfile.mkdtemp(prefix="leanserve-data-")
            args = (*args, "--data-dir", self.own_data_dir)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "leanserve", "serve", "--port", str(self.port), *args],
            env=environ, stdout=self.log, stderr=subprocess.STDOUT)
        self._wait_ready(startup_timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        output = self.output()  # stop() removes the log
        self.stop()
        raise RuntimeError(f"server not ready after {timeout}s:\n{output}")

    def output(self) -> str:
        return Path(self.log.name).read_text()

    def metrics(self) -> dict[str, float]:
        """The /metrics samples, keyed by name plus labels as printed (`x{status="200"}`)."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                for line in text.splitlines() if line and not line.startswith("#")}

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        os.unlink(self.log.name)
        if self.own_data_dir:  # a store the fixture made is the fixture's to remove
            shutil.rmtree(self.own_data_dir, ignore_errors=True)
        return self.proc.returncode


def openai_client(server: "ServerProcess", api_key: str = "none", timeout: float = 120) -> "openai.OpenAI":
    """The official client pointed at a test server, without retries (a retry would hide errors)."""
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=api_key, max_retries=0, timeout=timeout)
