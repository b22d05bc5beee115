"""Secrets: normalized when the config loads, redacted in every form from errors and logs.

The end-to-end proof (a canary key through every error path of every adapter, over
libp2p) is ``tests/e2e/test_secrets.py``; these are the parts, one by one.
"""

from __future__ import annotations

import base64
import json
import logging
import random
import re
from urllib.parse import quote, quote_plus

import httpx
import msgspec
import pytest
import trio
import trio.testing

from loomnet.node._redact import MASK, MIN_FRAGMENT, Redactor, install_log_redaction, url_secrets
from loomnet.node.backends._base import ChatParams
from loomnet.node.backends._config import BackendConfig
from loomnet.node.backends._registry import make_backend
from loomnet.node.backends.anthropic import AnthropicBackend
from loomnet.node.backends._http import MAX_MESSAGE
from loomnet.node.backends.gemini import GeminiBackend
from loomnet.node.backends.ollama import OllamaBackend
from loomnet.node.backends.openai_compat import OpenAICompatBackend
from loomnet.node.config import load_config
from loomnet.protocol import (
    BackendError,
    ChatMessage,
    ConfigError,
    Envelope,
    ErrorCode,
    RequestFrame,
    ResponseFormat,
    SignedKind,
    ToolSpec,
)

from ..limits import fail_after
from .asgi_server import serve_app
from .fake_ollama import FakeOllama
from .fake_openai import Failure, FakeOpenAI, openai_error
from .memory_stream import stream_pair
from .server_harness import ClientEnd, Harness

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


def decoded_leaks(text: str, secret: str = KEY) -> list[str]:
    """The base64 runs in ``text`` that decode (either alphabet, at any of the 4 offsets
    a run may start at, padded or not) to bytes holding 8 bytes of ``secret`` in a row:
    a leak the redactor's own shapes cannot hide from this check."""
    raw, found = secret.encode(), []
    pieces = {raw[i:i + 8] for i in range(len(raw) - 7)}
    for run in re.findall(r"[A-Za-z0-9+/_-]{4,}", text):
        for shift in range(4):
            chunk = run[shift:].translate(str.maketrans("-_", "+/"))  # either alphabet
            chunk = chunk[: len(chunk) - 1] if len(chunk) % 4 == 1 else chunk
            decoded = base64.b64decode(chunk + "=" * (-len(chunk) % 4))
            if any(piece in decoded for piece in pieces):
                found.append(run)
    return found


def test_base64_of_anything_around_a_key_is_redacted():
    # Basic auth for a user the redactor was never told about, a key inside an encoded
    # JSON body, with 0..5 characters or random bytes before it and after it, in the
    # standard and the URL-safe alphabet, padded or not, in a header or a JSON body
    rng = random.Random(13)
    redact = Redactor([KEY])
    prefixes = ["", ":", *("abcdef"[:n] + ":" for n in range(6)),
                *(rng.randbytes(rng.randrange(1, 40)) for _ in range(30))]
    suffixes = [b"", b"\n", b'", "x": 1}', *(rng.randbytes(rng.randrange(1, 9)) for _ in range(5))]
    checked = 0
    for prefix in prefixes:
        for suffix in suffixes:
            blob = (prefix.encode() if isinstance(prefix, str) else prefix) + KEY.encode() + suffix
            for encode in (base64.b64encode, base64.urlsafe_b64encode):
                for token in (encode(blob).decode(), encode(blob).decode().rstrip("=")):
                    for text in (f"upstream echoed Authorization: Basic {token}\r\n",
                                 f"upstream echoed authorization: basic {token}",
                                 json.dumps({"headers": {"authorization": token}, "status": 401}),
                                 json.dumps({"auth": token}, separators=(",", ":")),
                                 f"x-debug={token};next"):
                        out = redact(text)
                        assert decoded_leaks(out) == [] and token not in out and MASK in out, (prefix, suffix, out)
                        checked += 1
    assert decoded_leaks(base64.b64encode(b"bob:" + KEY.encode()).decode()) != []  # the check itself sees a leak
    assert checked > 3000


def test_base64_redaction_masks_the_token_and_keeps_the_rest():
    redact = Redactor([KEY])
    innocent = base64.b64encode(bytes(range(256))).decode()  # not the key: untouched
    token = base64.b64encode(b"alice:" + KEY.encode()).decode()
    text = json.dumps({"authorization": f"Basic {token}", "user_agent": "curl/8", "blob": innocent})
    out = redact(text)
    assert json.loads(out) == {"authorization": f"Basic {MASK}", "user_agent": "curl/8", "blob": innocent}
    assert redact(f"{token},{token} and {token}") == f"{MASK},{MASK} and {MASK}"


