"""A peer learns where its message breaks the schema, in loomnet's words, never msgspec's."""

import msgspec
import pytest

from loomnet.protocol import MessageDecodeError, decode_frame


@pytest.mark.parametrize(
    ("raw", "said"),
    [
        ({"t": "chunk", "seq": 0, "text": 5}, "the value at $.text is not allowed by the protocol's schema"),
        ({"t": "chunk", "seq": -1, "text": "x"}, "the value at $.seq is not allowed by the protocol's schema"),
        ({"t": "chunk", "text": "x"}, "required field 'seq' is missing at $"),
        ({"t": "nope"}, "the value at $.t is not allowed by the protocol's schema"),
    ],
)
def test_schema_breaks_name_the_field_in_our_words(raw, said):
    with pytest.raises(MessageDecodeError) as info:
        decode_frame(msgspec.msgpack.encode(raw))
    assert info.value.peer_message == f"undecodable frame: {said}"
    assert "Expected" not in info.value.peer_message and "`" not in info.value.peer_message


def test_bytes_that_are_no_message_say_so():
    with pytest.raises(MessageDecodeError) as info:
        decode_frame(b"\xc1\xff\x00")
    assert info.value.peer_message == "undecodable frame: the bytes are not a well-formed message"
