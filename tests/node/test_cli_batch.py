"""``loomnet chat --batch``: the JSONL line format (``node/_cli_batch``), bad lines with
their line numbers, the answer lines, and the command's usage errors. No network here:
``tests/e2e/test_chat_batch.py`` runs the command's code against real executors."""

from __future__ import annotations

import json

import msgspec
import pytest
from click.testing import CliRunner

from loomnet.client import ChatRequest
from loomnet.node._cli_batch import LineDefaults, Parsed, answer_of, parse_batch
from loomnet.node.cli import main
from loomnet.protocol import ChatMessage, ErrorCode, GenerationOptions, InvalidRequest, NoOfferError

DEFAULTS = LineDefaults(model="smol", max_tokens=64, temperature=0.7, max_price_out=5_000_000, on_premise_only=True)


def parse(*lines: str | dict, defaults: LineDefaults = DEFAULTS) -> list[Parsed]:
    text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines)
    return parse_batch(text.encode(), defaults)


def test_a_prompt_line_takes_the_commands_options_as_defaults():
    [p] = parse({"prompt": "Hi", "id": "q1"})
    assert (p.line, p.id, p.error) == (1, "q1", None)
    assert p.request == ChatRequest(
        [ChatMessage("user", "Hi")], model="smol", options=GenerationOptions(max_tokens=64, temperature=0.7),
        max_price_out=5_000_000, on_premise_only=True,
    )  # fmt: skip


def test_a_line_overrides_the_defaults_it_names():
    [p] = parse({"prompt": "Hi", "max_tokens": 5, "temperature": 0, "seed": 42, "system": "Be brief."})
    assert p.request.options == GenerationOptions(max_tokens=5, temperature=0.0, seed=42)
    assert p.request.messages == [ChatMessage("system", "Be brief."), ChatMessage("user", "Hi")]
    [p] = parse({"prompt": "Hi"}, defaults=LineDefaults(system="Default system."))
    assert p.request.messages[0] == ChatMessage("system", "Default system.")


def test_model_and_route_go_together_a_line_setting_either_drops_both_defaults():
    both = LineDefaults(model="smol", route="fastest")
    [own_model, own_route, neither] = parse({"prompt": "a", "model": "big"}, {"prompt": "b", "route": "category:fast"},
                                            {"prompt": "c"}, defaults=both)  # fmt: skip
    assert (own_model.request.model, own_model.request.route) == ("big", None)
    assert (own_route.request.model, own_route.request.route) == (None, "category:fast")
    assert (neither.request.model, neither.request.route) == ("smol", "fastest")


def test_a_messages_line_is_the_whole_conversation():
    turns = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    [p] = parse({"messages": turns, "id": 7}, defaults=LineDefaults(system="ignored for messages"))
    assert p.id == 7 and p.request.messages == [ChatMessage("system", "S"), ChatMessage("user", "U")]


def test_blank_lines_are_skipped_and_line_numbers_count_them():
    parsed = parse({"prompt": "a"}, "", "   ", {"prompt": "b"}, "")
    assert [p.line for p in parsed] == [1, 4]


@pytest.mark.parametrize(
    ("line", "says", "field"),
    [
        ('{"prompt": "a", "promt": "b"}', "unknown field `promt`", None),
        ('{"prompt": 5}', "Expected `str | null`, got `int` - at `$.prompt`", "prompt"),
        ('{"prompt": "a", "max_tokens": 0}', "Expected `int` >= 1", "max_tokens"),
        ('{"prompt": "a", "temperature": 2.5}', "Expected `float` <= 2.0", "temperature"),
        ('{"prompt": "a", "id": 1.5}', "at `$.id`", "id"),
        ('{"messages": [{"role": "wizard", "content": "x"}]}', "at `$.messages[0].role`", "messages[0].role"),
        ('{"prompt": "a"', "not a JSON object", None),
        ("[1, 2]", "Expected `object`, got `array`", None),
        ('"just a string"', "Expected `object`, got `str`", None),
        ("{}", 'give "prompt" or "messages" (exactly one)', "prompt"),
        ('{"prompt": "a", "messages": [{"role": "user", "content": "b"}]}', "exactly one", "prompt"),
        ('{"messages": []}', '"messages" is empty', "messages"),
        ('{"messages": [{"role": "user", "content": "b"}], "system": "S"}', '"system" goes with "prompt"', "system"),
    ],
)
def test_a_bad_line_is_a_typed_error_naming_its_line_and_the_others_still_parse(line, says, field):
    parsed = parse({"prompt": "before"}, line, {"prompt": "after"})
    good_before, bad, good_after = parsed
    assert good_before.request is not None and good_after.request is not None and bad.request is None
    assert isinstance(bad.error, InvalidRequest) and bad.error.code is ErrorCode.BAD_REQUEST
    assert bad.line == 2 and bad.error.message.startswith("line 2: ") and says in bad.error.message
    assert bad.error.field == field


