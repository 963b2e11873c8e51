"""torchmatgrad.per_sample's grad_norms / clipped_backward against torch.func.vmap(grad)
per-sample gradients, and against the definition (one backward per sample).

References are float64 from the same input values; tolerances are the policy's
(torchmatgrad.testing), with k the longest chain of sums behind a result. The CUDA cases carry
the cuda marker (conftest.DEVICES) and run in the GPU check. The ops themselves are in
test_per_sample_ops.py, bad inputs in test_per_sample_errors.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from _per_sample_models import _loss, _mlp
from conftest import DEVICES

import torchmatgrad
from torchmatgrad import per_sample
from torchmatgrad.testing import assert_close, rand

# ---- grad_norms / clipped_backward against vmap(grad) -------------------------------------


def _reference(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Per-sample gradients of every trainable parameter by torch.func.vmap(grad), float64."""
    ref = {k: v.detach().double() for k, v in model.named_parameters() if v.requires_grad}
    frozen = {k: v.detach().double() for k, v in model.named_parameters() if not v.requires_grad}
    model64 = _double_copy(model)

    def loss(params, xi, yi):
        out = torch.func.functional_call(model64, {**params, **frozen}, (xi.unsqueeze(0),))
        return _loss(out, yi.unsqueeze(0)).sum()

    return torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(ref, x.double(), y.double())


def _double_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A float64 copy without the recording hooks (the model keeps its own)."""
    import copy

    enabled = hasattr(model, "_torchmatgrad_per_sample_hooks")
    per_sample.disable(model)
    m = copy.deepcopy(model).double()
    if enabled:
        per_sample.enable(model)
    return m


def _norms(per: dict, B: int) -> torch.Tensor:
    return torch.sqrt(sum(v.reshape(B, -1).square().sum(1) for v in per.values()))


CASES = [
    pytest.param((5,), True, id="2d-bias"),
    pytest.param((5,), False, id="2d-nobias"),
    pytest.param((5, 3), True, id="3d-bias"),
    pytest.param((4, 2, 3), False, id="4d-nobias"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("batch,bias", CASES)
def test_grad_norms_and_clipped_backward(device, dtype, batch, bias):
    model = per_sample.enable(torchmatgrad.nn.convert_linear(_mlp(bias, dtype, device)))
    x = rand(*batch, 6, device=device, dtype=dtype, seed=30)
    y = rand(*batch, 4, device=device, dtype=dtype, seed=31)
    B = batch[0]
    per = _reference(model, x, y)
    ref_norms = _norms(per, B)
    k = math.prod(batch[1:]) * 81 * 3  # rows per sample × the largest layer × depth
    norms = per_sample.grad_norms(model, _loss(model(x), y))
    assert norms.dtype == dtype
    assert_close(norms, ref_norms, k=k, what="per-sample norms")
    assert all(p.grad is None for p in model.parameters()), "grad_norms left .grad alone"

    C = ref_norms.median().item()  # clips about half of the samples
    clip = (C / (ref_norms + 1e-6)).clamp(max=1.0)
    got = per_sample.clipped_backward(model, _loss(model(x), y), C)
    assert_close(got, ref_norms, k=k, what="returned norms")
    for name, p in model.named_parameters():
        ref = torch.einsum("b,b...->...", clip, per[name])
        assert_close(p.grad, ref, k=k * B, what=f"clipped {name}")


@pytest.mark.parametrize("device", DEVICES)
def test_clipped_backward_accumulates(device):
    model = per_sample.enable(torchmatgrad.nn.convert_linear(_mlp(True, torch.float64, device)))
    x, y = rand(4, 6, device=device, dtype=torch.float64, seed=32), rand(4, 4, seed=33).double()
    y = y.to(device)
    before = {}
    for name, p in model.named_parameters():
        p.grad = rand(*p.shape, device=device, dtype=p.dtype, seed=len(before))
        before[name] = p.grad.clone()
    grads = {name: p.grad for name, p in model.named_parameters()}
    per = _reference(model, x, y)
    C = 0.5
    clip = (C / (_norms(per, 4) + 1e-6)).clamp(max=1.0)
    per_sample.clipped_backward(model, _loss(model(x), y), C)
    for name, p in model.named_parameters():
        assert p.grad is grads[name], "accumulated in place, as autograd does"
        ref = before[name].double() + torch.einsum("b,b...->...", clip, per[name])
        assert_close(p.grad, ref, k=200, what=f"accumulated {name}")


@pytest.mark.parametrize("device", DEVICES)
def test_other_leaf_modules_are_exact(device):
    """LayerNorm's parameters (not a linear layer): per-sample gradients through torch.func."""
    model = _mlp(True, torch.float64, device, layernorm=True)
    model = per_sample.enable(torchmatgrad.nn.convert_linear(model))
    x = rand(3, 5, 6, device=device, dtype=torch.float64, seed=34)
    y = rand(3, 5, 4, device=device, dtype=torch.float64, seed=35)
    per = _reference(model, x, y)
    ref_norms = _norms(per, 3)
    C = ref_norms.min().item()
    got = per_sample.clipped_backward(model, _loss(model(x), y), C)
    assert_close(got, ref_norms, k=500, what="norms with LayerNorm")
    clip = (C / (ref_norms + 1e-6)).clamp(max=1.0)
    for name, p in model.named_parameters():
        assert_close(p.grad, torch.einsum("b,b...->...", clip, per[name]), k=500, what=name)


