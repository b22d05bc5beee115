"""Request bodies into msgspec Structs, with errors a caller can act on."""

from __future__ import annotations

import base64
import binascii
import re
from typing import TypeVar

import msgspec

from loomnet.protocol import MAX_FRAME_SIZE, ImagePart

from ._errors import GatewayError

__all__ = ["ABSENT", "decode_body", "image_from_base64", "image_from_data_url", "is_absent", "object_text", "split_validation_error", "too_deep"]

T = TypeVar("T")
_PATH = re.compile(r" - at `\$\.?(.*)`$")
_NAMED = re.compile(r"(?:missing required|contains unknown) field `([^`]+)`")


def split_validation_error(exc: msgspec.ValidationError) -> tuple[str, str | None]:
    """``exc``'s words without their location, and the path of the field at fault
    (``messages[0].role``), or None when the whole document is (msgspec says where a
    field is missing or unknown, in the object holding it; the path here names the field
    itself: ``loomnet.max_price``)."""
    text = str(exc)
    match = _PATH.search(text)
    where = match.group(1) if match else ""
    words = text[: match.start()] if match else text
    named = _NAMED.search(words)
    if named is not None:
        where = f"{where}.{named.group(1)}" if where else named.group(1)
    return words, where or None


def decode_body(body: bytes, kind: type[T]) -> T:
    """``body`` (JSON) as a ``kind``.

    Raises:
        GatewayError: ``invalid_request``; ``param`` is the field's path
            (``messages[0].content``; ``messages[0].role`` for a missing role) when one
            field is at fault.
    """
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        words, param = split_validation_error(exc)
        where = f" ({param})" if param else ""
        raise GatewayError("invalid_request", f"invalid request body{where}: {words}", param=param) from None
    except msgspec.DecodeError as exc:
        raise GatewayError("invalid_request", f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise too_deep() from None


def too_deep() -> GatewayError:
    """The error for a body nested deeper than Python's stack lets it be read."""
    return GatewayError("invalid_request", "the request body is nested too deeply to read")


#: what a raw field holds when the body left it out (msgspec cannot put ``Raw`` in a union)
ABSENT = msgspec.Raw(b"")


def is_absent(raw: msgspec.Raw) -> bool:
    """Whether a raw field was left out of the body or sent as ``null``."""
    return bytes(raw).strip() in (b"", b"null")


def object_text(raw: msgspec.Raw, *, param: str) -> str:
    """A JSON object a request carries as a field (a tool's parameters, a schema) as
    JSON text, without building it in Python: the wire Structs type such fields
    ``msgspec.Raw``, so a body of millions of tiny nested values costs its bytes, not a
    Python object per value. The text goes on as it came; the executor's runtime reads it.

    Raises:
        GatewayError: ``invalid_request`` naming ``param`` when it is not an object.
    """
    text = bytes(raw).decode()
    if not text.lstrip().startswith("{"):
        raise GatewayError("invalid_request", f"{param}: expected a JSON object", param=param)
    return text


_DATA_URL = re.compile(r"^data:(image/[a-z0-9.+-]{1,40});base64,(.*)$", re.DOTALL | re.IGNORECASE)


def image_from_base64(media_type: str, data: str, *, param: str) -> ImagePart:
    """An image sent inline as base64.

    Raises:
        GatewayError: ``invalid_request`` naming ``param`` when the data is not base64.
    """
    if len(data) > MAX_FRAME_SIZE * 4 // 3 + 4:  # cheaper than decoding what must be refused
        raise GatewayError("invalid_request", f"{param}: the image must be 1 to {MAX_FRAME_SIZE} bytes", param=param)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise GatewayError("invalid_request", f"{param}: the image data is not valid base64", param=param) from None
    if not raw or len(raw) > MAX_FRAME_SIZE:
        raise GatewayError("invalid_request", f"{param}: the image must be 1 to {MAX_FRAME_SIZE} bytes, not {len(raw)}",
                           param=param)  # fmt: skip
    return ImagePart(media_type=media_type.lower(), data=raw)


def image_from_data_url(url: str, *, param: str) -> ImagePart:
    """An image sent as a ``data:image/...;base64,`` URL.

    The gateway never fetches a URL: deployments are often air-gapped, and a gateway that
    fetched what a request names would let its callers reach the gateway's network.

    Raises:
        GatewayError: ``invalid_request`` naming ``param`` for any other URL.
    """
    match = _DATA_URL.match(url)
    if match is None:
        shown = url[:40] + ("..." if len(url) > 40 else "")
        raise GatewayError(
            "invalid_request",
            f"{param}: images must be sent inline as data:image/<type>;base64,<data> URLs; the gateway never "
            f"fetches a URL ({shown!r})",
            param=param,
        )
    return image_from_base64(match.group(1), match.group(2), param=param)
