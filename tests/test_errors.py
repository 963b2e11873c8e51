"""Bad input: a clear error naming the argument and the shapes, and nothing modified.

One table of bad inputs for every op. Each runs through the real op on every device (the C++
checks of csrc/ops.h) and under FakeTensorMode (the fake kernels, i.e. the Python mirror in
torchmatgrad/ops/_checks.py, what torch.compile traces with), and both must raise the same exception
type with the same message, byte for byte: the fake kernels cannot drift from C++ again.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from conftest import DEVICES

import torchmatgrad
from torchmatgrad import _compat
from torchmatgrad.ops import scalar_type_name
from torchmatgrad.testing import rand

ops = torch.ops.torchmatgrad

# A device other than the case's: on a CPU-only machine only "meta" exists (whose kernel is the
# fake one), so the real C++ device check runs with a GPU (cuda against cpu tensors).
OTHER = {"cpu": "meta", "cuda": "cpu"}
MASK3, MASK2 = [True, True, True], [True, True]


@dataclass
class Case:
    """``make(device, other)`` returns the op's arguments; the error must match ``match``."""

    op: str
    name: str
    make: Callable[[str, str], tuple]
    match: str


def _r(*shape, device, dtype=torch.float32):
    return rand(*shape, device=device, dtype=dtype)


def _lin(x, w, b=None):
    return lambda d, o: (x(d, o), w(d, o), None if b is None else b(d, o))


X35 = lambda d, o: _r(3, 5, device=d)
W45 = lambda d, o: _r(4, 5, device=d)
G34 = lambda d, o: _r(3, 4, device=d)

LINEAR = [
    ("weight rank", _lin(X35, lambda d, o: _r(5, device=d)), r"weight must be 2-D .*\[5\]"),
    ("input rank", _lin(lambda d, o: _r((), device=d), W45), r"input must have at least 1 dim"),
    (
        "in_features",
        _lin(lambda d, o: _r(3, 6, device=d), W45),
        r"input.size\(-1\) must equal weight.size\(1\).*\[3, 6\].*\[4, 5\]",
    ),
    (
        "bias length",
        _lin(X35, W45, lambda d, o: _r(3, device=d)),
        r"bias must be 1-D of length .*4.*\[3\]",
    ),
    ("bias rank", _lin(X35, W45, lambda d, o: _r(4, 1, device=d)), r"bias must be 1-D .*\[4, 1\]"),
    (
        "mixed dtypes",
        _lin(lambda d, o: _r(3, 5, device=d, dtype=torch.float64), W45),
        r"input and weight must have the same dtype, got input Double and weight Float",
    ),
    (
        "bias dtype",
        _lin(X35, W45, lambda d, o: _r(4, device=d, dtype=torch.float64)),
        r"bias must have the same dtype as weight, got bias Double and weight Float",
    ),
    (
        "integer tensors",
        lambda d, o: (
            torch.ones(3, 5, dtype=torch.long, device=d),
            torch.ones(4, 5, dtype=torch.long, device=d),
            None,
        ),
        r"weight must be a floating point tensor .*, got Long",
    ),
    (
        "mixed devices",
        _lin(lambda d, o: _r(3, 5, device=o), W45),
        r"input and weight must be on the same device",
    ),
    (
        "bias device",
        _lin(X35, W45, lambda d, o: _r(4, device=o)),
        r"bias must be on the same device as weight",
    ),
]


def _bwd(g, x=X35, w=W45):
    return lambda d, o: (g(d, o), x(d, o), w(d, o), MASK3)


BACKWARD = [
    ("weight rank", _bwd(G34, w=lambda d, o: _r(5, device=d)), r"weight must be 2-D .*\[5\]"),
    ("in_features", _bwd(G34, x=lambda d, o: _r(3, 6, device=d)), r"input.size\(-1\) must equal"),
    (
        "input dtype",
        _bwd(G34, x=lambda d, o: _r(3, 5, device=d, dtype=torch.float16)),
        r"input and weight must have the same dtype, got input Half and weight Float",
    ),
    (
        "grad_output shape",
        _bwd(lambda d, o: _r(3, 5, device=d)),
        r"grad_output must have shape \[3, 4\].*\[3, 5\]",
    ),
    (
        "grad_output batch shape",
        _bwd(lambda d, o: _r(2, 3, 4, device=d)),
        r"grad_output must have shape \[3, 4\] \(input's batch shape, out_features\), "
        r"got \[2, 3, 4\]",
    ),
    (
        "grad_output dtype",
        _bwd(lambda d, o: _r(3, 4, device=d, dtype=torch.float64)),
        "grad_output must have the same dtype",
    ),
    (
        "grad_output device",
        _bwd(lambda d, o: _r(3, 4, device=o)),
        "grad_output must be on the same device as weight",
    ),
]