def test_embedding_and_unconverted_linear_are_exact():
    """Other leaf modules with parameters, integer inputs included, through torch.func."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Embedding(11, 6),
        torchmatgrad.nn.Linear(6, 7),
        torch.nn.Tanh(),
        torch.nn.Linear(7, 4),  # not converted
    ).double()
    per_sample.enable(model)
    idx = torch.randint(0, 11, (5, 3), generator=torch.Generator().manual_seed(44))
    y = rand(5, 3, 4, dtype=torch.float64, seed=45)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_i(p, xi, yi):
        out = torch.func.functional_call(model, p, (xi.unsqueeze(0),))
        return _loss(out, yi.unsqueeze(0)).sum()

    per_sample.disable(model)
    per = torch.func.vmap(torch.func.grad(loss_i), in_dims=(None, 0, 0))(params, idx, y)
    per_sample.enable(model)
    ref_norms = _norms(per, 5)
    C = ref_norms.median().item()
    got = per_sample.clipped_backward(model, _loss(model(idx), y), C)
    assert_close(got, ref_norms, k=100, what="norms with Embedding and nn.Linear")
    clip = (C / (ref_norms + 1e-6)).clamp(max=1.0)
    for name, p in model.named_parameters():
        assert_close(p.grad, torch.einsum("b,b...->...", clip, per[name]), k=100, what=name)


def test_frozen_parameters_and_bias_only_layers():
    model = per_sample.enable(torchmatgrad.nn.convert_linear(_mlp(True, torch.float64, "cpu")))
    model[0].weight.requires_grad_(False)  # first layer: bias only
    model[2].requires_grad_(False)  # middle layer frozen
    x, y = rand(5, 6, dtype=torch.float64, seed=36), rand(5, 4, dtype=torch.float64, seed=37)
    per = _reference(model, x, y)
    ref_norms = _norms(per, 5)
    assert_close(per_sample.grad_norms(model, _loss(model(x), y)), ref_norms, k=300)
    C = ref_norms.median().item()
    per_sample.clipped_backward(model, _loss(model(x), y), C)
    clip = (C / (ref_norms + 1e-6)).clamp(max=1.0)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert_close(p.grad, torch.einsum("b,b...->...", clip, per[name]), k=300, what=name)
        else:
            assert p.grad is None


@pytest.mark.parametrize("device", DEVICES)
def test_noise(device):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Tanh(), torch.nn.Linear(96, 64))
    model = per_sample.enable(torchmatgrad.nn.convert_linear(model.to(device)))
    x, y = rand(8, 64, device=device, seed=38), rand(8, 64, device=device, seed=39)
    C, sigma = 0.7, 1.3

    def step(noise, seed):
        model.zero_grad(set_to_none=True)
        gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        per_sample.clipped_backward(
            model, _loss(model(x), y), C, noise_multiplier=noise, generator=gen
        )
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    clean = step(0.0, None)
    noisy, again, other = step(sigma, 1), step(sigma, 1), step(sigma, 2)
    assert torch.equal(noisy, again), "same generator state: same noise"
    assert not torch.equal(noisy, other)
    noise = (noisy - clean).double()
    N = noise.numel()  # 12 k entries: the sample std is within 5 of its own std errors
    std = sigma * C
    assert abs(noise.mean().item()) < 5 * std / math.sqrt(N)
    assert abs(noise.std().item() / std - 1) < 5 / math.sqrt(2 * N)
    # Noise also goes into an existing .grad, on top of what is there.
    model.zero_grad(set_to_none=False)
    gen = torch.Generator(device=device).manual_seed(1)
    per_sample.clipped_backward(model, _loss(model(x), y), C, noise_multiplier=sigma, generator=gen)
    assert_close(torch.cat([p.grad.flatten() for p in model.parameters()]), noisy.double(), k=16)


def test_empty_batch_adds_noise_only():
    model = per_sample.enable(torchmatgrad.nn.convert_linear(_mlp(True, torch.float32, "cpu")))
    x, y = rand(0, 6), rand(0, 4)
    norms = per_sample.clipped_backward(model, _loss(model(x), y), 1.0, noise_multiplier=0.0)
    assert norms.shape == (0,)
    assert all(torch.all(p.grad == 0) for p in model.parameters())
    model.zero_grad(set_to_none=True)
    per_sample.clipped_backward(model, _loss(model(x), y), 1.0, noise_multiplier=1.0)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.filterwarnings("ignore:torchmatgrad. fused gradient accumulation is off")
def test_inputs_that_are_views_and_fused_layers():
    """A non-contiguous model input, and layers with fused gradient accumulation."""
    model = torchmatgrad.nn.convert_linear(
        _mlp(True, torch.float64, "cpu"), grad_accumulation="fused"
    )
    per_sample.enable(model)
    x = rand(6, 5, dtype=torch.float64, seed=40).t()  # [5, 6], non-contiguous
    y = rand(5, 4, dtype=torch.float64, seed=41)
    per = _reference(model, x.contiguous(), y)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    per_sample.clipped_backward(model, _loss(model(x), y), 1e9)  # no clipping: the plain sum
    for name, p in model.named_parameters():
        assert_close(p.grad, per[name].sum(0), k=300, what=name)


def test_inputs_that_require_grad_get_none():
    """DP-SGD needs the parameters' gradients only: an input that requires grad is left alone
    (as torch.autograd.grad leaves it), the parameters' gradients are unchanged by it."""
    model = per_sample.enable(torchmatgrad.nn.convert_linear(_mlp(True, torch.float64, "cpu")))
    x = rand(4, 6, dtype=torch.float64, seed=49)
    y = rand(4, 4, dtype=torch.float64, seed=50)
    per_sample.clipped_backward(model, _loss(model(x), y), 0.5)
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    xg = x.clone().requires_grad_()
    per_sample.clipped_backward(model, _loss(model(xg), y), 0.5)
    assert xg.grad is None
    for p, e in zip(model.parameters(), expected, strict=True):
        assert torch.equal(p.grad, e)
    outside = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"'<a parameter of shape \[4\] outside the model>'"):
        per_sample.grad_norms(model, _loss(model(x) * outside, y))


