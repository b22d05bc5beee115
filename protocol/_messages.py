"""Every message loomnet puts on the wire, as msgspec Structs with hard size limits.

Two families:

* **Signed payloads** (:class:`Advert`, :class:`InferenceRequest`, :class:`Receipt`,
  :class:`ReceiptAck`) are encoded once by their author, signed as bytes, and carried in
  an :class:`Envelope`. Readers verify the bytes before decoding them (``_signing``).
* **Frames** are what travels on a stream: a tagged union (``"t"`` field) of envelopes
  and unsigned frames (:class:`ChunkFrame`, :class:`ErrorFrame`). Chunks need no signature
  of their own: the stream runs over Noise, which authenticates the remote peer, and the
  receipt at the end signs a digest of the whole streamed text.

Schema evolution: unknown fields are skipped (msgspec's default), so an older node reads
a newer peer's messages. New fields go at the end with defaults; no tag, field name or
type ever changes. Every string, bytes and list has a maximum, and a frame has a hard
maximum (``MAX_FRAME_SIZE``), so nothing a peer sends makes us allocate without bound.

Money: prices are integers in **micro-credits per million tokens**; costs are integers
in **micro-credits**. Floats never touch a bill.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

import msgspec
from msgspec import Meta, Struct

from ._errors import MessageDecodeError
from ._decode_errors import describe_decode_error

__all__ = [
    "Advert",
    "AdvertFrame",
    "AckFrame",
    "ChatMessage",
    "ChunkFrame",
    "CountSource",
    "Envelope",
    "ErrorFrame",
    "GENERATION_FIELDS",
    "GenerationOptions",
    "InferenceRequest",
    "MAX_ADVERT_SIZE",
    "MAX_FRAME_SIZE",
    "MAX_TOKEN_COUNT",
    "ImagePart",
    "ModelOffer",
    "Receipt",
    "ReceiptAck",
    "ReceiptFrame",
    "RequestFrame",
    "ResponseFormat",
    "StreamFrame",
    "ToolCall",
    "ToolSpec",
    "encode_tool_calls",
    "decode_frame",
    "encode_frame_body",
    "encode_payload",
    "generation_fields",
    "generation_options",
]

#: Hard maximum size of one frame, length prefix excluded (1 MiB).
MAX_FRAME_SIZE = 1 << 20

#: Hard maximum size of a signed advert's payload (128 KiB). Every node holds every
#: advert it hears of, so this bounds what one executor costs each peer. Sized from what
#: honest adverts need: 256 models (the schema's maximum), each with a 48-character
#: name, two aliases, three categories, three capabilities and prices, plus four
#: addresses, encode to ~74 KB; an executor with one model sends under 1 KB. The
#: schema alone would allow ~1.6 MB. ``seal`` refuses to sign a bigger advert and
#: ``open_envelope`` refuses one before checking its signature (``_signing``).
MAX_ADVERT_SIZE = 128 * 1024

# Shared field types. The limits are generous for honest peers and small enough
# that the worst a hostile one can do is bounded by MAX_FRAME_SIZE anyway.
Name = Annotated[str, Meta(min_length=1, max_length=128)]
Label = Annotated[str, Meta(max_length=64)]
PeerIdText = Annotated[str, Meta(min_length=1, max_length=64)]
Multiaddr = Annotated[str, Meta(min_length=1, max_length=256)]
Digest = Annotated[bytes, Meta(min_length=32, max_length=32)]
Nonce = Annotated[bytes, Meta(min_length=16, max_length=32)]
#: the most tokens any count on the wire may say (a receipt's, an offer's context length)
MAX_TOKEN_COUNT = 1 << 31
Tokens = Annotated[int, Meta(ge=0, le=MAX_TOKEN_COUNT)]
Micro = Annotated[int, Meta(ge=0, le=1 << 62)]
Seconds = Annotated[float, Meta(ge=0.0, le=1e11)]
Text = Annotated[str, Meta(max_length=512 * 1024)]

#: Where a receipt's token counts come from, best first.
CountSource = Literal["backend", "tokenizer", "tiktoken", "estimate"]


class Envelope(Struct, frozen=True):
    """Signed bytes: ``sig`` is ``signer``'s Ed25519 signature of a kind prefix + ``payload``."""

    payload: Annotated[bytes, Meta(max_length=MAX_FRAME_SIZE)]
    signer: Annotated[bytes, Meta(min_length=32, max_length=32)]
    sig: Annotated[bytes, Meta(min_length=64, max_length=64)]