def test_base64_of_a_key_in_a_log_record_is_redacted(caplog):
    caplog.set_level(logging.DEBUG)
    uninstall = install_log_redaction(Redactor([KEY]))
    try:
        for user in ("", "u", "us", "usr", "user", "admin"):
            token = base64.b64encode(f"{user}:{KEY}".encode()).decode()
            echo = {"echo": {"authorization": f"basic {token}"}}
            logging.getLogger("loomnet.backend").warning("provider error: %s", echo)
    finally:
        uninstall()
    assert len(caplog.records) == 6
    for record in caplog.records:
        text = logging.Formatter().format(record)
        assert decoded_leaks(text) == [] and leaks(text) == [], text


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


# ---------------------------------------------------------------- long texts: redacted, then cut


def test_a_secret_cut_off_at_either_end_of_a_text_is_redacted():
    secret = "sk-CANARY-0a1b2c3d4e5f6a7b8c9d"
    redact = Redactor([secret])
    for cut in range(MIN_FRAGMENT, len(secret)):
        assert redact("proxy said: " + secret[:cut]) == "proxy said: " + MASK, cut  # clipped after
        assert redact(secret[-cut:] + " was refused") == MASK + " was refused", cut  # clipped before
        assert redact("quoted " + quote(secret, safe="")[:cut + 2]) == "quoted " + MASK  # in any form
    short = secret[:MIN_FRAGMENT - 1]
    assert redact(f"ends with {short}") == f"ends with {short}"  # too short to tell from text
    assert redact(f"{secret[:12]} in the middle") == f"{secret[:12]} in the middle"  # only at an end


LONG_KEY = "sk-CANARY-0a1b2c3d4e5f6a7b8c9d0e1f2a3b"


def _error_body(provider: str, shape: str, text: str) -> tuple[int, bytes, str]:
    """(status, body, content type) of a runtime quoting ``text`` in its error: an HTTP
    error in the provider's JSON shape or as plain text, or an error after HTTP 200."""
    if shape == "plain":
        return 401, text.encode(), "text/plain"
    if shape == "status":
        body = {"ollama": {"error": text},
                "openai": {"error": {"message": text, "type": "invalid_request_error"}},
                "anthropic": {"type": "error", "error": {"type": "authentication_error", "message": text}},
                "gemini": {"error": {"code": 401, "message": text, "status": "UNAUTHENTICATED"}}}[provider]
        return 401, json.dumps(body).encode(), "application/json"
    if provider == "ollama":
        return 200, json.dumps({"error": text}).encode() + b"\n", "application/x-ndjson"
    event = {"openai": "data: " + json.dumps({"error": {"message": text}}),
             "anthropic": "event: error\ndata: " + json.dumps({"type": "error", "error": {"type": "api_error",
                                                                                        "message": text}}),
             "gemini": "data: " + json.dumps({"error": {"code": 500, "message": text, "status": "INTERNAL"}})}
    return 200, (event[provider] + "\n\n").encode(), "text/event-stream"


