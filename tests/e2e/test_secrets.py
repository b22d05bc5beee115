"""A canary key through every error path of every adapter, end to end over libp2p.

One executor, loaded from a TOML config whose keys come from ``${CANARY_KEY}`` (with the
trailing newline a key read from a file keeps), serves Ollama (behind a keyed proxy),
OpenAI, Anthropic, Gemini and a vLLM whose endpoint carries the key twice
(``http://user:KEY@host/v1?api-key=KEY``), each against its faithful fake. Every path
fails once: a 401, a 5xx, an error after HTTP 200, a dropped connection, a timeout,
each error body quoting the key in several forms; and a key with a newline that got
past the config (a bad header, which httpx quotes escaped). Between failures one
request succeeds, so the backend is seen to recover.

The canary, in every form (raw, repr- and JSON-escaped, URL-encoded, base64 of the key
and of ``user:key``), must appear in no error frame, no log line (exception tracebacks
included: logs are captured at DEBUG), no advert and no ledger row on either side. A
peer learns no provider name and no endpoint either.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import msgspec
import pytest
import trio

from loomnet.client import ClientConfig, LoomClient
from loomnet.node import Executor
from loomnet.node.backends._registry import make_backend
from loomnet.node.backends.anthropic import AnthropicBackend
from loomnet.node.backends.gemini import GeminiBackend
from loomnet.node.backends.openai_compat import OpenAICompatBackend
from loomnet.node.config import load_config
from loomnet.protocol import ChatMessage, RemoteError

from ..node import fake_anthropic as fa, fake_gemini as fg, fake_ollama as fo, fake_openai as fopen
from ..node.asgi_server import serve_app
from ..node.test_secrets import forms

pytestmark = pytest.mark.integration

CANARY = "sk-CANARY-9e8d7c6b5a4f3e2d"
HELLO = [ChatMessage("user", "Say hello.")]
#: what a backend's error body quotes: the key raw, in a URL, as a header, as Basic credentials
QUOTED = (f"Incorrect API key provided: {CANARY}; url http://user:{CANARY}@proxy/v1?api-key={CANARY}; "
          f"header Bearer {CANARY}; basic {forms(CANARY)[-1]}; escaped {CANARY!r}")
#: words and shapes an error frame or an advert never holds
NEVER_TO_A_PEER = ("ollama", "openai", "anthropic", "gemini", "vllm", "http", "127.0.0.1", "proxy", "illegal header")

CONFIG = """
data-dir = "{data}"
listen = ["/ip4/127.0.0.1/tcp/0"]
announce-local = false
request-read-timeout = 5.0
ack-timeout = 5.0
breaker-failures = 1000   # each model fails on purpose, once per path: never benched here

[[backends]]
provider = "ollama"
endpoint = "{ollama}"
api-key = "${{CANARY_KEY}}"
models = ["llama3.2"]
timeout = 1.0
max-retries = 0

[[backends]]
provider = "openai"
endpoint = "{openai}/v1"
api-key = "${{CANARY_KEY}}"
models = ["gpt-test"]
timeout = 1.0
max-retries = 0

[[backends]]
provider = "anthropic"
endpoint = "{anthropic}"
api-key = "${{CANARY_KEY}}"
models = ["{claude}"]
timeout = 1.0
max-retries = 0

[[backends]]
provider = "gemini"
endpoint = "{gemini}"
api-key = "${{CANARY_KEY}}"
models = ["{flash}"]
timeout = 1.0
max-retries = 0

