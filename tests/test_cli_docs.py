"""docs/cli.md is generated from the commands' parsers and must match what ``--help`` prints."""

from __future__ import annotations

import re

import pytest

from torchmatgrad import cli
from torchmatgrad.cli import docs


def test_cli_md_is_current():
    assert docs.DOC_PATH.exists(), "docs/cli.md is missing: python -m torchmatgrad.cli.docs --write"
    assert docs.DOC_PATH.read_text(encoding="utf-8") == docs.render(), (
        "docs/cli.md is stale: run python -m torchmatgrad.cli.docs --write"
    )


def _blocks(text: str) -> dict[str, str]:
    return dict(re.findall(r"^## (\w+)\n\n```text\n(.*?)\n```$", text, flags=re.M | re.S))


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_cli_md_matches_help(command, monkeypatch, capsys):
    # What the command itself prints for --help, at the page's width, is the page's block: a
    # command that adds options outside build_parser() would show up here.
    monkeypatch.setenv("COLUMNS", str(docs.WIDTH + 2))  # argparse wraps at COLUMNS - 2
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    monkeypatch.setenv("NO_COLOR", "1")
    try:
        rc = cli.main([command, "--help"])
    except SystemExit as e:
        rc = e.code
    assert rc in (0, None)
    printed = capsys.readouterr().out.rstrip()
    assert printed == _blocks(docs.DOC_PATH.read_text(encoding="utf-8"))[command]


def test_cli_md_lists_every_command():
    blocks = _blocks(docs.render())
    assert list(blocks) == list(cli.COMMANDS)
    for command, block in blocks.items():
        assert block.startswith(f"usage: python -m torchmatgrad {command} ")


def test_docs_check_flags_a_stale_page(tmp_path, monkeypatch, capsys):
    stale = tmp_path / "cli.md"
    stale.write_text(docs.render().replace("--transforms", "--transform"), encoding="utf-8")
    monkeypatch.setattr(docs, "DOC_PATH", stale)
    assert docs.main(["--check"]) == 1
    assert "stale" in capsys.readouterr().out
    stale.write_text(docs.render(), encoding="utf-8")
    assert docs.main(["--check"]) == 0
