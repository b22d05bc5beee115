"""``loomnet ledger list|totals|export`` on both sides, through the real CLI (click's
CliRunner) over real ledger files filled with signed receipts.

The data folder holds an executor's ledger and a client's, as a machine running both
would: three receipts each, over two UTC days, with backends and provider costs on the
executor's side and accounts and a dispute on the client's.
"""

from __future__ import annotations

import csv
import io
import json
import sqlite3

import pytest
import trio
from click.testing import CliRunner

from loomnet.client._ledger import Ledger
from loomnet.node import _cli_ledger_read
from loomnet.node._cli_ledger_kit import CSV_COLUMNS
from loomnet.node.cli import main
from loomnet.protocol import SigningKey

from ..client.test_ledger import CLIENT, EXECUTOR, make_ack, signed_receipt

MAY_1 = 1_714_521_600.0  # 2024-05-01T00:00:00Z
DAY = 86_400.0
OTHER_CLIENT = SigningKey(bytes(range(2, 34))).peer_id
REASON = 'output tokens above the bound, "visible text"'

#: (n, recorded at, client, model, backend, provider cost, acknowledged, cost)
EXECUTOR_ROWS = [
    (0, MAY_1 + 10, CLIENT.peer_id, "alpha", "desk", None, True, 1_234_567),
    (1, MAY_1 + DAY + 5, OTHER_CLIENT, "beta", "hosted", 700, False, 250),
    (2, MAY_1 + DAY + 50, CLIENT.peer_id, "alpha", "hosted", 300, True, 1_000_000),
]
#: (n, recorded at, account, dispute)
CLIENT_ROWS = [(10, MAY_1 + 11, None, None), (11, MAY_1 + DAY + 6, "alice", None), (12, MAY_1 + DAY + 51, "alice", REASON)]


@pytest.fixture
def home(tmp_path):
    """A data folder with both ledgers; returns (folder, {side: [digest hex, oldest first]})."""

    async def fill():
        keys = {"executor": [], "client": []}
        async with await Ledger.open(tmp_path / "executor" / "ledger.sqlite") as ledger:
            for n, now, client, model, backend, paid, acked, cost in EXECUTOR_ROWS:
                envelope, receipt = signed_receipt(n, client=client, model=model, cost=cost)
                key = await ledger.record_receipt(envelope, receipt, role="executor", executor=EXECUTOR.peer_id,
                                                  now=now, backend=backend, provider_cost=paid)  # fmt: skip
                if acked:
                    await ledger.record_ack(key, make_ack(key))
                keys["executor"].append(key.hex())
        async with await Ledger.open(tmp_path / "client" / "ledger.sqlite") as ledger:
            for n, now, account, dispute in CLIENT_ROWS:
                envelope, receipt = signed_receipt(n)
                key = await ledger.record_receipt(envelope, receipt, role="client", executor=EXECUTOR.peer_id,
                                                  now=now, account=account, dispute=dispute)  # fmt: skip
                keys["client"].append(key.hex())
        return keys

    return tmp_path, trio.run(fill)


def run(*args: str, code: int = 0):
    result = CliRunner().invoke(main, ["ledger", *args])
    assert result.exit_code == code, result.output
    return result


def json_lines(result) -> list[dict]:
    return [json.loads(line) for line in result.stdout.splitlines()]


# ------------------------------------------------------------------ which ledger


def test_without_side_the_executors_ledger_is_read_when_there_is_one(home, tmp_path):
    folder, keys = home
    shown = run("list", "--data-dir", str(folder))
    assert f"the executor ledger {folder / 'executor' / 'ledger.sqlite'}" in shown.stdout
    assert [r["receipt_digest"] for r in json_lines(run("list", "--data-dir", str(folder), "--json"))] == \
        keys["executor"][::-1]  # fmt: skip
    (folder / "executor" / "ledger.sqlite").unlink()
    shown = run("list", "--data-dir", str(folder))
    assert f"the client ledger {folder / 'client' / 'ledger.sqlite'}" in shown.stdout


