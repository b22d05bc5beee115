"""Secrets: normalized when the config loads, redacted in every form from errors and logs.

The end-to-end proof (a canary key through every error path of every adapter, over
libp2p) is ``tests/e2e/test_secrets.py``; these are the parts, one by one.
"""

from __future__ import annotations

import base64
import json
import logging
from urllib.parse import quote, quote_plus

import httpx
import msgspec
import pytest

from loomnet.node._redact import MASK, Redactor, install_log_redaction, url_secrets
from loomnet.node.backends._base import ChatParams
from loomnet.node.backends._config import BackendConfig
from loomnet.node.backends._registry import make_backend
from loomnet.node.backends.anthropic import AnthropicBackend
from loomnet.node.backends.gemini import GeminiBackend
from loomnet.node.backends.ollama import OllamaBackend
from loomnet.node.backends.openai_compat import OpenAICompatBackend
from loomnet.node.config import load_config
from loomnet.protocol import BackendError, ChatMessage, ConfigError

from ..limits import fail_after
from .asgi_server import serve_app
from .fake_openai import Failure, FakeOpenAI, openai_error

KEY = "sk-CANARY-0a1b2c3d4e5f"
HELLO = [ChatMessage(role="user", content="Say hello.")]


def forms(secret: str, user: str = "user") -> list[str]:
    """The shapes a leaked secret takes: raw, escaped, percent-encoded, base64 (Basic auth)."""
    raw = secret.encode()
    return [secret, repr(secret)[1:-1], repr(raw)[2:-1], json.dumps(secret)[1:-1], quote(secret, safe=""),
            quote_plus(secret), base64.b64encode(raw).decode(), base64.b64encode(f"{user}:{secret}".encode()).decode()]


def leaks(text: str, secret: str = KEY) -> list[str]:
    return [form for form in forms(secret) + forms(secret.strip()) if form.strip() and form in text]


# ---------------------------------------------------------------- the redactor


@pytest.mark.parametrize("secret", [KEY, KEY + "\n", "pa ss/wo+rd&=ä" + KEY])
def test_every_form_of_a_secret_is_redacted(secret):
    redact = Redactor([secret, f"user:{secret}"])
    for form in forms(secret):
        text = f"httpx said: Illegal header value b'Bearer {form}' while sending"
        assert leaks(redact(text), secret) == [], form
        assert MASK in redact(text)


def test_credentials_are_redacted_by_their_shape_even_when_unknown():
    redact = Redactor()
    text = ("unreachable at http://bob:hunter2-xyz@host:8080/v1?api-version=2024&api-key=abc123456&x=1 "
            "and https://h/v1beta?key=AIzaSyA12345 with Authorization: Bearer sk-unknown-1234567")
    out = redact(text)
    for secret in ("bob", "hunter2-xyz", "abc123456", "AIzaSyA12345", "sk-unknown-1234567"):
        assert secret not in out
    assert "api-version=2024" in out and "x=1" in out and "host:8080/v1" in out  # the rest stays readable


def test_url_secrets_and_short_secrets():
    assert set(url_secrets("http://user:p%40ss@h/v1?api_key=k3y&model=x")) >= {"p%40ss", "p@ss", "user:p@ss", "k3y"}
    assert url_secrets("http://h/v1?model=x") == [] and url_secrets(None) == []
    assert Redactor(["ab"])("absolutely") == "absolutely"  # too short to search for by value


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("provider", ["openai", "anthropic", "gemini"])
def test_a_key_read_from_a_file_loses_its_trailing_newline(tmp_path, provider):
    path = tmp_path / "executor.toml"
    path.write_text(f'[[backends]]\nprovider = "{provider}"\napi-key = "${{KEY}}"\nmodels = ["m"]\n')
    config = load_config(path, environ={"KEY": f"  {KEY}\r\n"})
    assert config.backends[0].api_key == KEY
    make_backend(config.backends[0])  # headers accept it