def test_no_state_left_behind():
    model = per_sample.enable(torchmatgrad.nn.convert_linear(_mlp(True, torch.float32, "cpu")))
    x, y = rand(4, 6, seed=42), rand(4, 4, seed=43)
    out = model(x)
    loss = _loss(out, y)
    node = out.grad_fn.next_functions[0][0]  # the last Linear's output node, under the loss
    recorded = [n for n in _nodes(loss.grad_fn) if "torchmatgrad.per_sample" in n.metadata]
    assert len(recorded) == 3
    per_sample.clipped_backward(model, loss, 1.0)
    assert not any("torchmatgrad.per_sample" in n.metadata for n in _nodes(loss.grad_fn))
    del node
    hooks = sum(len(m._forward_hooks) for m in model.modules())
    assert hooks == 3
    per_sample.disable(model)
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0
    with torch.no_grad():  # nothing recorded without a graph
        per_sample.enable(model)(x)


def _nodes(root):
    seen, todo = {root}, [root]
    while todo:
        node = todo.pop()
        yield node
        for nxt, _ in node.next_functions:
            if nxt is not None and nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)


# ---- against the definition: one backward per sample ----------------------------------


def loop_reference(model, loss, max_norm):
    """The definition: each sample's gradient by its own backward, its norm over every
    parameter, and Σ_i min(1, C / (‖∇_i‖ + 1e-6))·∇_i, in the parameters' dtype."""
    params = [p for p in model.parameters() if p.requires_grad]
    per = [
        torch.autograd.grad(loss[i], params, retain_graph=True, allow_unused=True)
        for i in range(loss.shape[0])
    ]
    per = [
        [torch.zeros_like(p) if g is None else g for g, p in zip(gs, params, strict=True)]
        for gs in per
    ]
    norms = torch.stack([torch.cat([g.flatten() for g in gs]).norm() for gs in per])
    clip = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    summed = [sum(c * gs[k] for c, gs in zip(clip, per, strict=True)) for k in range(len(params))]
    return norms, dict(zip(params, summed, strict=True))


