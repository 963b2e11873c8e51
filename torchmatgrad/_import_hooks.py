"""Run a registration right after an optional library is imported, without importing it.

The peers torchmatgrad registers itself with (Opacus samplers, BackPACK extensions, DTensor
sharding rules) must not be imported by ``import torchmatgrad``: they are optional, and some are
slow to import. Each is registered now if it is already imported, else by a one-shot finder at
the front of ``sys.meta_path`` that lets the other finders find the module and runs the
registration right after the module's own code.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class _RunAfterImport:
    def __init__(self, name: str, fn: Callable[[], None]) -> None:
        self.name, self.fn = name, fn

    def find_spec(self, name, path, target=None):
        if name != self.name:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(name, path, target) if find is not None else None
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is not None and hasattr(loader, "exec_module"):
            run, fn = loader.exec_module, self.fn

            def exec_module(module):
                run(module)
                fn()

            loader.exec_module = exec_module
        return spec


def call_now_or_after_import(
    name: str, fn: Callable[[], None], *, loaded: Callable[[], bool] | None = None
) -> None:
    """``fn()`` now if module ``name`` is imported (``loaded()`` says so, if given), else right
    after it is; at most one pending hook per ``name``."""
    done = loaded() if loaded is not None else name in sys.modules
    if done:
        fn()
    elif not any(isinstance(f, _RunAfterImport) and f.name == name for f in sys.meta_path):
        sys.meta_path.insert(0, _RunAfterImport(name, fn))
