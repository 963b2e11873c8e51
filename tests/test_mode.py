"""`torchmatgrad.linear_mode()`: F.linear calls in code we cannot swap run torchmatgrad's op."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import torchmatgrad
from torchmatgrad.testing import OpLog, assert_close, rand


class _CallsFLinear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w1 = torch.nn.Parameter(rand(17, 9, dtype=torch.float64))
        self.w2 = torch.nn.Parameter(rand(3, 17, dtype=torch.float64))
        self.b2 = torch.nn.Parameter(rand(3, dtype=torch.float64))

    def forward(self, x):
        return F.linear(torch.tanh(F.linear(x, self.w1)), self.w2, bias=self.b2)


def test_routes_f_linear_and_matches():
    model = _CallsFLinear()
    x = rand(4, 5, 9, dtype=torch.float64, requires_grad=True)
    ref = model(x)
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, *model.parameters()])
    log = OpLog()
    with log, torchmatgrad.linear_mode():
        out = model(x)
        grads = torch.autograd.grad(out.square().sum(), [x, *model.parameters()])
    assert log.names.count("torchmatgrad.linear") == 2
    assert "aten.linear" not in log.names and "aten.addmm" not in log.names
    assert_close(out, ref.detach(), k=17)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)
    # Outside the mode F.linear is torch's again.
    log = OpLog()
    with log:
        model(x)
    assert "torchmatgrad.linear" not in log.names


def test_under_compile_fullgraph():
    model = _CallsFLinear()
    x = rand(6, 9, dtype=torch.float64)
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    @torch.compile(fullgraph=True, backend=backend)
    def run(x):
        with torchmatgrad.linear_mode():
            return model(x)

    torch.testing.assert_close(run(x), model(x))
    assert len(graphs) == 1 and graphs[0].count("torchmatgrad.linear") == 2, graphs


def test_mha_under_mode_and_compile_fullgraph():
    """torch's own TransformerEncoderLayer under the mode: its MHA (through
    F.multi_head_attention_forward) and its FFN on the op, one graph, exact against torch."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(
        12, 3, dim_feedforward=17, dropout=0.0, batch_first=True, dtype=torch.float64
    )
    x = rand(3, 5, 12, dtype=torch.float64, requires_grad=True)
    ref = layer(x)
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, *layer.parameters()])
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    @torch.compile(fullgraph=True, backend=backend)
    def run(x):
        with torchmatgrad.linear_mode():
            return layer(x)

    out = run(x)
    assert len(graphs) == 1 and graphs[0].count("torchmatgrad.linear") == 4, graphs
    grads = torch.autograd.grad(out.square().sum(), [x, *layer.parameters()])
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)
