"""The documentation's code runs: every ```python block of README.md and docs/*.md, in order.

Each file's blocks run in one fresh namespace (a block may use what an earlier block of the same
file defined), from a temporary working directory, with line numbers in tracebacks that are the
file's own. Blocks tagged anything else (```bash, ```text, ```) are not run: a doc marks output,
commands and code that needs more than one CPU process that way, and says which test covers it.
The blocks must leave no process group and no forced path behind.
"""

from __future__ import annotations

import dataclasses
import re
import textwrap
import traceback
import warnings
from pathlib import Path

import pytest
import torch

from torchmatgrad import policy

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^\s*(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`\s]*)")


def _closes(line: str, fence: str) -> bool:
    """Whether ``line`` closes a block opened by ``fence``: the same character, at least as many,
    nothing else."""
    s = line.strip()
    return len(s) >= len(fence) and set(s) == {fence[0]}


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line of the block's first code line, 0-based; code) of each ```python block."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        fence, start = opening["fence"], i + 1
        i = start
        while i < len(lines) and not _closes(lines[i], fence):
            i += 1
        if opening["info"].lower() == "python":
            blocks.append((start, textwrap.dedent("\n".join(lines[start:i])) + "\n"))
        i += 1  # past the closing fence
    return blocks


@dataclasses.dataclass(frozen=True)
class Expect:
    """What a doc's blocks must do beyond running: how many there are at least, the optional
    libraries they need (skipped without them), a string their output must contain."""

    min_blocks: int = 1
    needs: tuple[str, ...] = ()
    prints: str | None = None


EXPECT = {
    "curvature.md": Expect(min_blocks=5, needs=("laplace",), prints="loss"),
    "per_sample.md": Expect(needs=("opacus",)),
}


def _run(doc: Path, start: int, code: str, namespace: dict) -> str | None:
    """Run one block; None, or what failed, with the doc's own line numbers (the code is padded
    with blank lines to its place in the file)."""
    try:
        exec(compile("\n" * start + code, str(doc), "exec"), namespace)
    except Exception:
        where = f"{doc.relative_to(ROOT)}, the block from line {start + 1}"
        return f"{where}:\n{traceback.format_exc()}"
    return None


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _left_behind() -> list[str]:
    left = ["a process group (destroy_process_group at the end)"] if _distributed() else []
    if policy.current_path() != "auto":
        left.append(f"the path forced to {policy.current_path()!r}")
    return left


def _clean_up() -> None:
    if _distributed():
        torch.distributed.destroy_process_group()
    if policy.current_path() != "auto":
        policy._set_forced("auto")


RUNNABLE = [doc for doc in DOCS if python_blocks(doc.read_text(encoding="utf-8"))]


@pytest.mark.parametrize("doc", RUNNABLE, ids=lambda p: str(p.relative_to(ROOT)))
def test_doc_blocks_run(doc, capsys, monkeypatch, tmp_path):
    expect = EXPECT.get(doc.name, Expect())
    for name in expect.needs:
        pytest.importorskip(name)
    blocks = python_blocks(doc.read_text(encoding="utf-8"))
    assert len(blocks) >= expect.min_blocks, f"{doc.name}: {len(blocks)} python blocks"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"doc:{doc.name}"}
    failed = None
    try:
        with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
            warnings.simplefilter("ignore")
            for start, code in blocks:
                failed = _run(doc, start, code, namespace)
                if failed:
                    break
        left = _left_behind()
    finally:
        _clean_up()  # whatever a failing block left, the next tests must not see it
    if failed:
        pytest.fail(failed, pytrace=False)
    assert not left, f"{doc.name} leaves {' and '.join(left)} behind"
    if expect.prints is not None:
        assert expect.prints in capsys.readouterr().out


def test_python_blocks_are_found():
    text = textwrap.dedent(
        """\
        ```python
        a = 1
        ```
        ```bash
        not python
        ```
          ```python
          b = a + 1
          ```
        ````text
        ```python
        inside a text block
        ```
        ````
        ```Python
        c = b
        ```
        """
    )
    assert python_blocks(text) == [(1, "a = 1\n"), (7, "b = a + 1\n"), (15, "c = b\n")]


def test_the_docs_are_collected():
    """The docs known to hold python blocks are among those run (a renamed or mistagged doc would
    otherwise drop out silently)."""
    known = {
        "README.md",
        "curvature.md",
        "derivative.md",
        "distributed.md",
        "per_sample.md",
        "performance.md",
    }
    names = {doc.name for doc in RUNNABLE}
    assert known <= names, names