# ---------------------------------------------------------------- signed payloads


class ModelOffer(Struct, frozen=True, kw_only=True):
    """One model an executor serves, and on what terms."""

    name: Name
    aliases: Annotated[list[Name], Meta(max_length=32)] = []
    categories: Annotated[list[Label], Meta(max_length=16)] = []
    context_length: Tokens = 0
    #: micro-credits per million input / output tokens
    price_in: Micro = 0
    price_out: Micro = 0
    #: True when the model runs on a local runtime, False behind a hosted API.
    on_premise: bool = True
    capabilities: Annotated[list[Label], Meta(max_length=16)] = []
    #: measured output speed, tokens per second (0 = not measured yet)
    tokens_per_second: Annotated[float, Meta(ge=0.0, le=1e7)] = 0.0


class Advert(Struct, frozen=True, kw_only=True):
    """An executor's signed offer, published on the gossip topic.

    Never carries endpoints, API keys or which hosted provider sits behind a model.
    ``seq`` grows with every advert an executor issues, so "freshest" is well defined
    even when two arrive out of order.
    """

    seq: Annotated[int, Meta(ge=0, le=1 << 62)]
    issued_at: Seconds
    #: seconds after ``issued_at`` that the advert stays valid
    ttl: Annotated[float, Meta(gt=0.0, le=86400.0)]
    addrs: Annotated[list[Multiaddr], Meta(max_length=16)] = []
    models: Annotated[list[ModelOffer], Meta(max_length=256)] = []
    #: concurrent generations the executor accepts, and how many run now
    capacity: Annotated[int, Meta(ge=0, le=1 << 20)] = 1
    load: Annotated[int, Meta(ge=0, le=1 << 20)] = 0
    #: True when every model runs on premise
    on_premise: bool = True
    #: what the executor keeps of prompts: "none" unless the operator says otherwise
    prompt_retention: Label = "none"


class ImagePart(Struct, frozen=True, kw_only=True):
    """An image given to a vision model, as bytes (never a URL to fetch)."""

    media_type: Annotated[str, Meta(pattern=r"^image/[a-z0-9.+-]{1,40}$")]
    data: Annotated[bytes, Meta(min_length=1, max_length=MAX_FRAME_SIZE)]


class ToolCall(Struct, frozen=True, kw_only=True):
    """A function call the model asks for; ``arguments`` is a JSON object as text."""

    id: Annotated[str, Meta(max_length=128)]
    name: Name
    arguments: Text = "{}"


class ToolSpec(Struct, frozen=True, kw_only=True):
    """A function the model may call; ``parameters`` is a JSON Schema as JSON text."""

    name: Name
    description: Annotated[str, Meta(max_length=8192)] = ""
    parameters: Text = "{}"


class ResponseFormat(Struct, frozen=True, kw_only=True):
    """Ask for JSON output: any JSON object, or one matching ``schema`` (JSON text)."""

    type: Literal["text", "json_object", "json_schema"]
    schema: Text | None = None
    name: Label = "response"
    #: ask the runtime to enforce ``schema`` exactly (OpenAI's Structured Outputs
    #: ``strict``); runtimes without the switch ignore it. Added with issue 10.
    strict: bool = False


class ChatMessage(Struct, frozen=True):
    """One chat turn. ``tool`` turns answer the ``tool_calls`` of an assistant turn."""

    role: Literal["system", "user", "assistant", "tool"]
    content: Text = ""
    images: Annotated[list[ImagePart], Meta(max_length=16)] = []
    tool_calls: Annotated[list[ToolCall], Meta(max_length=64)] = []
    tool_call_id: Annotated[str, Meta(max_length=128)] | None = None