def check_against_loop(model, forward, tol=1e-9):
    """clipped_backward and grad_norms on ``model`` (float64) against loop_reference, with the
    clipping bound between the samples' norms (some clipped, some not)."""
    per_sample.enable(model)
    ref_norms, _ = loop_reference(model, forward(), 1.0)
    max_norm = ref_norms.median().item() * 1.01
    ref_norms, ref = loop_reference(model, forward(), max_norm)
    got_norms = per_sample.grad_norms(model, forward())
    model.zero_grad(set_to_none=True)
    clipped = per_sample.clipped_backward(model, forward(), max_norm)
    for norms in (got_norms, clipped):
        assert ((norms - ref_norms).abs() <= tol * ref_norms.abs().max()).all(), (norms, ref_norms)
    names = {p: n for n, p in model.named_parameters()}
    for p, want in ref.items():
        err = (p.grad - want).abs().max() / want.abs().max().clamp_min(1e-300)
        assert err <= tol, f"{names[p]}: relative error {err:.3g}"
    return ref_norms


def test_module_called_twice_and_tied_embedding_head():
    torch.manual_seed(0)
    lin = torchmatgrad.nn.Linear(5, 5).double()
    model = torch.nn.Sequential(lin, torch.nn.Tanh(), lin)
    x, y = rand(3, 5, dtype=torch.float64), rand(3, 5, dtype=torch.float64)
    check_against_loop(model, lambda: _loss(model(x), y))

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(7, 5, padding_idx=0)
            self.pos = torch.nn.Embedding(3, 5)
            self.head = torchmatgrad.nn.Linear(5, 7, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, idx):
            pos = self.pos(torch.arange(idx.shape[1]).unsqueeze(0))  # [1, T]: shared
            h = torch.tanh(self.emb(idx) + pos)
            return self.head(h * self.emb(idx[:, :1]))  # the embedding called twice

    torch.manual_seed(1)
    model = Tied().double()
    idx = torch.tensor([[1, 2, 2], [3, 0, 1], [6, 6, 6], [2, 5, 4]])
    y = rand(4, 3, 7, dtype=torch.float64)
    check_against_loop(model, lambda: _loss(model(idx), y))
