"""python -m torchmatgrad info | check | explain | bench (the commands live in torchmatgrad.cli)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
