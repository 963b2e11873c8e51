"""The command-line tools: ``python -m torchmatgrad <command>``, one per entry of COMMANDS.

Each command is a module (``bench`` a package) with a ``build_parser()`` (its options, built
without running anything: :mod:`.docs` renders them into docs/cli.md) and a ``main(argv) -> int``;
:func:`main` dispatches to it and is what ``torchmatgrad/__main__.py`` calls. A command's module
is imported only when it runs, so ``python -m torchmatgrad info`` does not pay for the benchmark's
imports.
"""

from __future__ import annotations

import sys

COMMANDS = {
    "info": "versions, compiled kernels, devices and dispatch paths",
    "check": "check every op on every device against autograd (--transforms: conformance matrix)",
    "explain": "print the derivative of W·x for a small example, checked against autograd",
    "bench": "benchmark against torch (--quick for a one-minute run)",
    "tune": "measure which path (kernel or vendor) is faster here; write the policy cache",
    "results": "tables of the stored benchmark results per machine kind (--write: the README's)",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: python -m torchmatgrad {" + ",".join(COMMANDS) + "} [options]\n")
        for name, what in COMMANDS.items():
            print(f"  {name:8s} {what}")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nerror: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "check":
        from .check import main as run
    elif command == "info":
        from .info import main as run
    elif command == "explain":
        from .explain import main as run
    elif command == "tune":
        from .tune import main as run
    elif command == "results":
        from .results import main as run
    else:
        from .bench import main as run
    return run(rest)
