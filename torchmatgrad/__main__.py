"""python -m torchmatgrad info | check | explain | bench"""

from __future__ import annotations

import sys

COMMANDS = {
    "info": "versions, compiled kernels, devices and dispatch paths",
    "check": "check every op on every device against autograd (--transforms: conformance matrix)",
    "explain": "print the derivative of W·x for a small example, checked against autograd",
    "bench": "benchmark against torch (--quick for a one-minute run)",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: python -m torchmatgrad {info,check,explain,bench} [options]\n")
        for name, what in COMMANDS.items():
            print(f"  {name:8s} {what}")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nerror: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "check":
        from .cli.check import main as run
    elif command == "info":
        from .cli.info import main as run
    elif command == "explain":
        from .cli.explain import main as run
    else:
        from .cli.bench import main as run
    return run(rest)


if __name__ == "__main__":
    sys.exit(main())
