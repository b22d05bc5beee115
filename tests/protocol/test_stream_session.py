"""The session variant of the inference stream (``/loomnet/infer/2``): many requests, one
after another, on one stream; each exchange exactly as strict as a one-request stream.
(The property tests over every state and over arbitrary bytes cover sessions too, in
``test_stream.py``.)"""

import pytest

from loomnet.protocol import (
    AckFrame,
    ChunkFrame,
    EndOfStream,
    ErrorFrame,
    InferenceConnection,
    ProtocolError,
    ReceiptFrame,
    RequestFrame,
    Role,
    StreamState,
    StreamTruncated,
    UnexpectedFrame,
)
from loomnet.protocol._stream import _EOF, _TRANSITIONS

from .test_stream import ENV


class SessionPair:
    def __init__(self):
        self.client = InferenceConnection(Role.CLIENT, session=True)
        self.executor = InferenceConnection(Role.EXECUTOR, session=True)

    def send(self, sender, frame):
        receiver = self.executor if sender is self.client else self.client
        receiver.receive_data(sender.send(frame))
        assert receiver.next_event() == frame
        assert receiver.state == sender.state
        return receiver.state

    def answer(self, chunks=2):
        self.send(self.client, RequestFrame(ENV))
        for i in range(chunks):
            self.send(self.executor, ChunkFrame(seq=i, text="t"))
        return self.send(self.executor, ReceiptFrame(ENV))


def test_many_requests_one_after_another_each_numbering_chunks_from_zero():
    p = SessionPair()
    for _ in range(3):
        assert p.answer(chunks=3) is StreamState.SETTLING
        assert p.send(p.client, AckFrame(ENV)) is StreamState.IDLE
    assert p.client.requests == p.executor.requests == 3


def test_the_ack_stays_optional_the_next_request_may_follow_the_receipt():
    p = SessionPair()
    p.answer()
    assert p.send(p.client, RequestFrame(ENV)) is StreamState.OPEN
    assert p.send(p.executor, ChunkFrame(seq=0, text="again")) is StreamState.OPEN


def test_an_error_ends_one_request_and_the_session_goes_on():
    p = SessionPair()
    p.send(p.client, RequestFrame(ENV))
    assert p.send(p.executor, ErrorFrame(code=303, message="over capacity", retryable=True)) is StreamState.IDLE
    assert p.answer() is StreamState.SETTLING
    # a refusal before any request (an undecodable one) leaves the session usable too
    q = SessionPair()
    assert q.send(q.executor, ErrorFrame(code=201, message="bad request")) is StreamState.IDLE


def test_end_of_stream_between_requests_is_a_clean_end_but_not_inside_one():
    p = SessionPair()
    p.answer()
    p.send(p.client, AckFrame(ENV))
    p.client.receive_data(b"")
    assert isinstance(p.client.next_event(), EndOfStream)
    assert p.client.state is StreamState.CLOSED

    q = SessionPair()
    q.send(q.client, RequestFrame(ENV))
    q.send(q.executor, ChunkFrame(seq=0, text="half"))
    q.client.receive_data(b"")
    with pytest.raises(StreamTruncated):
        q.client.next_event()
    assert q.client.state is StreamState.FAILED


def test_requests_never_overlap_and_chunks_never_arrive_between_requests():
    p = SessionPair()
    p.send(p.client, RequestFrame(ENV))
    with pytest.raises(UnexpectedFrame):
        p.client.send(RequestFrame(ENV))  # the answer is not over
    q = SessionPair()
    q.answer()
    q.send(q.client, AckFrame(ENV))
    with pytest.raises(UnexpectedFrame):
        q.executor.send(ChunkFrame(seq=0, text="unasked"))
    with pytest.raises(UnexpectedFrame):
        q.executor.send(ReceiptFrame(ENV))


def test_the_byte_bound_holds_per_request_not_per_session():
    client = InferenceConnection(Role.CLIENT, session=True, max_stream_bytes=2000)
    executor = InferenceConnection(Role.EXECUTOR, session=True)
    for _ in range(5):  # 5 answers of ~1500 bytes: over 2000 together, each under it
        executor.receive_data(client.send(RequestFrame(ENV)))
        executor.next_event()
        client.receive_data(executor.send(ChunkFrame(seq=0, text="x" * 1400)))
        client.next_event()
        client.receive_data(executor.send(ReceiptFrame(ENV)))
        client.next_event()
    executor.receive_data(client.send(RequestFrame(ENV)))
    executor.next_event()
    with pytest.raises(ProtocolError):
        client.receive_data(executor.send(ChunkFrame(seq=0, text="x" * 2100)))


def test_a_one_request_stream_is_unchanged():
    conn = InferenceConnection(Role.CLIENT)
    assert not conn.session
    conn.state = StreamState.CLOSED
    with pytest.raises(UnexpectedFrame):
        conn.send(RequestFrame(ENV))  # one request per /loomnet/infer/1 stream
    for key in ((StreamState.SETTLING, RequestFrame), (StreamState.IDLE, _EOF)):
        assert key not in _TRANSITIONS