class GenerationOptions(Struct, frozen=True, kw_only=True):
    """How to generate an answer: the one set of options the library takes, the wire
    carries (as fields of :class:`InferenceRequest`, which inherits them) and the
    backends receive (``ChatParams`` inherits them too). A new option is added here
    once, and each adapter maps it to its runtime's name where the runtime has one.

    None (or empty) always means "the runtime's default". Ranges are OpenAI's, the
    widest any backend documents; an adapter whose runtime lacks an option ignores it
    and says so in its docstring (Anthropic has no penalties or seed).
    """

    max_tokens: Annotated[int, Meta(ge=1, le=1 << 20)] | None = None
    temperature: Annotated[float, Meta(ge=0.0, le=2.0)] | None = None
    #: nucleus sampling: keep the smallest set of tokens whose probability adds up to this
    top_p: Annotated[float, Meta(ge=0.0, le=1.0)] | None = None
    seed: Annotated[int, Meta(ge=0, le=(1 << 31) - 1)] | None = None
    #: up to 4 sequences that end the answer where they would first appear (not included)
    stop: Annotated[list[Annotated[str, Meta(min_length=1, max_length=256)]], Meta(max_length=4)] = []
    #: -2 to 2: penalise tokens that appeared at all / by how often they appeared
    presence_penalty: Annotated[float, Meta(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Meta(ge=-2.0, le=2.0)] | None = None
    #: the application's opaque id for its end user, passed on for abuse monitoring
    user: Annotated[str, Meta(min_length=1, max_length=256)] | None = None
    tools: Annotated[list[ToolSpec], Meta(max_length=128)] = []
    #: "auto", "none", "required", or the name of one tool
    tool_choice: Annotated[str, Meta(max_length=128)] | None = None
    response_format: ResponseFormat | None = None


#: the names of :class:`GenerationOptions`' fields, in order
GENERATION_FIELDS: tuple[str, ...] = GenerationOptions.__struct_fields__


def generation_options(source: object) -> GenerationOptions:
    """The :class:`GenerationOptions` part of ``source`` (a request, ``ChatParams``, or
    any object with those attributes): how an option travels from one layer to the next
    without each layer naming every option."""
    return GenerationOptions(**{name: getattr(source, name) for name in GENERATION_FIELDS})


def generation_fields(source: object) -> dict[str, object]:
    """``source``'s generation options as keyword arguments (see :func:`generation_options`)."""
    return {name: getattr(source, name) for name in GENERATION_FIELDS}


class InferenceRequest(GenerationOptions, frozen=True, kw_only=True):
    """A client's signed request, addressed to one executor (``audience``); the
    :class:`GenerationOptions` fields travel flat beside these."""

    audience: PeerIdText
    nonce: Nonce
    created_at: Seconds
    model: Name
    messages: Annotated[list[ChatMessage], Meta(min_length=1, max_length=1024)]
    #: price caps, micro-credits per million tokens; None = no cap
    max_price_in: Micro | None = None
    max_price_out: Micro | None = None
    #: the most this request may cost, micro-credits (None = no limit): the executor
    #: refuses a request whose worst case (prompt tokens and ``max_tokens`` at its
    #: prices) is over it, and stops generating before the cost would pass it
    max_cost: Micro | None = None


class Receipt(Struct, frozen=True, kw_only=True):
    """The executor's signed account of one request: what was used and what it costs."""

    #: sha256 of the signed request payload: binds the receipt to exactly one request
    request_digest: Digest
    client: PeerIdText
    model: Name
    input_tokens: Tokens
    output_tokens: Tokens
    count_source: CountSource
    price_in: Micro
    price_out: Micro
    #: micro-credits, rounded up: see ``_pricing.cost_of``
    cost: Micro
    #: sha256 of the UTF-8 text streamed in chunk frames, in order
    output_digest: Digest
    chunks: Annotated[int, Meta(ge=0, le=1 << 31)]
    finish_reason: Label
    issued_at: Seconds
    #: sha256 of the msgpack list of tool calls streamed in chunk frames; empty when none
    tool_calls_digest: Annotated[bytes, Meta(max_length=32)] = b""
    # What the output tokens were spent on (all included in ``output_tokens``; the
    # visible text's share is what is left). See ``_accounting`` for the bounds a
    # client checks each part against.
    #: sha256 of the UTF-8 concatenation of the reasoning streamed in chunk frames; empty when none
    reasoning_digest: Annotated[bytes, Meta(max_length=32)] = b""
    #: output tokens of the reasoning streamed in chunk frames
    reasoning_tokens: Tokens = 0
    #: output tokens of reasoning the backend counted but never returned (e.g. Gemini thoughts)
    hidden_reasoning_tokens: Tokens = 0
    #: output tokens of the tool calls streamed in chunk frames (wrappers included)
    tool_call_tokens: Tokens = 0
    #: True when the answer came from the executor's response cache (an identical
    #: deterministic request answered before), not from a new generation; its prices are
    #: then what the operator bills for cached answers (at most the offer's). Added with
    #: issue 11: older receipts decode as False, and their signed bytes are untouched.
    cached: bool = False

    @property
    def text_tokens(self) -> int:
        """Output tokens of the visible text: ``output_tokens`` less every other part (may be
        negative only in a receipt whose parts do not add up, which a client rejects)."""
        return self.output_tokens - self.reasoning_tokens - self.hidden_reasoning_tokens - self.tool_call_tokens


class ReceiptAck(Struct, frozen=True, kw_only=True):
    """The client's counter-signature: it checked the receipt and booked it."""

    #: sha256 of the receipt payload bytes
    receipt_digest: Digest
    accepted_at: Seconds
    #: the client's own count of the streamed output, for the record
    client_output_tokens: Tokens


# ------------------------------------------------------------------------ frames


class _Frame(Struct, frozen=True, tag_field="t"):
    pass


class RequestFrame(_Frame, tag="req"):
    envelope: Envelope


class ChunkFrame(_Frame, tag="chunk"):
    """A piece of the answer. A chunk with no text, reasoning or tool calls is a
    *progress* chunk: the executor is alive while its backend is silent (a reasoning
    model thinking, a long prompt loading), so the client's idle deadline measures the
    executor, not the model. Older peers read it as an empty chunk."""

    #: 0, 1, 2, ... with no gaps
    seq: Annotated[int, Meta(ge=0, le=1 << 31)]
    text: Text
    #: complete tool calls (sent once each, usually in the last chunk)
    tool_calls: Annotated[list[ToolCall], Meta(max_length=64)] = []
    #: reasoning ("thinking") text the backend returned, in order; not part of ``text``
    reasoning: Text = ""

    @property
    def is_progress(self) -> bool:
        return not (self.text or self.reasoning or self.tool_calls)


class ReceiptFrame(_Frame, tag="receipt"):
    envelope: Envelope


class ErrorFrame(_Frame, tag="error", kw_only=True):
    #: an ErrorCode value; kept an int so codes from newer peers still decode
    code: Annotated[int, Meta(ge=0, le=65535)]
    message: Annotated[str, Meta(max_length=2048)]
    retryable: bool = False
    #: seconds; None when the peer gave no hint
    retry_after: Annotated[float, Meta(ge=0.0, le=86400.0)] | None = None
    #: when output was already streamed before the failure: the signed receipt for it
    receipt: Envelope | None = None


class AckFrame(_Frame, tag="ack"):
    envelope: Envelope


class AdvertFrame(_Frame, tag="advert"):
    envelope: Envelope


StreamFrame = Union[RequestFrame, ChunkFrame, ReceiptFrame, ErrorFrame, AckFrame, AdvertFrame]

_encoder = msgspec.msgpack.Encoder()
_frame_decoder = msgspec.msgpack.Decoder(StreamFrame)


def encode_payload(message: Struct) -> bytes:
    """The canonical bytes of a payload, to be signed exactly as they are."""
    return _encoder.encode(message)


def encode_frame_body(frame: StreamFrame) -> bytes:
    """A frame's bytes, without the length prefix (see ``_framing``)."""
    return _encoder.encode(frame)


def encode_tool_calls(calls: list[ToolCall]) -> bytes:
    """The canonical bytes of streamed tool calls; a receipt signs their sha256."""
    return _encoder.encode(calls) if calls else b""


def decode_frame(body: bytes) -> StreamFrame:
    """Decode one frame body. Raises ``MessageDecodeError`` and nothing else."""
    if len(body) > MAX_FRAME_SIZE:
        raise MessageDecodeError(f"frame of {len(body)} bytes is over the maximum")
    try:
        return _frame_decoder.decode(body)
    except (msgspec.DecodeError, ValueError, TypeError, RecursionError) as exc:
        raise MessageDecodeError(f"undecodable frame: {describe_decode_error(exc)}") from None