def _acc(buf, w=W45, g=G34):
    return lambda d, o: (g(d, o), X35(d, o), w(d, o), buf(d, o), MASK2)


W45_BF16 = lambda d, o: _r(4, 5, device=d, dtype=torch.bfloat16)
G34_BF16 = lambda d, o: _r(3, 4, device=d, dtype=torch.bfloat16)
X35_BF16 = lambda d, o: _r(3, 5, device=d, dtype=torch.bfloat16)

ACCUMULATE = [
    ("grad_output shape", _acc(W45, g=lambda d, o: _r(3, 5, device=d)), r"grad_output must have"),
    (
        "buffer shape",
        _acc(lambda d, o: _r(5, 4, device=d)),
        r"grad_weight must have weight's shape",
    ),
    (
        "buffer dtype",
        _acc(lambda d, o: _r(4, 5, device=d, dtype=torch.float64)),
        r"grad_weight must have weight's dtype \(Float, or float32 for a 16-bit weight\), "
        r"got Double",
    ),
    (
        "fp16 buffer for a bf16 weight",
        lambda d, o: (
            G34_BF16(d, o),
            X35_BF16(d, o),
            W45_BF16(d, o),
            _r(4, 5, device=d, dtype=torch.float16),
            MASK2,
        ),
        r"grad_weight must have weight's dtype \(BFloat16, or float32 .*\), got Half",
    ),
    (
        "buffer device",
        _acc(lambda d, o: _r(4, 5, device=o)),
        r"grad_weight must be on the same dev",
    ),
    (
        "non-contiguous buffer",
        _acc(lambda d, o: _r(5, 4, device=d).t()),
        r"grad_weight must be contiguous, got strides \[1, 4\]",
    ),
]

# ---- per-sample ops (csrc/per_sample.h, torchmatgrad/per_sample.py) -------------------------

X235 = lambda d, o: _r(2, 3, 5, device=d)
G234 = lambda d, o: _r(2, 3, 4, device=d)
S2 = lambda d, o: _r(2, device=d)


def _norms(g=G234, x=X235, method="auto"):
    return lambda d, o: (g(d, o), x(d, o), True, method)


PER_SAMPLE = [  # (name, (grad_output, input) makers, match): every per-sample op checks these
    (
        "input rank",
        (lambda d, o: _r(4, device=d), lambda d, o: _r(5, device=d)),
        r"input must "
        r"have at least 2 dimensions \(samples, ..., in_features\), got shape \[5\]",
    ),
    (
        "batch shape",
        (lambda d, o: _r(2, 4, 4, device=d), X235),
        r"grad_output must have input's batch shape .*got grad_output of shape \[2, 4, 4\] and "
        r"input of shape \[2, 3, 5\]",
    ),
    ("rank", (lambda d, o: _r(6, 4, device=d), X235), r"grad_output must have input's batch"),
    (
        "integer input",
        (
            lambda d, o: torch.ones(2, 4, dtype=torch.long, device=d),
            lambda d, o: torch.ones(2, 5, dtype=torch.long, device=d),
        ),
        r"input must be a floating point tensor .*, got Long",
    ),
    (
        "dtype",
        (lambda d, o: _r(2, 3, 4, device=d, dtype=torch.float64), X235),
        r"grad_output and input must have the same dtype, got grad_output Double and input Float",
    ),
    (
        "device",
        (lambda d, o: _r(2, 3, 4, device=o), X235),
        r"grad_output and input must be on the same device",
    ),
]


def _clip(scale=S2, gw=lambda d, o: _r(4, 5, device=d), gb=lambda d, o: _r(4, device=d)):
    return lambda d, o: (
        G234(d, o),
        X235(d, o),
        scale(d, o),
        None if gw is None else gw(d, o),
        None if gb is None else gb(d, o),
    )