@pytest.mark.parametrize("value", [KEY[:6] + "\n" + KEY[6:], KEY + "\x00", KEY[:4] + "\u200b" + KEY[4:]])
def test_a_control_character_inside_a_key_is_an_error_naming_the_variable_not_the_value(tmp_path, value):
    path = tmp_path / "executor.toml"
    path.write_text('[[backends]]\nprovider = "openai"\napi-key = "${OPENAI_KEY}"\nmodels = ["m"]\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={"OPENAI_KEY": value})
    assert "OPENAI_KEY" in info.value.message and leaks(info.value.message) == []
    assert KEY[:8] not in info.value.message and KEY[-8:] not in info.value.message


def test_llm_api_key_is_normalized_and_checked_too():
    config = load_config(None, environ={"LLM_PROVIDER": "openai", "LLM_MODEL": "m", "LLM_API_KEY": KEY + "\n"})
    assert config.backends[0].api_key == KEY
    with pytest.raises(ConfigError) as info:
        load_config(None, environ={"LLM_PROVIDER": "openai", "LLM_MODEL": "m", "LLM_API_KEY": KEY + "\x1b[0m"})
    assert "LLM_API_KEY" in info.value.message and KEY[-8:] not in info.value.message


@pytest.mark.parametrize("literal", ['"sk-CANARY\\nrest-of-key"', '"sk-CANARY-Ärger"'])
def test_a_literal_key_in_toml_is_checked_without_showing_it(tmp_path, literal):
    path = tmp_path / "executor.toml"
    path.write_text(f'[[backends]]\nprovider = "anthropic"\napi-key = {literal}\nmodels = ["m"]\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert "api-key" in info.value.message and "CANARY" not in info.value.message


def test_backend_config_repr_hides_key_and_url_credentials():
    config = BackendConfig(provider="vllm", api_key=KEY, endpoint=f"http://user:{KEY}@h:1/v1?api-key={KEY}")
    assert leaks(repr(config)) == [] and "h:1/v1" in repr(config)


# ---------------------------------------------------------------- endpoint credentials


@fail_after(10)
async def test_endpoint_credentials_are_sent_and_never_quoted(nursery):
    fake = FakeOpenAI(flavour="vllm")
    url = await serve_app(nursery, fake)
    endpoint = url.replace("http://", f"http://user:{KEY}@") + f"/v1?api-key={KEY}&api-version=7"
    async with make_backend(BackendConfig(provider="vllm", endpoint=endpoint, max_retries=0)) as backend:
        assert (await backend.chat(ChatParams(model="m", messages=HELLO))).text == "Hello, world!"
        assert await backend.health()
        for request in fake.requests:  # every route gets the query and the Basic credentials
            assert request.headers["authorization"] == "Basic " + base64.b64encode(f"user:{KEY}".encode()).decode()
        assert backend.where == f"{url}/v1" and leaks(repr(backend)) == []
        fake.failures = [Failure(500, openai_error(f"upstream {endpoint} refused Basic {forms(KEY)[-1]}"))]
        with pytest.raises(BackendError) as info:
            await backend.chat(ChatParams(model="m", messages=HELLO))
    assert "upstream" in info.value.message and leaks(info.value.message) == []
    dead = f"http://user:{KEY}@127.0.0.1:9/v1?key={KEY}"
    async with make_backend(BackendConfig(provider="vllm", endpoint=dead, max_retries=0)) as backend:
        with pytest.raises(BackendError) as info:
            await backend.chat(ChatParams(model="m", messages=HELLO))
    assert "127.0.0.1:9" in info.value.message and leaks(str(info.value)) == [] and leaks(repr(info.value)) == []


ADAPTERS = {"ollama": OllamaBackend, "openai": OpenAICompatBackend, "anthropic": AnthropicBackend,
            "gemini": GeminiBackend}


@pytest.mark.parametrize("provider", ADAPTERS)
@fail_after(10)
async def test_a_key_with_a_newline_that_got_past_the_config_never_shows(nursery, provider):
    url = await serve_app(nursery, FakeOpenAI())
    config = BackendConfig(provider=provider, endpoint=url, api_key="placeholder", models=["m"], max_retries=0)
    msgspec.structs.force_setattr(config, "api_key", KEY + "\n")  # as an older loader would have kept it
    async with ADAPTERS[provider](config) as backend:
        with pytest.raises(BackendError) as info:
            await backend.chat(ChatParams(model="m", messages=HELLO))
    error = info.value
    assert "Illegal header value" in error.message  # the operator learns why
    assert leaks(str(error)) == [] and leaks(repr(error)) == [] and leaks(error.peer_message) == []
    assert provider not in error.peer_message.lower() and "http" not in error.peer_message


# ---------------------------------------------------------------- logs


def test_log_records_and_tracebacks_are_redacted(caplog):
    caplog.set_level(logging.DEBUG)
    log = logging.getLogger("loomnet.test")
    uninstall = install_log_redaction(Redactor([KEY]))
    try:
        log.warning("key %s in args, %r escaped", KEY, KEY + "\n")
        try:
            try:
                httpx.Headers({"authorization": f"Bearer {KEY}\n"}).raw  # noqa: B018
                raise httpx.LocalProtocolError(f"Illegal header value {(f'Bearer {KEY}' + chr(10)).encode()!r}")
            except httpx.HTTPError as exc:
                raise BackendError("openai failed") from exc
        except BackendError:
            log.exception("request failed")
        logging.getLogger("httpx").info('HTTP Request: POST %s "HTTP/1.1 200 OK"',
                                        httpx.URL(f"http://u:{KEY}@h/v1?api-key={quote(KEY)}"))
    finally:
        uninstall()
    log.info("after uninstall %s", "plain")
    assert len(caplog.records) == 4
    for record in caplog.records:
        assert leaks(logging.Formatter().format(record)) == [], record.getMessage()
    assert "Illegal header value" in caplog.text and "LocalProtocolError" in caplog.text  # the why stays


def test_an_endpoint_that_is_not_a_url_is_a_backend_error_without_its_credentials():
    with pytest.raises(BackendError) as info:
        make_backend(BackendConfig(provider="vllm", endpoint=f"http://user:{KEY}@host:99x/v1?api-key={KEY}"))
    assert "not a valid URL" in info.value.message and leaks(str(info.value)) == []