def test_the_data_dir_defaults_to_loomnet_data_dir(home, monkeypatch):
    folder, keys = home
    monkeypatch.setenv("LOOMNET_DATA_DIR", str(folder))
    rows = json_lines(run("list", "--side", "client", "--json"))
    assert [r["receipt_digest"] for r in rows] == keys["client"][::-1]


def test_a_missing_ledger_is_one_line_naming_where_it_looked(tmp_path):
    nowhere = tmp_path / "nowhere"
    for command in (["list"], ["totals"], ["export", "--csv", "-"]):
        result = run(*command, "--data-dir", str(nowhere), code=1)
        assert result.output.strip().count("\n") == 0
        assert str(nowhere / "executor" / "ledger.sqlite") in result.output
        assert str(nowhere / "client" / "ledger.sqlite") in result.output
        result = run(*command, "--data-dir", str(nowhere), "--side", "client", code=1)
        assert result.output.strip() == (f"Error: no client ledger at {nowhere / 'client' / 'ledger.sqlite'} "
                                          "(give --data-dir, or set LOOMNET_DATA_DIR, or --side)")  # fmt: skip
    assert not nowhere.exists()  # reading never creates a ledger


def test_a_file_that_is_not_a_usable_ledger_is_one_line(tmp_path):
    (tmp_path / "client").mkdir()
    (tmp_path / "client" / "ledger.sqlite").write_bytes(b"not a database, " * 100)
    result = run("list", "--data-dir", str(tmp_path), code=1)
    assert result.output.startswith("Error: [502 LEDGER_FAILED] ledger: could not open") and result.output.count("\n") == 1
    (tmp_path / "client" / "ledger.sqlite").unlink()
    raw = sqlite3.connect(tmp_path / "client" / "ledger.sqlite")
    raw.execute("PRAGMA user_version = 99")
    raw.close()
    result = run("totals", "--data-dir", str(tmp_path), code=1)
    assert "schema version 99" in result.output and result.output.count("\n") == 1


# ------------------------------------------------------------------ list


def test_list_shows_the_newest_first_with_a_limit(home):
    folder, keys = home
    shown = run("list", "--data-dir", str(folder), "--side", "client", "--limit", "2")
    lines = shown.stdout.splitlines()
    assert lines[0].split()[:3] == ["recorded", "(UTC)", "status"]
    assert [line.split()[-1] for line in lines[1:3]] == [keys["client"][2][:16], keys["client"][1][:16]]
    assert lines[1].startswith("2024-05-02 00:00:51  disputed") and "alice" in lines[1]
    assert lines[-1].startswith("2 receipt(s), newest first; more with a higher --limit; the client ledger")
    every = run("list", "--data-dir", str(folder), "--side", "client").stdout.splitlines()
    assert len(every) == 5 and every[-1].startswith("3 receipt(s), newest first; the client ledger")


def test_list_as_json_has_the_exports_columns(home):
    folder, keys = home
    rows = json_lines(run("list", "--data-dir", str(folder), "--side", "executor", "--json"))
    assert [list(r) for r in rows] == [list(CSV_COLUMNS)] * 3
    newest, middle, oldest = rows
    assert oldest["receipt_digest"] == keys["executor"][0] and oldest["role"] == "executor"
    assert (oldest["cost_micro"], oldest["cost_credits"]) == (1_234_567, 1.234567)
    assert (oldest["status"], oldest["backend"], oldest["provider_cost_micro"]) == ("acknowledged", "desk", None)
    assert oldest["recorded_at"] == "2024-05-01T00:00:10.000000Z" and oldest["account"] is None
    assert (middle["client"], middle["status"], middle["provider_cost_micro"]) == (OTHER_CLIENT, "unacknowledged", 700)
    assert newest["finish_reason"] == "stop" and newest["model"] == "alpha"