NORMS = [(n, _norms(*mk), match) for n, mk, match in PER_SAMPLE] + [
    ("method", _norms(method="gram"), r"method must be 'auto', 'ghost' or 'direct', got 'gram'"),
]
GRADS = [(n, lambda d, o, mk=mk: (mk[0](d, o), mk[1](d, o)), m) for n, mk, m in PER_SAMPLE]
CLIPPED = [
    (n, lambda d, o, mk=mk: (mk[0](d, o), mk[1](d, o), S2(d, o), None, None), m)
    for n, mk, m in PER_SAMPLE[:2]
] + [
    (
        "scale length",
        _clip(scale=lambda d, o: _r(3, device=d)),
        r"scale must be 1-D of length input.size\(0\) \(samples\) = 2, got shape \[3\]",
    ),
    (
        "scale dtype",
        _clip(scale=lambda d, o: _r(2, device=d, dtype=torch.float64)),
        r"scale must have dtype Float for Float inputs, got Double",
    ),
    (
        "scale device",
        _clip(scale=lambda d, o: _r(2, device=o)),
        r"scale must be on the same device as input",
    ),
    (
        "grad_weight shape",
        _clip(gw=lambda d, o: _r(5, 4, device=d)),
        r"grad_weight must have shape \[4, 5\], got \[5, 4\]",
    ),
    (
        "grad_weight dtype",
        _clip(gw=lambda d, o: _r(4, 5, device=d, dtype=torch.float64)),
        r"grad_weight must have input's dtype \(Float, or float32 for 16-bit inputs\), got Double",
    ),
    (
        "grad_weight layout",
        _clip(gw=lambda d, o: _r(5, 4, device=d).t()),
        r"grad_weight must be contiguous, got strides \[1, 4\]",
    ),
    (
        "grad_bias shape",
        _clip(gw=None, gb=lambda d, o: _r(5, device=d)),
        r"grad_bias must have shape \[4\], got \[5\]",
    ),
    (
        "grad_bias device",
        _clip(gb=lambda d, o: _r(4, device=o)),
        r"grad_bias must be on the same device as input",
    ),
]

CASES = (
    [Case("linear", *c) for c in LINEAR]
    + [Case("linear_backward", *c) for c in BACKWARD]
    + [Case("linear_backward_accumulate_", *c) for c in ACCUMULATE]
    + [Case("per_sample_grad_norms", *c) for c in NORMS]
    + [Case("per_sample_grads", *c) for c in GRADS]
    + [Case("clipped_grad_accumulate_", *c) for c in CLIPPED]
)
ENTRIES = {
    "linear": [("op", ops.linear), ("functional", torchmatgrad.linear)],
    "linear_backward": [("op", ops.linear_backward)],
    "linear_backward_accumulate_": [("op", ops.linear_backward_accumulate_)],
    "per_sample_grad_norms": [("op", ops.per_sample_grad_norms)],
    "per_sample_grads": [("op", ops.per_sample_grads)],
    "clipped_grad_accumulate_": [("op", ops.clipped_grad_accumulate_)],
}
PARAMS = [
    pytest.param(case, entry, fn, id=f"{case.op}-{case.name}-{entry}")
    for case in CASES
    for entry, fn in ENTRIES[case.op]
]


def _raised(fn, args) -> BaseException:
    with pytest.raises(Exception) as info:  # noqa: B017  (the type is compared below)
        fn(*args)
    return info.value


def _real(t):
    return isinstance(t, torch.Tensor) and t.device.type != "meta"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case,entry,fn", PARAMS)
def test_bad_input(case, entry, fn, device):
    args = case.make(device, OTHER[device])
    before = [t.clone() if _real(t) else None for t in args]
    real = _raised(fn, args)
    assert isinstance(real, RuntimeError), real
    assert re.search(case.match, str(real)), str(real)
    for a, b in zip(args, before, strict=True):  # nothing modified
        if b is not None:
            assert torch.equal(a, b)

    mode = _compat.fake_tensor_mode()
    fake_args = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in args]
    with mode:
        fake = _raised(fn, fake_args)
    assert type(fake) is type(real)
    assert str(fake) == str(real)


@pytest.mark.parametrize("device", DEVICES)
def test_fp32_buffer_for_16_bit_weight_is_accepted(device):
    """The other side of the dtype rule: both the op and the fake kernel take it."""
    args = (G34_BF16(device, device), X35_BF16(device, device), W45_BF16(device, device))
    buf = _r(4, 5, device=device)
    gi, gb = ops.linear_backward_accumulate_(*args, buf, MASK2)
    mode = _compat.fake_tensor_mode()
    with mode:
        fgi, fgb = ops.linear_backward_accumulate_(
            *(mode.from_tensor(t) for t in (*args, buf)), MASK2
        )
    assert (fgi.shape, fgi.dtype, fgb.shape) == (gi.shape, gi.dtype, gb.shape)


def test_scalar_type_names_are_the_cpp_ones():
    names = {torch.float32: "Float", torch.float64: "Double", torch.bfloat16: "BFloat16"}
    names |= {torch.float16: "Half", torch.int64: "Long", torch.bool: "Bool"}
    for dtype, name in names.items():
        assert scalar_type_name(dtype) == name


def test_module_wrong_features():
    layer = torchmatgrad.nn.Linear(5, 4)
    with pytest.raises(RuntimeError, match=r"\[2, 7\].*\[4, 5\]"):
        layer(rand(2, 7))