def test_bytes_that_are_no_utf8_are_a_bad_line_too():
    [bad, good] = parse_batch(b'{"prompt": "\xff\xfe"}\n{"prompt": "ok"}', DEFAULTS)
    assert bad.error is not None and bad.error.message.startswith("line 1: ") and good.request is not None


def test_an_error_line_carries_the_code_its_name_and_the_message():
    error = NoOfferError("no live offer for model 'x'", code=ErrorCode.NO_OFFER)
    failed = answer_of(Parsed(line=3, id="q3"), error)
    assert msgspec.json.decode(msgspec.json.encode(failed)) == {
        "line": 3, "id": "q3", "ok": False,
        "error": {"code": 400, "name": "NO_OFFER", "message": "no live offer for model 'x'"},
    }  # fmt: skip

    # an answer's line (text, executor, tokens, cost): tests/e2e/test_chat_batch.py, with real receipts


# ------------------------------------------------------------------ the command


def invoke(*args: str, input: str | None = None):
    return CliRunner().invoke(main, ["chat", *args], input=input)


def test_a_prompt_and_a_batch_both_or_neither_is_a_usage_error(tmp_path):
    batch = tmp_path / "b.jsonl"
    batch.write_text('{"prompt": "a"}\n')
    both = invoke("--batch", str(batch), "hello")
    assert both.exit_code == 2 and "give a PROMPT or --batch FILE" in both.output
    neither = invoke()
    assert neither.exit_code == 2 and "give a PROMPT or --batch FILE" in neither.output
    stray = invoke("--concurrency", "3", "hello")
    assert stray.exit_code == 2 and "--output and --concurrency go with --batch" in stray.output


def test_a_missing_or_empty_batch_file_is_a_usage_error(tmp_path):
    missing = invoke("--batch", str(tmp_path / "nope.jsonl"))
    assert missing.exit_code == 2 and "cannot read" in missing.output
    (tmp_path / "empty.jsonl").write_text("\n\n")
    empty = invoke("--batch", str(tmp_path / "empty.jsonl"))
    assert empty.exit_code == 2 and "holds no line to answer" in empty.output
    bad_concurrency = invoke("--batch", "-", "--concurrency", "0", input='{"prompt": "a"}\n')
    assert bad_concurrency.exit_code == 2


def test_a_file_of_bad_lines_only_writes_each_error_in_place_sends_nothing_and_exits_1(tmp_path):
    out = tmp_path / "answers.jsonl"
    result = CliRunner().invoke(
        main, ["chat", "--batch", "-", "--output", str(out), "--data-dir", str(tmp_path / "d"), "--wait", "0.1"],
        input='{"prompt": 1}\n\n{"id": "x", "messages": []}\n',
    )  # fmt: skip
    assert result.exit_code == 1
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(a["line"], a.get("id"), a["ok"], a["error"]["code"]) for a in answers] == [
        (1, None, False, 209), (3, "x", False, 209),
    ]  # fmt: skip
    assert "line 1: error [209 BAD_REQUEST]: Expected `str | null`, got `int` - at `$.prompt`" in result.output
    assert "line 3: error [209 BAD_REQUEST]: \"messages\" is empty" in result.output
    assert "[batch] 2 line(s): 0 answered, 2 failed (line 1, 3)" in result.output
    assert not (tmp_path / "d").exists()  # no client was started: nothing to send


def test_a_bad_line_keeps_its_id_in_the_answer():
    [bad, unreadable, good] = parse_batch(
        b'{"id": "bad", "prompt": "x", "temprature": 0}\n{"id": "half", "prompt": \n{"id": 7, "prompt": "ok"}',
        DEFAULTS,
    )
    assert (bad.id, bad.error is not None) == ("bad", True)
    assert unreadable.id is None and unreadable.error is not None  # not JSON: no id to keep
    assert (good.id, good.error) == (7, None)
