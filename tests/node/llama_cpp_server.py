"""A real ``python -m llama_cpp.server`` with SmolLM2 on a free loopback port, for tests."""

from __future__ import annotations

import contextlib
import pathlib
import socket
import subprocess
import sys
import time

import httpx
import pytest

MODEL = "smollm2-135m"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_llama_cpp_server(log: pathlib.Path, *options: str, alias: str = MODEL):
    """A real ``python -m llama_cpp.server`` with SmolLM2 on a free loopback port; its URL."""
    from loomnet.node.backends.embedded import default_model_path

    port = free_port()
    command = [sys.executable, "-m", "llama_cpp.server", "--model", default_model_path(), "--model_alias", alias,
               "--host", "127.0.0.1", "--port", str(port), "--n_threads", "2", "--n_ctx", "2048", *options]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 60
        while True:  # polling a subprocess, not synchronising tasks
            if process.poll() is not None:
                pytest.fail(f"llama_cpp.server exited {process.returncode}: {log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{url}/v1/models", timeout=1.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"llama_cpp.server not ready after 60 s: {log.read_text()[-2000:]}")
            time.sleep(0.05)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