[[backends]]
provider = "vllm"
endpoint = "{vllm_with_credentials}/v1?api-key=${{CANARY_KEY}}"
models = ["vllm-model"]
timeout = 1.0
max-retries = 0
"""


def scripts(fakes) -> dict[str, dict[str, object]]:
    """model -> {path: a function that makes the model's fake fail that way once}."""
    ollama, openai, anthropic, gemini, vllm = fakes

    def once(**attrs):
        def arm(fake):
            for name, value in attrs.items():
                setattr(fake, name, value)
        return arm

    def openai_paths(fake):
        return {
            "401": lambda: fake.failures.append(fopen.Failure(401, fopen.openai_error(QUOTED, code="invalid_api_key"))),
            "5xx": lambda: fake.failures.append(fopen.Failure(500, fopen.openai_error(QUOTED, "server_error"))),
            "error after 200": lambda: once(error_event_after=1, error_body=fopen.openai_error(QUOTED))(fake),
            "dropped": lambda: once(drop_after=1)(fake),
            "timeout": lambda: once(first_byte_delay=3.0)(fake),
        }

    return {
        "llama3.2": {
            "401": lambda: ollama.failures.append(fo.Failure(401, QUOTED)),
            "5xx": lambda: ollama.failures.append(fo.Failure(502, QUOTED)),
            "error after 200": lambda: once(error_after=1, error_line=QUOTED)(ollama),
            "dropped": lambda: once(drop_after=1)(ollama),
            "timeout": lambda: once(first_byte_delay=3.0)(ollama),
        },
        "gpt-test": openai_paths(openai),
        fa.MODEL: {
            "401": lambda: anthropic.failures.append(fa.Failure(401, "authentication_error", QUOTED)),
            "5xx": lambda: anthropic.failures.append(fa.Failure(529, "overloaded_error", QUOTED)),
            "error after 200": lambda: once(error_event="api_error", error_message=QUOTED)(anthropic),
            "dropped": lambda: once(drop_after_first_delta=True)(anthropic),
            "timeout": lambda: once(first_byte_delay=3.0)(anthropic),
        },
        fg.MODEL: {
            "401": lambda: gemini.failures.append(fg.Failure(400, QUOTED)),  # Gemini: 400 for a bad key
            "5xx": lambda: gemini.failures.append(fg.Failure(503, QUOTED)),
            "error after 200": lambda: once(error_frame=500, error_message=QUOTED)(gemini),
            "dropped": lambda: once(drop_after_first_frame=True)(gemini),
            "timeout": lambda: once(first_byte_delay=3.0)(gemini),
        },
        "vllm-model": openai_paths(vllm),
    }


def heal(fakes) -> None:
    """Every fake answers normally again."""
    ollama, openai, anthropic, gemini, vllm = fakes
    for fake in (openai, vllm):
        fake.error_event_after = fake.drop_after = None
        fake.first_byte_delay = 0.0
    ollama.error_after = ollama.drop_after = None
    ollama.first_byte_delay = 0.0
    anthropic.error_event, anthropic.drop_after_first_delta, anthropic.first_byte_delay = None, False, 0.0
    gemini.error_frame, gemini.drop_after_first_frame, gemini.first_byte_delay = None, False, 0.0


def bad_header_backends(urls) -> list:
    """Backends whose key kept its newline (as an older loader, or a programmatic config,
    would have it): httpx refuses the header and quotes it, escaped."""
    from loomnet.node.backends._config import BackendConfig

    built = []
    for cls, provider, endpoint, model in ((OpenAICompatBackend, "openai", urls["openai"] + "/v1", "gpt-bad"),
                                           (AnthropicBackend, "anthropic", urls["anthropic"], "claude-bad"),
                                           (GeminiBackend, "gemini", urls["gemini"], "gemini-bad")):
        config = BackendConfig(provider=provider, endpoint=endpoint, api_key="placeholder", models=[model],
                               max_retries=0, timeout=1.0)
        msgspec.structs.force_setattr(config, "api_key", CANARY + "\n")
        built.append(cls(config))
    return built


def leaked(text: str) -> list[str]:
    return [f for f in forms(CANARY) + forms(CANARY + "\n") if f.strip() and f in text]


async def test_a_canary_key_never_leaves_the_operators_config(nursery, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.INFO, logger="libp2p")
    fakes = (fo.FakeOllama(), fopen.FakeOpenAI(flavour="openai"), fa.FakeAnthropic(key=CANARY),
             fg.FakeGemini(key=CANARY), fopen.FakeOpenAI(flavour="vllm"))
    urls = dict(zip(("ollama", "openai", "anthropic", "gemini", "vllm"), [await serve_app(nursery, f) for f in fakes]))
    text = CONFIG.format(data=tmp_path / "executor", claude=fa.MODEL, flash=fg.MODEL, ollama=urls["ollama"],
                         openai=urls["openai"], anthropic=urls["anthropic"], gemini=urls["gemini"] + fg.PREFIX,
                         vllm_with_credentials=urls["vllm"].replace("http://", "http://user:${CANARY_KEY}@"))
    (tmp_path / "executor.toml").write_text(text)
    config = load_config(tmp_path / "executor.toml", environ={"CANARY_KEY": CANARY + "\n"})
    backends = [make_backend(b) for b in config.backends] + bad_header_backends(urls)
    executor = Executor(config, backends=backends)
    await nursery.start(executor.run)
    client = LoomClient(ClientConfig(data_dir=str(tmp_path / "client"), bootstrap=[executor.info.addrs[0]],
                                     discover_local=False, offer_timeout=5.0, first_byte_timeout=20.0))
    await nursery.start(client.run)

    frames: dict[tuple[str, str], RemoteError] = {}
    with trio.fail_after(120):
        for model, paths in scripts(fakes).items():
            for path, arm in paths.items():
                arm()
                with pytest.raises(RemoteError) as info:
                    await client.chat(HELLO, model=model, max_tokens=16)
                frames[model, path] = info.value
                heal(fakes)
                assert (await client.chat(HELLO, model=model, max_tokens=16)).text, (model, path)
        for model in ("gpt-bad", "claude-bad", "gemini-bad"):
            with pytest.raises(RemoteError) as info:
                await client.chat(HELLO, model=model, max_tokens=16)
            frames[model, "bad header"] = info.value

    # the operator's log says what failed, and why, without the key
    assert "Illegal header value" in caplog.text and "401" in caplog.text
    # the key really was sent where it belongs
    assert fakes[2].requests[-1].headers["x-api-key"] == CANARY
    assert fakes[4].requests[-1].headers["authorization"].startswith("Basic ")

    for (model, path), error in frames.items():
        told = f"{error.code} {error.message} {error!r}"
        assert leaked(told) == [], (model, path, told)
        assert not any(word in error.message.lower() for word in NEVER_TO_A_PEER), (model, path, error.message)
    for record in caplog.records:
        line = logging.Formatter().format(record)
        assert leaked(line) == [], line
    advert = client.member.table.advert_of(executor.peer_id, now=time.time())
    wire = msgspec.json.encode(advert).decode()
    assert leaked(wire) == []
    for model in advert.models:  # model names are the operator's to publish; nothing else names a provider
        wire = wire.replace(f'"{model.name}"', '"<a model>"')
    assert not any(word in wire.lower() for word in NEVER_TO_A_PEER if word != "127.0.0.1"), wire
    assert not any(url.rsplit(":", 1)[1] in wire for url in urls.values())  # no backend's port either
    for ledger in [*Path(tmp_path / "executor").rglob("ledger.sqlite*"), *Path(tmp_path / "client").rglob("ledger.sqlite*")]:
        raw = ledger.read_bytes().decode("latin-1")
        assert leaked(raw) == [], ledger
