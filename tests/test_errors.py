"""Bad input: a clear error naming the argument and the shapes, and nothing modified."""

from __future__ import annotations

import pytest
import torch
from conftest import rand

import torchmatgrad

ops = torch.ops.torchmatgrad

CASES = [
    ("weight rank", lambda: (rand(3, 5), rand(5), None), r"weight must be 2-D .*\[5\]"),
    ("input rank", lambda: (rand(()), rand(4, 5), None), r"input must have at least 1 dim"),
    (
        "in_features",
        lambda: (rand(3, 6), rand(4, 5), None),
        r"input.size\(-1\) must equal weight.size\(1\).*\[3, 6\].*\[4, 5\]",
    ),
    (
        "bias length",
        lambda: (rand(3, 5), rand(4, 5), rand(3)),
        r"bias must be 1-D of length .*4.*\[3\]",
    ),
    ("bias rank", lambda: (rand(3, 5), rand(4, 5), rand(4, 1)), r"bias must be 1-D .*\[4, 1\]"),
    (
        "mixed dtypes",
        lambda: (rand(3, 5, dtype=torch.float64), rand(4, 5), None),
        r"input and weight must have the same dtype",
    ),
    (
        "bias dtype",
        lambda: (rand(3, 5), rand(4, 5), rand(4, dtype=torch.float64)),
        r"bias must have the same dtype",
    ),
    (
        "integer tensors",
        lambda: (torch.ones(3, 5, dtype=torch.long), torch.ones(4, 5, dtype=torch.long), None),
        r"weight must be a floating point tensor",
    ),
    (
        "mixed devices",
        lambda: (rand(3, 5, device="meta"), rand(4, 5), None),
        r"same device",
    ),
]


@pytest.mark.parametrize("name,make,match", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("entry", ["functional", "op"])
def test_bad_input(name, make, match, entry):
    x, w, b = make()
    before = [t.clone() for t in (x, w, b) if t is not None and t.device.type != "meta"]
    fn = torchmatgrad.linear if entry == "functional" else ops.linear
    with pytest.raises(RuntimeError, match=match):
        fn(x, w, b)
    after = [t for t in (x, w, b) if t is not None and t.device.type != "meta"]
    for a, c in zip(after, before, strict=True):
        assert torch.equal(a, c)


def test_backward_bad_grad_output():
    x, w = rand(3, 5), rand(4, 5)
    with pytest.raises(RuntimeError, match=r"grad_output must have shape \[3, 4\].*\[3, 5\]"):
        ops.linear_backward(rand(3, 5), x, w, [True, True, True])
    with pytest.raises(RuntimeError, match="grad_output must have the same dtype"):
        ops.linear_backward(rand(3, 4, dtype=torch.float64), x, w, [True, True, True])


def test_accumulate_bad_buffer_is_untouched():
    x, w, g = rand(3, 5), rand(4, 5), rand(3, 4)
    for buf, match in [
        (rand(5, 4), r"grad_weight must have weight's shape"),
        (rand(4, 5, dtype=torch.float64), r"grad_weight must have weight's dtype"),
        (rand(5, 4).t(), r"grad_weight must be contiguous"),
    ]:
        before = buf.clone()
        with pytest.raises(RuntimeError, match=match):
            ops.linear_backward_accumulate_(g, x, w, buf, [True, True])
        assert torch.equal(buf, before)


def test_module_wrong_features():
    layer = torchmatgrad.nn.Linear(5, 4)
    with pytest.raises(RuntimeError, match=r"\[2, 7\].*\[4, 5\]"):
        layer(rand(2, 7))
