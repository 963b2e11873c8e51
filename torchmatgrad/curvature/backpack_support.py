"""BackPACK for torchmatgrad.nn.Linear.

BackPACK finds a module's extension by its exact class (``module_exts[module.__class__]``), so
a converted model fails with "does not have an extension for Module torchmatgrad.nn.Linear"
although our layer is an ``nn.Linear`` (same parameters, same forward). :func:`register` wraps
``BackpropExtension.__init__`` once: every BackPACK extension constructed afterwards that
supports ``nn.Linear`` maps torchmatgrad.nn.Linear to the same module extension (through
BackPACK's ``set_module_extension``). ``import torchmatgrad.curvature`` registers when BackPACK
is already imported and otherwise as soon as it is (an import hook: BackPACK stays optional
and is not imported early). :func:`extend` does it for one extension object made before.
"""

from __future__ import annotations

import functools

from .._import_hooks import call_now_or_after_import
from ..nn import Linear

_BACKPACK = "backpack"
_MARK = "_torchmatgrad_registered"


def extend(extension):
    """Map torchmatgrad.nn.Linear to ``extension``'s ``nn.Linear`` handler; returns it."""
    import torch

    table = getattr(extension, "_BackpropExtension__module_extensions", None)
    if table is not None and torch.nn.Linear in table and Linear not in table:
        extension.set_module_extension(Linear, table[torch.nn.Linear])
    return extension


def register() -> bool:
    """Make every BackPACK extension constructed from now on accept torchmatgrad.nn.Linear.
    Returns False when BackPACK is not installed."""
    try:
        from backpack.extensions.backprop_extension import BackpropExtension
    except ImportError:
        return False
    init = BackpropExtension.__init__
    if getattr(init, _MARK, False):
        return True

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        extend(self)

    setattr(__init__, _MARK, True)
    BackpropExtension.__init__ = __init__
    return True


def register_now_or_on_import() -> None:
    call_now_or_after_import(_BACKPACK, register)
