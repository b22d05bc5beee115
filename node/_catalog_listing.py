"""Asking a catalog's backends: each one's model list and health probe, all at once,
each with one deadline for its whole answer (``_catalog``).

The HTTP adapters' timeouts apply per read, so a runtime dripping its model list would
otherwise stall start-up, or the health loop, for as long as it dripped. Nothing here
raises a backend's error: a backend that fails, is too slow or has a bug is down, and
the node goes on.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio

from loomnet.protocol import BackendError, ErrorCode

from .backends._base import Backend, ModelInfo

__all__ = ["UNHEALTHY", "each", "error_class", "label_of", "list_models", "probe"]

log = logging.getLogger("loomnet.catalog")

_T = TypeVar("_T")


def label_of(backend: Backend) -> str:
    """What the operator calls ``backend`` (its ``name``, else its provider): never a secret."""
    return str(getattr(backend, "label", None) or backend.kind)


async def list_models(backend: Backend, *, timeout: float) -> list[ModelInfo] | BackendError:
    """``backend``'s models, or the error (a timeout included) that kept it from listing
    them within ``timeout`` seconds."""
    with trio.move_on_after(timeout):
        try:
            return await backend.list_models()
        except BackendError as exc:
            log.warning("backend %s is not serving: %s", label_of(backend), exc)
            return exc
        except Exception as exc:  # noqa: BLE001 - an adapter's bug makes that backend down, not the node
            log.exception("backend %s failed to list its models", label_of(backend))
            return BackendError(f"listing its models failed ({type(exc).__name__})", code=ErrorCode.INTERNAL)
    log.warning("backend %s did not list its models within %g s", label_of(backend), timeout)
    return BackendError(
        f"did not list its models within {timeout:g} s", code=ErrorCode.BACKEND_TIMEOUT, retryable=True
    )


#: the error class of a failed health probe whose backend says no more than "not healthy"
UNHEALTHY = "UNHEALTHY"


_HTTP_STATUS = re.compile(r" answered HTTP ([1-5][0-9][0-9])\b")


def error_class(exc: BaseException) -> str:
    """What ``/status`` shows of a failure: its loomnet code's name with what kind of
    failure it was (``BACKEND_UNAVAILABLE (HTTP 401)``, ``BACKEND_UNAVAILABLE
    (ConnectError)``), or its exception class; never its text (which may quote a body,
    an endpoint or a key)."""
    if not isinstance(exc, BackendError):
        return type(exc).__name__
    if (status := _HTTP_STATUS.search(exc.message)) is not None:
        return f"{exc.code.name} (HTTP {status.group(1)})"
    cause = exc.__cause__
    return f"{exc.code.name} ({type(cause).__name__})" if cause is not None else exc.code.name


async def probe(backend: Backend, *, listed: bool, timeout: float) -> tuple[bool, list[ModelInfo] | None, str | None]:
    """(healthy, its models when it is healthy and not ``listed`` yet, the failure's
    error class when it is not healthy) within ``timeout`` seconds for the whole probe;
    never raises a backend's error.

    A health check answers only yes or no, so a failed one asks the backend for its
    models, within the same deadline, to learn the failure's class (the connection
    refused, a key refused with 401...): that is what ``/status`` shows.
    """
    error: str | None = None
    with trio.move_on_after(timeout):
        try:
            if not await backend.health():
                error = UNHEALTHY
                await backend.list_models()
                return False, None, UNHEALTHY  # it lists its models, but says it cannot serve
            if listed:
                return True, None, None
            return True, await backend.list_models(), None
        except Exception as exc:  # noqa: BLE001 - a failing (or buggy) backend is down, the node goes on
            if error is None:
                log.warning("backend %s failed its health probe: %s", label_of(backend), exc)
            return False, None, error_class(exc)
    if error is not None:
        return False, None, error
    log.warning("backend %s did not answer its health probe within %g s", label_of(backend), timeout)
    return False, None, ErrorCode.BACKEND_TIMEOUT.name


async def each(backends: list[Backend], fn: Callable[[Backend], Awaitable[_T]]) -> list[_T]:
    """``fn(backend)`` for every backend concurrently, the results in ``backends``' order.
    ``fn`` must not raise (the nursery would wrap it in a group)."""
    results: list[Any] = [None] * len(backends)

    async def one(i: int, backend: Backend) -> None:
        results[i] = await fn(backend)

    async with trio.open_nursery() as nursery:
        for i, backend in enumerate(backends):
            nursery.start_soon(one, i, backend)
    return results
