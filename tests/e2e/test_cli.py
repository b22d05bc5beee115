"""The ``loomnet`` command as a person uses it: executor in one process, chat in another."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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


@pytest.fixture
def executor_process(env):
    proc = subprocess.Popen([LOOMNET, "executor"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("Stop with Ctrl-C"):
                break
        ready = "".join(lines)
        assert "loomnet executor ready" in ready, ready
        yield proc, ready
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def run(env, *args, timeout=90):
    return subprocess.run([LOOMNET, *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_executor_prints_how_to_chat_and_chat_streams_with_usage(executor_process, env):
    proc, ready = executor_process
    assert "peer id : 12D3KooW" in ready and "/p2p/12D3KooW" in ready
    assert 'loomnet chat "Hello, who are you?"' in ready

    # sampling fixed: a sampled model may say nothing at all
    chat = run(env, "chat", "Name a colour.", "--max-tokens", "12", "--temperature", "0", "--seed", "1")
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.strip()
    usage = chat.stderr.strip().splitlines()[-1]
    assert "in " in usage and "out " in usage and "cost" in usage and "tokenizer" in usage

    offers = run(env, "offers")
    assert offers.returncode == 0 and "smollm2-135m" in offers.stdout


def test_errors_are_one_line_and_nonzero(executor_process, env):
    chat = run(env, "chat", "hi", "--model", "no-such-model", "--wait", "2")
    assert chat.returncode == 1
    assert chat.stderr.strip().startswith("error [400 NO_OFFER]:")
    assert "Traceback" not in chat.stderr and len(chat.stderr.strip().splitlines()) == 1


def test_no_executor_is_a_clear_error(env):
    chat = run(env, "chat", "hi", "--wait", "1")
    assert chat.returncode == 1 and "NO_OFFER" in chat.stderr and "Traceback" not in chat.stderr


def test_bad_config_is_a_clear_error(env, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("capasity = 3\n")
    result = run(env, "executor", "--config", str(bad))
    assert result.returncode == 1
    assert "CONFIG_INVALID" in result.stderr and "capasity" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_executor_stops_cleanly_and_quickly(executor_process, env, signum):
    proc, _ = executor_process
    state = Path(env["LOOMNET_STATE_DIR"]) / "executors"
    assert list(state.glob("*.json"))
    start = time.monotonic()
    proc.send_signal(signum)
    assert proc.wait(timeout=15) == 0
    assert time.monotonic() - start < 15
    assert not list(state.glob("*.json"))  # the local announcement is withdrawn
