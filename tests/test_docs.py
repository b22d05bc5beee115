"""Docs that must match the code."""

from pathlib import Path

from loomnet.protocol import ErrorCode

ROOT = Path(__file__).resolve().parents[1]


def test_error_code_table_matches_the_enum():
    text = (ROOT / "docs" / "errors.md").read_text()
    for code in ErrorCode:
        assert f"| {int(code)} | `{code.name}` |" in text, code


def test_readme_starts_with_the_two_commands():
    head = (ROOT / "README.md").read_text().splitlines()[:15]
    assert any("make run" in line for line in head) and any("make test" in line for line in head)
