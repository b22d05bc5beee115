"""Why bytes did not decode, in loomnet's words: what a peer is told about its own message.

msgspec's messages (``Expected `str`, got `int` - at `$.messages[0].role```) are a
library's text, and nothing a library says goes to a peer (``docs/errors.md``). They do
carry one thing worth telling a peer about its own bytes: *where* its message breaks the
schema. :func:`describe_decode_error` keeps that path, which comes from our schema and
the peer's own keys, and says the rest in our words.
"""

from __future__ import annotations

import re

import msgspec

__all__ = ["describe_decode_error"]

_AT = re.compile(r" - at `(\$[^`]{0,200})`$")
_MISSING = re.compile(r"^Object missing required field `([^`]{1,100})`")


def describe_decode_error(exc: Exception) -> str:
    """One line about a failed decode: which field breaks the schema, or that the bytes
    are not a message at all."""
    text = str(exc)
    if isinstance(exc, msgspec.ValidationError):
        where = _AT.search(text)
        path = where.group(1) if where else "$"
        if missing := _MISSING.match(text):
            return f"required field {missing.group(1)!r} is missing at {path}"
        return f"the value at {path} is not allowed by the protocol's schema"
    return "the bytes are not a well-formed message"
