"""A runtime's JSON payloads as typed Structs: fast for what runtimes send, lenient for the rest.

Each adapter declares, as msgspec Structs, only the fields of a streamed payload it reads
(every field with a default; unknown fields are skipped without being built), and builds
one ``msgspec.json.Decoder`` per Struct at import. :func:`typed` decodes one payload with
it: one C call per token instead of ``json.loads`` building every field as dicts and
lists, then Python walking them.

Runtimes are not always well-formed, and the adapters never raised on odd shapes (a
``content`` that is a number, a tool-call fragment that is not an object, invalid UTF-8,
``NaN``): when the typed decode refuses a payload, :func:`typed` falls back to
``json.loads`` (as lenient as before: invalid UTF-8 replaced, ``NaN`` allowed) and
:func:`lenient` keeps what fits: a field whose value has the wrong type is left at its
default (as if absent), a list item that is not an object is left out. The slow path
runs only for such payloads.
"""

from __future__ import annotations

import functools
import json
import types
from typing import Any, TypeVar, Union, get_args, get_origin

import msgspec

__all__ = ["json_value", "lenient", "typed"]

_S = TypeVar("_S", bound=msgspec.Struct)
_SKIP = object()


def json_value(data: bytes | str) -> Any:
    """``json.loads(data)``, with JSON nested deeper than Python's recursion limit refused
    as ``ValueError`` like any other bad JSON: ``json`` raises ``RecursionError`` for it,
    which every ``except ValueError`` around a runtime's (or a peer's) JSON let through
    (found by ``fuzz/run.py``: ``[`` x 5000 from a runtime).

    Raises:
        ValueError: ``data`` is not JSON, or is nested too deeply.
    """
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def typed(decoder: msgspec.json.Decoder[_S], data: bytes) -> _S | None:
    """``data`` as the decoder's Struct type; None when it is JSON but not an object.

    Raises:
        ValueError: ``data`` is not JSON (nor, as UTF-8 with errors replaced, for
            ``json``), or is nested too deeply (msgspec raises ``RecursionError`` for
            nesting it skips, even in fields the Struct does not name).
    """
    try:
        return decoder.decode(data)
    except (msgspec.DecodeError, RecursionError):  # ValidationError included: the slow, lenient path
        pass
    value = json_value(data.decode("utf-8", "replace"))
    return lenient(value, decoder.type) if isinstance(value, dict) else None


@functools.cache
def _fields(struct: type[msgspec.Struct]) -> tuple[msgspec.structs.FieldInfo, ...]:
    return msgspec.structs.fields(struct)


def lenient(value: dict[str, Any], struct: type[_S]) -> _S:
    """``value`` (a decoded JSON object) as ``struct``, keeping what fits: a field of the
    wrong type is left at its default, a list of objects keeps only its objects, and a
    nested object is converted the same way. Never raises for a JSON object."""
    kwargs: dict[str, Any] = {}
    for field in _fields(struct):
        if field.encode_name not in value:
            continue
        raw = value[field.encode_name]
        try:
            kwargs[field.name] = msgspec.convert(raw, field.type)
        except msgspec.ValidationError:
            if (fixed := _salvage(raw, field.type)) is not _SKIP:
                kwargs[field.name] = fixed
    return struct(**kwargs)


def _is_struct(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, msgspec.Struct)


def _salvage(raw: Any, tp: Any) -> Any:
    """What of ``raw`` fits ``tp`` (a Struct, a list of Structs, either or None), else _SKIP."""
    for option in get_args(tp) if get_origin(tp) in (Union, types.UnionType) else (tp,):
        if _is_struct(option) and isinstance(raw, dict):
            return lenient(raw, option)
        if get_origin(option) is list and isinstance(raw, list):
            (item,) = get_args(option)
            if _is_struct(item):
                return [lenient(x, item) for x in raw if isinstance(x, dict)]
    return _SKIP
