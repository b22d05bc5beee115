"""loomnet.protocol — sans-IO schemas, encoding, signing, framing and stream rules.

Knows bytes and messages, nothing about sockets or clocks: every check that depends
on time takes ``now`` as an argument, and nonces and keys are passed in.
"""

from ._accounting import (
    PART_SLACK as PART_SLACK,
    TOOL_CALL_SLACK as TOOL_CALL_SLACK,
    OutputBreakdown as OutputBreakdown,
    OutputCaps as OutputCaps,
    apportion as apportion,
    breakdown_problems as breakdown_problems,
    output_caps as output_caps,
)
from ._decode_errors import describe_decode_error as describe_decode_error
from ._errors import (
    BackendError as BackendError,
    ConfigError as ConfigError,
    ErrorCode as ErrorCode,
    FrameError as FrameError,
    InvalidRequest as InvalidRequest,
    LedgerError as LedgerError,
    LoomError as LoomError,
    MessageDecodeError as MessageDecodeError,
    NetworkError as NetworkError,
    NetworkTimeout as NetworkTimeout,
    NoOfferError as NoOfferError,
    ProtocolError as ProtocolError,
    ReceiptError as ReceiptError,
    RemoteError as RemoteError,
    RequestRejected as RequestRejected,
    SignatureError as SignatureError,
    StreamTruncated as StreamTruncated,
    UnexpectedFrame as UnexpectedFrame,
)
from ._framing import END as END, NEED_DATA as NEED_DATA, FrameDecoder as FrameDecoder, encode_frame as encode_frame
from ._identity import (
    SigningKey as SigningKey,
    peer_id_from_public_key as peer_id_from_public_key,
    public_key_from_peer_id as public_key_from_peer_id,
    verify_signature as verify_signature,
)
from ._messages import (
    MAX_FRAME_SIZE as MAX_FRAME_SIZE,
    MAX_TOKEN_COUNT as MAX_TOKEN_COUNT,
    AckFrame as AckFrame,
    Advert as Advert,
    AdvertFrame as AdvertFrame,
    ChatMessage as ChatMessage,
    ChunkFrame as ChunkFrame,
    CountSource as CountSource,
    Envelope as Envelope,
    ErrorFrame as ErrorFrame,
    GENERATION_FIELDS as GENERATION_FIELDS,
    GenerationOptions as GenerationOptions,
    InferenceRequest as InferenceRequest,
    ImagePart as ImagePart,
    ModelOffer as ModelOffer,
    Receipt as Receipt,
    ReceiptAck as ReceiptAck,
    ReceiptFrame as ReceiptFrame,
    RequestFrame as RequestFrame,
    ResponseFormat as ResponseFormat,
    StreamFrame as StreamFrame,
    ToolCall as ToolCall,
    ToolSpec as ToolSpec,
    encode_tool_calls as encode_tool_calls,
    decode_frame as decode_frame,
    encode_frame_body as encode_frame_body,
    encode_payload as encode_payload,
    generation_fields as generation_fields,
    generation_options as generation_options,
)
from ._pricing import cost_of as cost_of, credits_to_micro as credits_to_micro
from ._replay import ReplayGuard as ReplayGuard
from ._signing import SignedKind as SignedKind, digest as digest, open_envelope as open_envelope, seal as seal
from ._stream import (
    EndOfStream as EndOfStream,
    InferenceConnection as InferenceConnection,
    Role as Role,
    StreamState as StreamState,
)

#: Gossip topic on which executors publish their signed adverts.
ADVERT_TOPIC = "/loomnet/adverts/1"
#: Stream protocol for one inference request.
INFER_PROTOCOL = "/loomnet/infer/1"
#: Stream protocol for a session: many inference requests, one after another, on one
#: stream (``_stream``'s module doc). Executors serve both; clients prefer this one.
INFER_SESSION_PROTOCOL = "/loomnet/infer/2"
#: Stream protocol on which a peer hands over the adverts it holds.
ADVERTS_PROTOCOL = "/loomnet/adverts/1"

__all__ = [
    "ADVERTS_PROTOCOL",
    "ADVERT_TOPIC",
    "AckFrame",
    "Advert",
    "AdvertFrame",
    "BackendError",
    "ChatMessage",
    "ChunkFrame",
    "ConfigError",
    "CountSource",
    "END",
    "EndOfStream",
    "Envelope",
    "ErrorCode",
    "ErrorFrame",
    "FrameDecoder",
    "FrameError",
    "INFER_PROTOCOL",
    "INFER_SESSION_PROTOCOL",
    "ImagePart",
    "InferenceConnection",
    "InferenceRequest",
    "InvalidRequest",
    "LedgerError",
    "LoomError",
    "MAX_FRAME_SIZE",
    "MessageDecodeError",
    "ModelOffer",
    "NEED_DATA",
    "NetworkError",
    "NetworkTimeout",
    "OutputBreakdown",
    "OutputCaps",
    "PART_SLACK",
    "TOOL_CALL_SLACK",
    "apportion",
    "breakdown_problems",
    "output_caps",
    "NoOfferError",
    "ProtocolError",
    "Receipt",
    "ReceiptAck",
    "ReceiptError",
    "ReceiptFrame",
    "RemoteError",
    "ReplayGuard",
    "RequestFrame",
    "RequestRejected",
    "ResponseFormat",
    "Role",
    "SignatureError",
    "SignedKind",
    "SigningKey",
    "StreamFrame",
    "StreamState",
    "StreamTruncated",
    "ToolCall",
    "ToolSpec",
    "UnexpectedFrame",
    "cost_of",
    "credits_to_micro",
    "decode_frame",
    "describe_decode_error",
    "digest",
    "encode_frame",
    "encode_frame_body",
    "encode_payload",
    "encode_tool_calls",
    "open_envelope",
    "peer_id_from_public_key",
    "public_key_from_peer_id",
    "seal",
    "verify_signature",
]