def test_list_filters_by_status_account_and_dates(home):
    folder, keys = home
    client = ["--data-dir", str(folder), "--side", "client", "--json"]

    def listed(*options: str) -> list[str]:
        return [r["receipt_digest"] for r in json_lines(run("list", *client, *options))]

    assert listed("--status", "disputed") == [keys["client"][2]]
    assert listed("--account", "alice") == [keys["client"][2], keys["client"][1]]
    assert listed("--account", "alice", "--status", "accepted") == [keys["client"][1]]
    assert listed("--since", "2024-05-02") == [keys["client"][2], keys["client"][1]]
    # a bare date given to --until is the end of that day; a time is exclusive
    assert listed("--until", "2024-05-01") == [keys["client"][0]]
    assert listed("--since", "2024-05-01", "--until", "2024-05-01") == [keys["client"][0]]
    assert listed("--since", "2024-05-02T00:00:06Z", "--until", "2024-05-02T00:00:51") == [keys["client"][1]]
    assert listed("--since", "2024-05-02T02:00:06+02:00") == [keys["client"][2], keys["client"][1]]
    assert listed("--since", "2024-05-03") == []


def test_filters_the_ledger_cannot_answer_are_usage_errors(home):
    folder, _ = home
    base = ["--data-dir", str(folder)]
    result = run("list", *base, "--side", "executor", "--account", "alice", code=2)
    assert "accounts are a client's" in result.output
    result = run("totals", *base, "--side", "client", "--status", "acknowledged", code=2)
    assert "'acknowledged' is not a client's status (accepted, disputed)" in result.output
    result = run("export", *base, "--side", "client", "--account", "sk-live-SECRET key", "--csv", "-", code=2)
    assert "--account" in result.output and "SECRET" not in result.output
    result = run("list", *base, "--since", "last tuesday", code=2)
    assert "'last tuesday' is not a date (YYYY-MM-DD) or an ISO-8601 time" in result.output
    result = run("list", *base, "--since", "2024-05-03", "--until", "2024-05-01", code=2)
    assert "--since is after --until" in result.output
    run("list", *base, "--limit", "0", code=2)
    run("totals", *base, "--by", "client", code=2)
    run("export", *base, code=2)  # --csv is required


# ------------------------------------------------------------------ totals


def test_totals_by_day_model_peer_and_account(home):
    folder, _ = home
    executor = ["--data-dir", str(folder), "--side", "executor"]
    shown = run("totals", *executor).stdout.splitlines()
    assert shown[0].split() == ["day", "receipts", "input", "output", "credits"]
    day1, day2 = (EXECUTOR_ROWS[0],), EXECUTOR_ROWS[1:]
    assert shown[1].split() == ["2024-05-01", "1", "10", "20", "1.234567"]
    assert shown[2].split() == ["2024-05-02", "2", str(11 + 12), str(21 + 22), "1.000250"]
    assert shown[3].split() == ["total", "3", "33", "63", "2.234817"]
    assert shown[4] == f"every status; the executor ledger {folder / 'executor' / 'ledger.sqlite'}"
    assert len(day1) + len(day2) == 3

    by_model = json_lines(run("totals", *executor, "--by", "model", "--json"))
    assert by_model == [
        {"model": "alpha", "receipts": 2, "input_tokens": 22, "output_tokens": 42, "cost_micro": 2_234_567,
         "cost_credits": 2.234567},
        {"model": "beta", "receipts": 1, "input_tokens": 11, "output_tokens": 21, "cost_micro": 250,
         "cost_credits": 0.00025},
    ]  # fmt: skip
    by_peer = {r["peer"]: r["receipts"] for r in json_lines(run("totals", *executor, "--by", "peer", "--json"))}
    assert by_peer == {CLIENT.peer_id: 2, OTHER_CLIENT: 1}
    acked = json_lines(run("totals", *executor, "--by", "peer", "--status", "acknowledged", "--json"))
    assert [(r["peer"], r["cost_micro"]) for r in acked] == [(CLIENT.peer_id, 2_234_567)]

    client = ["--data-dir", str(folder), "--side", "client"]
    shown = run("totals", *client, "--by", "account").stdout.splitlines()
    assert [line.split()[:2] for line in shown[1:4]] == [["(own)", "1"], ["alice", "2"], ["total", "3"]]
    by_account = json_lines(run("totals", *client, "--by", "account", "--json", "--since", "2024-05-02"))
    assert [(r["account"], r["receipts"]) for r in by_account] == [("alice", 2)]
    by_peer = json_lines(run("totals", *client, "--by", "peer", "--json", "--status", "accepted"))
    assert [(r["peer"], r["receipts"]) for r in by_peer] == [(EXECUTOR.peer_id, 2)]
    empty = run("totals", *client, "--since", "2030-01-01").stdout.splitlines()
    assert empty[1].split() == ["total", "0", "0", "0", "0.000000"]


