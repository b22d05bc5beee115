"""``loomnet gateway`` as an operator runs it: an executor in one process, the gateway in
another, plain HTTP from a third party (httpx here, any OpenAI client in practice)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.model]

LOOMNET = str(Path(sys.executable).with_name("loomnet"))


@pytest.fixture
def env(tmp_path):
    return {
        **os.environ,
        "LOOMNET_STATE_DIR": str(tmp_path / "state"),
        "LOOMNET_DATA_DIR": str(tmp_path / "data"),
        "LOOMNET_LISTEN": "/ip4/127.0.0.1/tcp/0",
        "PYTHONUNBUFFERED": "1",
    }


def start(args, env, until: str, timeout: float = 60) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([LOOMNET, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith(until):
            break
    return proc, "".join(lines)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture
def executor_process(env):
    proc, ready = start(["executor"], env, "Stop with Ctrl-C")
    try:
        assert "loomnet executor ready" in ready, ready
        yield proc
    finally:
        stop(proc)


def test_gateway_serves_models_and_chat_then_stops_on_sigterm(executor_process, env, tmp_path):
    config = tmp_path / "gateway.toml"
    config.write_text('[[keys]]\nname = "alice"\nkey = "${TEST_GATEWAY_KEY}"\n')
    secret = "sk-test-0123456789abcdef"
    proc, ready = start(["gateway", "--config", str(config), "--port", "0"], {**env, "TEST_GATEWAY_KEY": secret},
                        "Stop with Ctrl-C")  # fmt: skip
    try:
        assert "loomnet gateway listening on http://127.0.0.1:" in ready, ready
        assert "keys: 1 (alice)" in ready and secret not in ready
        url = ready.split("listening on ", 1)[1].split()[0]
        auth = {"Authorization": f"Bearer {secret}"}
        with httpx.Client(base_url=url, timeout=60) as http:
            assert http.get("/v1/models").status_code == 401
            deadline = time.monotonic() + 30  # the gateway's client finds the local executor
            ids: list[str] = []
            while time.monotonic() < deadline and "smollm2-135m" not in ids:
                ids = [m["id"] for m in http.get("/v1/models", headers=auth).json()["data"]]
                time.sleep(0.2)
            assert "smollm2-135m" in ids and "cheapest" in ids
            answer = http.post("/v1/chat/completions", headers=auth, json={
                "model": "smollm2-135m", "messages": [{"role": "user", "content": "Name a colour."}],
                "max_tokens": 8, "temperature": 0, "seed": 1,
            })  # fmt: skip
            assert answer.status_code == 200, answer.text
            body = answer.json()
            assert body["object"] == "chat.completion" and body["usage"]["completion_tokens"] > 0
            assert answer.headers["x-loomnet-executor"].startswith("12D3KooW")
            # SIGTERM while an answer streams: no new requests, but this one finishes
            with http.stream("POST", "/v1/chat/completions", headers=auth, json={
                "model": "smollm2-135m", "messages": [{"role": "user", "content": "Tell a story."}],
                "max_tokens": 48, "temperature": 0, "seed": 1, "stream": True,
            }) as streamed:  # fmt: skip
                lines = streamed.iter_lines()
                assert next(lines).startswith("data: ")  # the answer has begun
                proc.send_signal(signal.SIGTERM)
                rest = [line for line in lines if line]
            assert rest[-1] == "data: [DONE]"
        assert proc.wait(timeout=20) == 0
        rest = proc.stdout.read()
        assert "Traceback" not in rest and secret not in rest
    finally:
        stop(proc)


def test_config_errors_and_a_taken_port_are_one_line(env, tmp_path):
    import socket

    bad = tmp_path / "gateway.toml"
    bad.write_text('[[keys]]\nname = "a"\nkey = "${UNSET_FOR_THIS_TEST}"\n')
    for args in (["--config", str(bad)], ["--config", str(tmp_path / "missing.toml")]):
        result = subprocess.run([LOOMNET, "gateway", *args], env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.startswith("error [500 CONFIG_INVALID]:") and len(result.stderr.strip().splitlines()) == 1
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([LOOMNET, "gateway", "--port", str(port)], env=env, capture_output=True, text=True,
                                timeout=60)  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr


_FAILING_CLIENT = """
import sys, time
import loomnet.client._member as member
start = time.time()
def broken(*args, **kwargs):  # a client task that fails once the gateway is up
    if time.time() - start > 3:
        raise OSError(24, "Too many open files")
    return []
member.local_executors = broken
from loomnet.node.cli import main
sys.argv = ["loomnet", "gateway", "--port", "0"]
main()
"""


def test_a_failing_client_stops_the_gateway_with_an_error_not_exit_0(env):
    """The gateway's client dies (here: a task of it raises): the command says why on
    stderr and exits non-zero, so a supervisor restarts it; never a silent exit 0."""
    result = subprocess.run([sys.executable, "-c", _FAILING_CLIENT], env=env, capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    assert "loomnet gateway listening on" in result.stdout, result.stdout + result.stderr
    assert result.returncode != 0, (result.stdout, result.stderr)
    assert "Too many open files" in result.stderr
