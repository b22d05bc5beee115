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


def test_no_offer_says_how_to_get_one(capsys):
    from loomnet.protocol import NoOfferError

    with pytest.raises(SystemExit):
        _fail(NoOfferError("no live offer for any model; live models: none", code=ErrorCode.NO_OFFER))
    err = capsys.readouterr().err
    assert "loomnet executor" in err and "--bootstrap" in err


def test_no_offer_for_one_model_stays_one_line_when_executors_answered(capsys):
    """The how-to-start-an-executor hint is for an empty offer table only: when an
    executor answered with other models, the one error line (naming them) is the answer."""
    from loomnet.protocol import NoOfferError

    with pytest.raises(SystemExit):
        _fail(
            NoOfferError(
                "no live offer for model 'x'; live models: smollm2-135m",
                code=ErrorCode.NO_OFFER,
                live_models=("smollm2-135m",),
            )
        )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--bootstrap" not in err


def test_ctrl_c_inside_a_nursery_exits_130():
    import trio

    from loomnet.node.cli import _run

    async def interrupted():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.sleep_forever)
            raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exit_info:
        _run(interrupted)
    assert exit_info.value.code == 130


def test_a_bootstrap_that_is_no_multiaddr_is_a_usage_error():
    from click.testing import CliRunner

    from loomnet.node.cli import main

    result = CliRunner().invoke(main, ["chat", "--bootstrap", "garbage", "hi"])
    assert result.exit_code == 2
    assert "not a multiaddr" in result.output


def test_names_from_the_network_are_shown_without_their_control_characters():
    from loomnet.node.cli import shown

    assert shown("evil\x1b]0;owned\x07\nline") == "evil\\x1b]0;owned\\x07\\x0aline"
    assert shown("modèle · ok") == "modèle · ok"
