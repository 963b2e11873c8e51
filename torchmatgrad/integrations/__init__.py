"""Conversions of outside libraries' linear-like modules, one module per library.

Each library's module is imported only when that library is already loaded (a model that holds
one of its layers has imported it), so nothing here imports an optional dependency: a program
without transformers never pays for it, and one with it never loads it early.

* :mod:`torchmatgrad.integrations.transformers`: Hugging Face's ``Conv1D`` (GPT-2, GPT, ...).
"""

from __future__ import annotations

import sys

import torch

__all__ = ["convert_module"]


def convert_module(module: torch.nn.Module, *, grad_accumulation: str = "unfused"):
    """The torchmatgrad replacement of ``module`` when an integration converts its type (sharing
    its parameters), else None. Called by :func:`torchmatgrad.nn.convert_linear` for every module
    that is not an ``nn.Linear``."""
    if "transformers.pytorch_utils" in sys.modules:
        from . import transformers as _hf

        new = _hf.convert(module, grad_accumulation=grad_accumulation)
        if new is not None:
            return new
    return None