# ------------------------------------------------------------------ export


def test_export_writes_one_row_per_receipt_oldest_first(home, tmp_path):
    folder, keys = home
    target = tmp_path / "out" / "executor.csv"
    target.parent.mkdir()
    result = run("export", "--data-dir", str(folder), "--side", "executor", "--csv", str(target))
    assert result.stderr.strip() == (f"3 receipt(s) from the executor ledger {folder / 'executor' / 'ledger.sqlite'} "
                                     f"to {target}")  # fmt: skip
    assert result.stdout == ""
    assert sorted(p.name for p in target.parent.iterdir()) == ["executor.csv"]  # no partial file left
    raw = target.read_bytes()
    assert raw.count(b"\r\n") == 4  # RFC 4180 line ends, a header and three rows
    rows = list(csv.reader(io.StringIO(raw.decode("utf-8"), newline="")))
    assert rows[0] == list(CSV_COLUMNS)
    first = dict(zip(CSV_COLUMNS, rows[1]))
    assert [r[0] for r in rows[1:]] == keys["executor"]
    assert first == {
        "receipt_digest": keys["executor"][0], "role": "executor", "executor": EXECUTOR.peer_id,
        "client": CLIENT.peer_id, "model": "alpha", "input_tokens": "10", "output_tokens": "20",
        "cost_micro": "1234567", "cost_credits": "1.234567", "count_source": "backend", "finish_reason": "stop",
        "issued_at": "1970-01-01T00:16:40.000000Z", "recorded_at": "2024-05-01T00:00:10.000000Z",
        "status": "acknowledged", "dispute_reason": "", "account": "", "backend": "desk", "provider_cost_micro": "",
    }  # fmt: skip
    assert dict(zip(CSV_COLUMNS, rows[2]))["provider_cost_micro"] == "700"


def test_export_to_stdout_quotes_what_needs_quoting(home):
    folder, keys = home
    result = run("export", "--data-dir", str(folder), "--side", "client", "--csv", "-", "--account", "alice")
    rows = list(csv.DictReader(io.StringIO(result.stdout, newline="")))
    assert [r["receipt_digest"] for r in rows] == keys["client"][1:]
    assert rows[1]["dispute_reason"] == REASON and rows[1]["status"] == "disputed"
    assert {r["account"] for r in rows} == {"alice"} and {r["backend"] for r in rows} == {""}
    assert '"output tokens above the bound, ""visible text"""' in result.stdout


def test_export_streams_page_by_page(home, monkeypatch):
    folder, keys = home
    pages = []
    real_page = Ledger.page

    async def counted(self, **kwargs):
        page = await real_page(self, **kwargs)
        pages.append(len(page.entries))
        return page

    monkeypatch.setattr(_cli_ledger_read, "_PAGE", 2)
    monkeypatch.setattr(Ledger, "page", counted)
    result = run("export", "--data-dir", str(folder), "--side", "client", "--csv", "-")
    assert pages == [2, 1]  # never the whole ledger at once
    assert [r["receipt_digest"] for r in csv.DictReader(io.StringIO(result.stdout))] == keys["client"]


def test_export_that_cannot_write_leaves_nothing(home, tmp_path):
    folder, _ = home
    result = run("export", "--data-dir", str(folder), "--csv", str(tmp_path / "missing" / "x.csv"), code=1)
    assert result.output.startswith(f"Error: could not write {tmp_path / 'missing' / 'x.csv'}")
    assert result.output.count("\n") == 1


def test_the_docs_list_the_export_columns_in_order():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "ledger.md").read_text()
    table = text.split("| column | what |", 1)[1].split("\n\n", 1)[0]
    documented = [line.split("`")[1] for line in table.splitlines() if line.startswith("| `")]
    assert documented == list(CSV_COLUMNS)
