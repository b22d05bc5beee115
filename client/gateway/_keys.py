"""The gateway's bearer keys: who is asking, and each key's own budget.

A key arrives as ``Authorization: Bearer <key>`` (OpenAI SDKs) or ``x-api-key: <key>``
(Anthropic SDKs). It is compared in constant time: the presented key's SHA-256 against
every configured key's, with :func:`hmac.compare_digest`, always all of them, so neither
the time taken nor an early exit tells an attacker how much of a guess was right or which
key it was near.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

from loomnet.protocol import ErrorCode

from ._config import GatewayKey
from ._errors import GatewayError

__all__ = ["KeyTable", "presented_key"]


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key a request carries, or None."""
    auth = headers.get("authorization")
    if auth is not None:
        scheme, _, value = auth.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    key = headers.get("x-api-key")
    return key.strip() if key and key.strip() else None


class KeyTable:
    """The configured keys. Empty: the gateway is open (``check`` returns None)."""

    def __init__(self, keys: list[GatewayKey]) -> None:
        self._keys = [(hashlib.sha256(k.key.encode()).digest(), k) for k in keys]

    def __len__(self) -> int:
        return len(self._keys)

    def check(self, headers: Mapping[str, str]) -> GatewayKey | None:
        """The key ``headers`` authenticate, or None when no keys are configured.

        Raises:
            GatewayError: ``unauthorized`` (401, ``GATEWAY_UNAUTHORIZED``): keys are
                configured and the request carries none, or none of them.
        """
        if not self._keys:
            return None
        presented = presented_key(headers)
        if presented is None:
            raise GatewayError("unauthorized", "this gateway needs a key: send Authorization: Bearer <key> "
                               "(or x-api-key: <key>)", code=ErrorCode.GATEWAY_UNAUTHORIZED)  # fmt: skip
        wanted = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
        found = None
        for digest, key in self._keys:
            if hmac.compare_digest(digest, wanted):
                found = key
        if found is None:
            raise GatewayError("unauthorized", "the key is not one this gateway knows",
                               code=ErrorCode.GATEWAY_UNAUTHORIZED)  # fmt: skip
        return found
