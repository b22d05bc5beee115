import pytest
from hypothesis import given, strategies as st

from loomnet.protocol import (
    NEED_DATA,
    AckFrame,
    ChunkFrame,
    EndOfStream,
    Envelope,
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
from loomnet.protocol._stream import _EOF, _SESSION_TRANSITIONS, _TRANSITIONS

ENV = Envelope(payload=b"p", signer=b"s" * 32, sig=b"g" * 64)


class Pair:
    """Pushes frames from one side's send() into the other side's receive_data()."""

    def __init__(self):
        self.client = InferenceConnection(Role.CLIENT)
        self.executor = InferenceConnection(Role.EXECUTOR)

    def send(self, sender, frame):
        receiver = self.executor if sender is self.client else self.client
        receiver.receive_data(sender.send(frame))
        event = receiver.next_event()
        assert event == frame
        assert receiver.next_event() is NEED_DATA
        assert receiver.state == sender.state
        return event

    def eof_to(self, receiver):
        receiver.receive_data(b"")
        return receiver.next_event()


def test_happy_path_with_ack():
    p = Pair()
    p.send(p.client, RequestFrame(ENV))
    for i in range(3):
        p.send(p.executor, ChunkFrame(seq=i, text="t"))
    p.send(p.executor, ReceiptFrame(ENV))
    assert p.client.state is StreamState.SETTLING
    p.send(p.client, AckFrame(ENV))
    assert p.client.state is StreamState.CLOSED
    assert isinstance(p.eof_to(p.client), EndOfStream)


def test_ack_is_optional():
    p = Pair()
    p.send(p.client, RequestFrame(ENV))
    p.send(p.executor, ReceiptFrame(ENV))
    assert isinstance(p.eof_to(p.executor), EndOfStream)
    assert p.executor.state is StreamState.CLOSED


def test_refusal_before_and_after_request():
    p = Pair()
    p.send(p.executor, ErrorFrame(code=102, message="bad"))
    assert p.client.state is StreamState.CLOSED
    p = Pair()
    p.send(p.client, RequestFrame(ENV))
    p.send(p.executor, ErrorFrame(code=206, message="price"))
    assert p.executor.state is StreamState.CLOSED


def test_eof_before_terminal_frame_is_truncation():
    p = Pair()
    p.send(p.client, RequestFrame(ENV))
    p.send(p.executor, ChunkFrame(seq=0, text="partial"))
    with pytest.raises(StreamTruncated):
        p.eof_to(p.client)
    assert p.client.state is StreamState.FAILED


def test_roles_are_enforced_on_both_ends():
    client = InferenceConnection(Role.CLIENT)
    with pytest.raises(UnexpectedFrame):
        client.send(ChunkFrame(seq=0, text="x"))
    executor = InferenceConnection(Role.EXECUTOR)
    executor.receive_data(InferenceConnection(Role.EXECUTOR).send(ErrorFrame(code=1, message="")))
    with pytest.raises(UnexpectedFrame):
        executor.next_event()
    assert executor.state is StreamState.FAILED


def test_chunk_sequence_must_not_skip():
    p = Pair()
    p.send(p.client, RequestFrame(ENV))
    p.send(p.executor, ChunkFrame(seq=0, text="a"))
    with pytest.raises(UnexpectedFrame):
        p.executor.send(ChunkFrame(seq=2, text="b"))


def test_second_terminal_frame_is_refused():
    p = Pair()
    p.send(p.client, RequestFrame(ENV))
    p.send(p.executor, ReceiptFrame(ENV))
    with pytest.raises(UnexpectedFrame):
        p.executor.send(ErrorFrame(code=1, message=""))


def test_total_bytes_are_bounded():
    client = InferenceConnection(Role.CLIENT, max_stream_bytes=100)
    with pytest.raises(ProtocolError):
        client.receive_data(b"x" * 101)


FRAMES = [RequestFrame, ChunkFrame, ReceiptFrame, ErrorFrame, AckFrame, _EOF]


@given(st.sampled_from(list(StreamState)), st.sampled_from(FRAMES), st.booleans())
def test_every_state_input_pair_transitions_or_fails(state, kind, session):
    conn = InferenceConnection(Role.CLIENT, session=session)
    table = _SESSION_TRANSITIONS if session else _TRANSITIONS
    conn.state = state
    if (state, kind) in table:
        conn._advance(kind, None)
        assert conn.state is table[(state, kind)]
    else:
        with pytest.raises(ProtocolError):
            conn._advance(kind, None)
        assert conn.state is StreamState.FAILED


@given(st.binary(max_size=400), st.sampled_from(list(Role)), st.booleans())
def test_arbitrary_bytes_into_a_connection_raise_only_protocol_errors(data, role, session):
    conn = InferenceConnection(role, session=session)
    try:
        conn.receive_data(data)
        conn.receive_data(b"")
        while not isinstance(conn.next_event(), EndOfStream):
            pass
    except ProtocolError:
        assert conn.state is StreamState.FAILED
