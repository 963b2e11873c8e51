"""Opacus integration: torchmatgrad's kernels inside Opacus, and Opacus's accounting around
torchmatgrad's one-backward clipping. Opacus stays optional: nothing here imports it until it is
used or imported by the program.

* **Samplers.** Opacus looks up per-sample gradient functions by the exact type of a module, so
  a converted model (``torchmatgrad.nn.Linear``, a subclass of ``nn.Linear``) would fall back to
  Opacus's generic functorch path. :func:`register` gives Opacus a grad sampler (per-sample
  weight gradients by ``torchmatgrad::per_sample_grads``, for ``grad_sample_mode="hooks"``) and a
  norm sampler (per-sample norms by ``torchmatgrad::per_sample_grad_norms``, ghost or direct,
  for ``grad_sample_mode="ghost"``). ``import torchmatgrad`` registers them as soon as Opacus is
  imported (an import hook; nothing is imported early), so
  ``PrivacyEngine().make_private(..., grad_sample_mode="ghost" | "hooks")`` on a converted model
  runs torchmatgrad's kernels with no extra call.
* **One backward.** Opacus's ghost clipping runs two backward passes and hooks hold every
  layer's activations and gradients anyway. :func:`make_private` sets up Opacus's Poisson data
  loader, a ``DPOptimizerFastGradientClipping`` (it adds the noise, averages and calls the
  accountant from ``optimizer.step()``) and the engine's accountant, and leaves the model to
  :func:`torchmatgrad.per_sample.clipped_backward`, which clips in one backward::

      engine = PrivacyEngine()
      model, optimizer, loader = torchmatgrad.opacus_support.make_private(
          engine, module=model, optimizer=optimizer, data_loader=loader,
          noise_multiplier=1.1, max_grad_norm=1.0)
      for x, y in loader:
          optimizer.zero_grad(set_to_none=True)
          loss = F.cross_entropy(model(x), y, reduction="none")
          per_sample.clipped_backward(model, loss, max_norm=1.0)   # noise: the optimizer's
          optimizer.step()
      engine.get_epsilon(delta=1e-5)
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import per_sample
from ._import_hooks import call_now_or_after_import
from .nn import Linear

__all__ = ["make_private", "register"]

_ops = torch.ops.torchmatgrad
_OPACUS = "opacus"


def _check_input(activations, backprops: Tensor) -> Tensor:
    x = activations[0]
    return x.to(backprops.dtype) if x.dtype != backprops.dtype else x


def compute_linear_grad_sample(layer: Linear, activations, backprops: Tensor) -> dict:
    """Opacus grad sampler of ``torchmatgrad.nn.Linear``: per-sample gradients [B, n, m] of the
    weight by torchmatgrad's kernel, [B, n] of the bias (samples on dim 0, as Opacus passes
    them)."""
    x = _check_input(activations, backprops)
    out = {}
    if layer.weight.requires_grad:
        out[layer.weight] = _ops.per_sample_grads(backprops, x)
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = per_sample.rows_sum(backprops).to(backprops.dtype)
    return out


def compute_linear_norm_sample(layer: Linear, activations, backprops: Tensor) -> dict:
    """Opacus norm sampler of ``torchmatgrad.nn.Linear`` (ghost clipping): each sample's
    gradient norm of the weight by ``per_sample_grad_norms`` (ghost or direct, whichever is
    cheaper for the layer) and of the bias, in backprops' dtype."""
    x = _check_input(activations, backprops)
    out = {}
    if layer.weight.requires_grad:
        sq = _ops.per_sample_grad_norms(backprops, x, False, "auto")
        out[layer.weight] = sq.sqrt().to(backprops.dtype)
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = per_sample.rows_sum(backprops).norm(dim=1).to(backprops.dtype)
    return out


def register() -> bool:
    """Register the samplers with Opacus (imports it). Returns False when Opacus is not
    installed; registering twice is harmless."""
    try:
        from opacus.grad_sample.utils import register_grad_sampler, register_norm_sampler
    except ImportError:
        return False
    register_grad_sampler(Linear)(compute_linear_grad_sample)
    register_norm_sampler(Linear)(compute_linear_norm_sample)
    return True


def make_private(
    engine,
    *,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader,
    noise_multiplier: float,
    max_grad_norm: float,
    loss_reduction: str = "mean",
    poisson_sampling: bool = True,
    noise_generator: torch.Generator | None = None,
):
    """Opacus's privacy machinery around :func:`torchmatgrad.per_sample.clipped_backward`.

    Args:
        engine: an ``opacus.PrivacyEngine``; its accountant records every optimizer step.
        module: the model (converted with ``convert_linear``); it is not wrapped, only
            :func:`torchmatgrad.per_sample.enable`\\ d.
        optimizer, data_loader: as for ``PrivacyEngine.make_private``.
        noise_multiplier, max_grad_norm: σ and C; call ``clipped_backward(model, loss, C)``
            with the same C and no noise (the optimizer adds N(0, (σC)²), with Opacus's
            generator and secure mode).
        loss_reduction: "mean" (the optimizer divides by the expected batch size) or "sum".
        poisson_sampling: replace the loader by Opacus's Poisson-sampling loader (what the
            accountant assumes).
        noise_generator: the optimizer's source of noise (in secure mode: the engine's own
            cryptographically secure one, as ``PrivacyEngine.make_private`` does).

    Returns:
        (module, optimizer, data_loader).
    """
    from opacus.data_loader import DPDataLoader
    from opacus.optimizers import DPOptimizerFastGradientClipping

    params = {p for p in module.parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p not in params:
                raise ValueError("Module parameters are different than optimizer Parameters")
    per_sample.enable(module)
    if poisson_sampling:
        data_loader = DPDataLoader.from_data_loader(data_loader, distributed=False)
    sample_rate = 1 / len(data_loader)
    expected_batch_size = int(len(data_loader.dataset) * sample_rate)
    dp_optimizer = DPOptimizerFastGradientClipping(
        optimizer,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size,
        loss_reduction=loss_reduction,
        generator=engine.secure_rng if engine.secure_mode else noise_generator,
        secure_mode=engine.secure_mode,
    )
    dp_optimizer.attach_step_hook(engine.accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
    return module, dp_optimizer, data_loader


# ---- registration on import of opacus -------------------------------------------------------


def _register_quietly() -> None:
    try:
        register()
    except Exception as e:  # an Opacus whose registry moved: say so, keep going
        import warnings

        warnings.warn(
            f"torchmatgrad: could not register the Opacus samplers ({e!r}); Opacus will use "
            "its generic per-sample gradients for torchmatgrad.nn.Linear",
            stacklevel=2,
        )


def _register_now_or_on_import() -> None:
    call_now_or_after_import(_OPACUS, _register_quietly)


_register_now_or_on_import()
