"""The CLI's one-line errors: the code, loomnet's message, and what happened to a receipt."""

import pytest

from loomnet.node.cli import _fail
from loomnet.protocol import ErrorCode, InvalidRequest, ReceiptError


def test_a_disputed_receipt_says_it_is_booked(capsys):
    with pytest.raises(SystemExit) as exit_info:
        _fail(ReceiptError("receipt rejected: it bills 90 tokens for the visible text", code=ErrorCode.RECEIPT_MISMATCH))
    err = capsys.readouterr().err
    assert exit_info.value.code == 1
    assert err.startswith("error [402 RECEIPT_MISMATCH]: receipt rejected")
    assert "booked as disputed" in err


def test_an_invalid_request_names_its_field(capsys):
    with pytest.raises(SystemExit):
        _fail(InvalidRequest("temperature must be between 0 and 2, not 2.5", field="temperature"))
    assert capsys.readouterr().err.strip() == "error [209 BAD_REQUEST]: temperature must be between 0 and 2, not 2.5"
