"""The gateway's configuration: where it listens, who may use it, what each may spend."""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

from .._budget import BudgetConfig
from .._client_config import ClientConfig

__all__ = ["DEFAULT_PORT", "GatewayConfig", "GatewayKey"]

#: the gateway's default TCP port (not taken by the runtimes loomnet sits next to:
#: Ollama 11434, LM Studio 1234, llama.cpp 8080, vLLM and llama-cpp-python 8000)
DEFAULT_PORT = 8400


class GatewayKey(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, rename="kebab"):
    """One bearer key of the gateway's users (``[[keys]]`` in its TOML).

    ``key`` is a secret: write ``key = "${MY_KEY_VAR}"`` in the file, never the key; it
    never appears in ``repr``, logs, responses or errors. ``name`` is what the ledger
    books the key's receipts under (its *account*) and what logs name.
    """

    name: Annotated[str, Meta(pattern=r"^[A-Za-z0-9._-]{1,64}$")]
    key: Annotated[str, Meta(min_length=16, max_length=512)]
    #: what this key may spend per period (micro-credits); None: no limit of its own
    budget: BudgetConfig | None = None

    def __repr__(self) -> str:  # never show the key
        return f"GatewayKey(name={self.name!r}, key=<set>, budget={self.budget!r})"


class GatewayConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, rename="kebab"):
    """How ``loomnet gateway`` serves. The client it routes through is ``client``."""

    #: 127.0.0.1 by default: only this machine. Listening wider without keys exposes the
    #: client's budget to the whole network; the CLI warns.
    host: str = "127.0.0.1"
    #: 0: any free port (the URL printed at start says which)
    port: Annotated[int, Meta(ge=0, le=65535)] = DEFAULT_PORT
    #: none: anyone who can reach the port may use the gateway (the default on 127.0.0.1)
    keys: Annotated[list[GatewayKey], Meta(max_length=10_000)] = []
    #: the largest request body accepted, bytes. A request must fit one signed loomnet
    #: frame (1 MiB, images included) once decoded; base64 images (4/3) and JSON's
    #: escapes (up to 6 bytes a character) make the body larger, hence 4 MiB
    max_body_bytes: Annotated[int, Meta(ge=1024, le=1 << 30)] = 4 * 1024 * 1024
    #: seconds a caller may take to send the whole body (one deadline over all of it:
    #: a caller dripping a byte at a time cannot hold a request open longer)
    body_timeout: Annotated[float, Meta(gt=0, le=3600)] = 30.0
    #: chat requests answered at once; past it a request gets 429 with Retry-After at once
    #: (each one holds a task, a stream to an executor and its answer's buffers)
    max_concurrent_requests: Annotated[int, Meta(ge=1, le=100_000)] = 256
    #: HTTP connections open at once; more wait in the kernel's accept queue (so a
    #: flood of idle connections cannot take every file descriptor the process has)
    max_connections: Annotated[int, Meta(ge=1, le=1_000_000)] = 512
    #: chat requests one key may have at once (keys only; none: a keyless gateway
    #: shares ``max-concurrent-requests``); a key over it gets 429, others are unaffected
    max_requests_per_key: Annotated[int, Meta(ge=1, le=100_000)] = 64
    #: seconds a caller may leave its answer's bytes untaken (it reads nothing, or its
    #: machine is gone) before its connection is closed and its request cancelled, which
    #: frees the executor's stream for others. The kernel enforces it (TCP_USER_TIMEOUT,
    #: Linux): a send the server is blocked in cannot be cancelled from Python.
    send_timeout: Annotated[float, Meta(gt=0, le=3600)] = 30.0
    #: seconds an idle keep-alive connection stays open (longer than the 5 s that httpx,
    #: and so both official SDKs, keep an idle connection: the caller closes first)
    idle_timeout: Annotated[float, Meta(gt=0, le=3600)] = 10.0
    client: ClientConfig = ClientConfig()

    def __post_init__(self) -> None:
        names = [k.name for k in self.keys]
        if len(set(names)) != len(names):
            raise ValueError("gateway key names must be unique")
        if len({k.key for k in self.keys}) != len(self.keys):
            raise ValueError("two gateway keys have the same secret")  # never says which: it is a secret
        if not 1024 <= self.max_body_bytes <= 1 << 30:
            raise ValueError("max-body-bytes must be from 1024 to 1073741824")
        if not 0 < self.body_timeout <= 3600:  # NaN too
            raise ValueError("body-timeout must be from 0 (exclusive) to 3600 seconds")
        if not 1 <= self.max_concurrent_requests <= 100_000:
            raise ValueError("max-concurrent-requests must be from 1 to 100000")
        if not 1 <= self.max_connections <= 1_000_000:
            raise ValueError("max-connections must be from 1 to 1000000")
        if not 1 <= self.max_requests_per_key <= 100_000:
            raise ValueError("max-requests-per-key must be from 1 to 100000")
        for name, value in (("send-timeout", self.send_timeout), ("idle-timeout", self.idle_timeout)):
            if not 0 < value <= 3600:  # NaN too
                raise ValueError(f"{name} must be from 0 (exclusive) to 3600 seconds")

    def __repr__(self) -> str:
        return (f"GatewayConfig(host={self.host!r}, port={self.port}, keys=[{len(self.keys)} key(s)], "
                f"max_body_bytes={self.max_body_bytes})")  # fmt: skip