@pytest.mark.parametrize("shape", ["status", "plain", "after-200"])
@pytest.mark.parametrize("provider", ADAPTERS)
async def test_a_key_quoted_at_the_end_of_a_long_error_is_redacted_whole(provider, shape):
    # A proxy quotes the key it got after a long explanation. Wherever the key falls
    # (across the 300 and 500 characters older code cut at, across MAX_MESSAGE), the
    # message is redacted whole before it is clipped: not one piece of the key is left.
    for at in (300, 500, *range(MAX_MESSAGE - 120, MAX_MESSAGE + 20, 7)):
        text = "x" * (at - len(LONG_KEY) // 2) + LONG_KEY
        status, body, kind = _error_body(provider, shape, text)
        transport = httpx.MockTransport(lambda r: httpx.Response(status, content=body, headers={"content-type": kind}))
        config = BackendConfig(provider=provider, api_key=LONG_KEY, models=["m"], max_retries=0)
        async with ADAPTERS[provider](config, transport=transport) as backend:
            with pytest.raises(BackendError) as info:
                async with backend.stream_chat(ChatParams(model="m", messages=HELLO)) as events:
                    async for _ in events:
                        pass
        error = info.value
        pieces = {LONG_KEY[i:i + MIN_FRAGMENT] for i in range(len(LONG_KEY) - MIN_FRAGMENT + 1)}
        found = [p for p in pieces if p in str(error) or p in repr(error) or p in error.peer_message]
        assert found == [], f"key at {at}: {error.message[-80:]!r}"
        assert len(error.message) <= MAX_MESSAGE and "xxxx" in error.message  # clipped, the why kept


@pytest.mark.parametrize("provider", ADAPTERS)
async def test_a_provider_echoing_basic_auth_of_the_key_for_any_user_never_shows_it(provider):
    # The review's repro: a proxy in front of the provider echoes the Authorization
    # header it got, Basic auth of ``<user>:<key>`` for a user the executor never named
    for user in ("", "a", "ab", "abc", "abcd", "proxy-user"):
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            token = encode(f"{user}:{LONG_KEY}".encode()).decode()
            text = f"upstream refused credentials (authorization: basic {token})"
            status, body, kind = _error_body(provider, "status", text)
            transport = httpx.MockTransport(
                lambda r, status=status, body=body, kind=kind: httpx.Response(status, content=body,
                                                                              headers={"content-type": kind}))
            config = BackendConfig(provider=provider, api_key=LONG_KEY, models=["m"], max_retries=0)
            async with ADAPTERS[provider](config, transport=transport) as backend:
                with pytest.raises(BackendError) as info:
                    async with backend.stream_chat(ChatParams(model="m", messages=HELLO)) as events:
                        async for _ in events:
                            pass
            error = info.value
            for shown in (str(error), repr(error), error.message, error.peer_message):
                assert decoded_leaks(shown, LONG_KEY) == [] and token not in shown, (user, shown)
            assert "upstream refused credentials" in error.message  # the why stays


# ---------------------------------------------------------------- nothing a peer sends selects a URL


@fail_after(30)
async def test_nothing_a_peer_sends_selects_a_url(nursery, tmp_path):
    """Backend endpoints come only from the operator's config. A signed request naming a
    URL everywhere a peer can put text (the model name, the messages, ``user``, stop
    sequences, a tool, a JSON schema's ``$ref``, and unknown fields such as ``endpoint``
    or ``base_url``) reaches only the configured runtime, which gets it as data; a
    listener at the named address sees no connection at all."""
    knocks: list[object] = []
    trap = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]

    async def knocked(stream) -> None:
        knocks.append(stream.socket.getpeername())
        await stream.aclose()

    nursery.start_soon(trio.serve_listeners, knocked, [trap])
    port = trap.socket.getsockname()[1]
    await (await trio.open_tcp_stream("127.0.0.1", port)).aclose()  # the trap notices a knock...
    while not knocks:
        await trio.sleep(0.01)
    knocks.clear()  # ...and from here on must see none
    urls = [f"http://127.0.0.1:{port}/v1", f"http://localhost:{port}", f"127.0.0.1:{port}", f"ollama:http://127.0.0.1:{port}"]
    runtime, ollama = FakeOpenAI(flavour="vllm"), FakeOllama()
    desk = make_backend(BackendConfig(provider="vllm", name="desk", endpoint=await serve_app(nursery, runtime) + "/v1",
                                      models=["m1"], max_retries=0))  # fmt: skip
    lan = make_backend(BackendConfig(provider="ollama", name="lan", endpoint=await serve_app(nursery, ollama),
                                     models=["llama3.2"], max_retries=0))  # fmt: skip
    harness = await Harness.start(tmp_path, [desk, lan])
    try:
        for url in urls:  # a URL as the model: no such model, and nothing dialled
            answer = await harness.ask(url)
            assert answer.error is not None and answer.error.code == ErrorCode.UNKNOWN_MODEL, url
        url = urls[0]
        schema = json.dumps({"$id": url, "$ref": f"{url}/schema.json", "$schema": url})
        answer = await harness.ask(
            "m1", [ChatMessage("user", f"Fetch {url} and {urls[1]} for me.")], user=url, stop=[url],
            tools=[ToolSpec(name="fetch", description=url, parameters=json.dumps({"$ref": url}))],
            response_format=ResponseFormat(type="json_schema", schema=schema),
        )  # fmt: skip
        assert answer.error is None and answer.text == "Hello, world!"
        assert url in json.dumps(runtime.requests[-1].body)  # the runtime got the URL, as text
        assert (await harness.ask("llama3.2", [ChatMessage("user", url)], user=urls[1])).text == "Hello, world!"

        # unknown fields a peer adds (an older executor skips them): signed, sent, ignored
        client_stream, executor_stream = stream_pair(harness.client_key.peer_id, harness.executor_key.peer_id)
        end = ClientEnd(client_stream, harness.client_key)
        request = msgspec.to_builtins(harness.request("m1"), builtin_types=(bytes,))
        extra = {"endpoint": url, "base_url": url, "api_base": url, "url": url, "host": "127.0.0.1", "port": port,
                 "backend": url, "provider": "ollama", "headers": {"Host": f"127.0.0.1:{port}"}}  # fmt: skip
        payload = msgspec.msgpack.encode({**request, **extra})
        sig = harness.client_key.sign(SignedKind.REQUEST.prefix + payload)
        envelope = Envelope(payload=payload, signer=harness.client_key.public_key, sig=sig)
        async with trio.open_nursery() as streams:
            streams.start_soon(harness.server.handle, executor_stream)
            await client_stream.send_all(end.conn.send(RequestFrame(envelope)), timeout=5)
            answer = await end.read_answer()
        assert answer.error is None and answer.text == "Hello, world!"
        assert runtime.requests[-1].path.endswith("/chat/completions")
    finally:
        await harness.aclose()
    await trio.testing.wait_all_tasks_blocked()
    assert knocks == []  # not one connection attempt to any address a peer named
    assert len([r for r in runtime.requests if r.path.endswith("/chat/completions")]) == 2
