"""Hugging Face models converted by convert_linear: GPT-2's Conv1D on torchmatgrad's kernels
(torchmatgrad.integrations.transformers), exact against the unconverted model."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

import torchmatgrad
from torchmatgrad import _C, per_sample
from torchmatgrad.testing import OpLog, assert_close, rand

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D as HFConv1D  # noqa: E402

from torchmatgrad.integrations.transformers import Conv1D  # noqa: E402

VOCAB, T = 101, 13


def gpt2(dtype=torch.float64, seed=0, **kw) -> torch.nn.Module:
    """A small random GPT-2 LM (no download), dropout off so two models can be compared."""
    cfg = transformers.GPT2Config(
        n_layer=2,
        n_embd=64,
        n_head=4,
        vocab_size=VOCAB,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        **kw,
    )
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(cfg).to(dtype)
    with torch.no_grad():  # biases are zero at init: make them count
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def tokens(B=3, seed=1):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def test_gpt2_every_conv1d_and_the_head_converted():
    model = gpt2()
    params = dict(model.named_parameters(remove_duplicate=False))
    before = {k: (v.shape, v.data_ptr()) for k, v in model.state_dict().items()}
    conv = [n for n, m in model.named_modules() if type(m) is HFConv1D]
    assert len(conv) == 8
    torchmatgrad.nn.convert_linear(model)
    modules = dict(model.named_modules())
    assert all(type(modules[n]) is Conv1D for n in conv)
    assert not any(type(m) in (HFConv1D, torch.nn.Linear) for m in model.modules())
    assert type(model.lm_head) is torchmatgrad.nn.Linear
    # The very same Parameter objects, storage and state_dict (keys, shapes, data).
    after = dict(model.named_parameters(remove_duplicate=False))
    assert list(after) == list(params) and all(after[k] is params[k] for k in params)
    assert {k: (v.shape, v.data_ptr()) for k, v in model.state_dict().items()} == before
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied
    assert isinstance(modules[conv[0]], HFConv1D)  # transformers' isinstance checks still hold
    # Every linear map of the forward runs torchmatgrad's op, none runs aten's addmm.
    with OpLog() as log:
        model(tokens())
    assert log.names.count("torchmatgrad.linear") == 9, log.names
    assert "aten.addmm" not in log.names


def _compare_models(dtype, rel):
    ref = gpt2(dtype)
    ours = torchmatgrad.nn.convert_linear(copy.deepcopy(ref))
    ids, labels = tokens(), tokens(seed=2)
    out_ref = ref(ids, labels=labels)
    out = ours(ids, labels=labels)
    out_ref.loss.backward()
    out.loss.backward()
    pairs = [("logits", out.logits, out_ref.logits), ("loss", out.loss, out_ref.loss)]
    named = dict(ref.named_parameters())
    pairs += [(n, p.grad, named[n].grad) for n, p in ours.named_parameters()]
    for what, got, want in pairs:
        assert got is not None and want is not None, what
        scale = want.detach().abs().max().clamp_min(1e-30)
        err = (got.detach() - want.detach()).abs().max() / scale
        assert err <= rel, f"{what}: relative error {err:.3g} > {rel:g}"
    return ref, ours


def test_gpt2_float64_logits_loss_and_gradients_equal():
    _compare_models(torch.float64, 1e-12)


def test_gpt2_float32_within_torchs_own_error():
    """float32: each result's error against the float64 model is at most twice torch's (the
    unconverted float32 model) plus one rounding."""
    ref64 = gpt2(torch.float64)
    ref32 = copy.deepcopy(ref64).float()  # the same values, rounded once
    ours = torchmatgrad.nn.convert_linear(copy.deepcopy(ref32))
    ids, labels = tokens(), tokens(seed=2)
    results = []
    for model in (ref64, ref32, ours):
        out = model(ids, labels=labels)
        out.loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        results.append({"logits": out.logits, "loss": out.loss, **grads})
    want, peer, got = results
    for what in want:
        err = (got[what].double() - want[what]).abs().max().item()
        peer_err = (peer[what].double() - want[what]).abs().max().item()
        eps = torch.finfo(torch.float32).eps * want[what].abs().max().item()
        assert peer_err < 1e-4 * max(1.0, want[what].abs().max().item()), what  # same model
        assert err <= 2 * peer_err + 4 * eps, f"{what}: error {err:.3g}, torch's {peer_err:.3g}"


def test_gpt2_adamw_step_identical():
    ref, ours = _compare_models(torch.float64, 1e-12)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (ref, ours)]
    for opt in opts:
        opt.step()
    named = dict(ref.named_parameters())
    for n, p in ours.named_parameters():
        assert_close(p, named[n].detach(), what=f"{n} after AdamW")
    assert ours.lm_head.weight is ours.transformer.wte.weight


def test_state_dict_round_trip_with_unconverted_model():
    ours = torchmatgrad.nn.convert_linear(gpt2(seed=3))
    ref = gpt2(seed=4)
    ref.load_state_dict(ours.state_dict(), strict=True)
    ids = tokens()
    torch.testing.assert_close(ours(ids).logits, ref(ids).logits, rtol=1e-12, atol=1e-12)
    ours.load_state_dict(gpt2(seed=5).state_dict(), strict=True)  # a "checkpoint" loads in place
    assert ours.lm_head.weight is ours.transformer.wte.weight


@pytest.mark.parametrize("rows", [(1,), (3, 17), (2, 0)])
def test_conv1d_layer(rows):
    torch.manual_seed(0)
    ref = HFConv1D(7, 5).double()
    with torch.no_grad():
        ref.bias.normal_()
    ours = torchmatgrad.nn.convert_linear(ref)  # a Conv1D itself: returned converted
    assert type(ours) is Conv1D and ours.weight is ref.weight and ours.bias is ref.bias
    x = rand(*rows, 5, dtype=torch.float64, requires_grad=True)
    y, y_ref = ours(x), ref(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-13, atol=1e-13)
    g = rand(*y.shape, dtype=torch.float64)
    got = torch.autograd.grad(y, (x, ours.weight, ours.bias), g)
    want = torch.autograd.grad(y_ref, (x, ref.weight, ref.bias), g)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 4, 16, 64])
def test_conv1d_weight_read_in_place(rows, dtype):
    """The [in, out] weight is read where it is stored: few rows on the CPU kernels (no ATen
    product, no copy of W: csrc/vendor.h, use_vendor), many on the vendor route (ATen's mm on
    the same strides); either way nothing W-sized is copied and the weight's gradient comes out in
    the stored layout. The profiler lists every ATen op the launchers call."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    layer = Conv1D.from_conv1d(HFConv1D(48, 40).to(dtype))  # W [40, 48]
    x = rand(rows, 40, dtype=dtype, requires_grad=True)
    g = rand(rows, 48, dtype=dtype)
    y = layer(x)  # warm-up (first-call setup is not the per-call cost)
    torch.autograd.grad(y, (x, layer.weight, layer.bias), g)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        y = layer(x)
        gx, gw, gb = torch.autograd.grad(y, (x, layer.weight, layer.bias), g)
    names = {e.key for e in prof.key_averages()}
    products = names & {"aten::mm", "aten::addmm", "aten::matmul", "aten::bmm"}
    wide = dtype == torch.float32
    forward_kernels = rows <= (_C.transposed_forward_rows32 if wide else _C.transposed_kernel_rows)
    backward_kernels = rows <= _C.transposed_kernel_rows
    assert bool(products) == (not (forward_kernels and backward_kernels)), sorted(names)
    weight_copies = [
        e
        for e in prof.events()
        if e.name in ("aten::copy_", "aten::clone", "aten::contiguous")
        and any(list(s) in ([40, 48], [48, 40]) for s in e.input_shapes if s)
    ]
    assert not weight_copies, [(e.name, e.input_shapes) for e in weight_copies]
    assert gw.shape == (40, 48) and gw.is_contiguous()
    x64, w64, b64, g64 = (t.detach().double() for t in (x, layer.weight, layer.bias, g))
    assert_close(y, torch.addmm(b64, x64, w64), k=41, what="forward")
    assert_close(gx, g64 @ w64.t(), k=48, what="grad_input")
    assert_close(gw, x64.t() @ g64, k=rows, what="grad_weight")
    assert_close(gb, g64.sum(0), k=rows, what="grad_bias")


def test_conv1d_non_contiguous_input_gradcheck_and_vmap():
    torch.manual_seed(0)
    layer = Conv1D.from_conv1d(HFConv1D(4, 6).double())
    x = rand(6, 3, dtype=torch.float64).t()  # [3, 6], strides (1, 3): HF's view() fails here
    ref = torch.addmm(layer.bias, x, layer.weight)
    torch.testing.assert_close(layer(x), ref, rtol=1e-13, atol=1e-13)
    xs = rand(3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (xs,))
    assert torch.autograd.gradgradcheck(layer, (xs,))
    per = torch.func.vmap(layer)(rand(4, 2, 6, dtype=torch.float64))
    assert per.shape == (4, 2, 4)


def test_conv1d_subclasses_left_alone_and_errors():
    class Custom(HFConv1D):
        pass

    model = torch.nn.Sequential(Custom(3, 2))
    torchmatgrad.nn.convert_linear(model)
    assert type(model[0]) is Custom
    with pytest.raises(TypeError, match="transformers.pytorch_utils.Conv1D, got Linear"):
        Conv1D.from_conv1d(torch.nn.Linear(2, 3))


def test_import_does_not_load_transformers():
    code = (
        "import sys, torch, torchmatgrad\n"
        "torchmatgrad.nn.convert_linear(torch.nn.Sequential(torch.nn.Linear(2, 2)))\n"
        "assert 'transformers' not in sys.modules, 'transformers imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- DP-SGD on GPT-2: per_sample on the converted model ---------------------------------------


def _gpt2_loss(model, ids, labels):
    logits = model(ids).logits
    loss = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), labels.flatten(), reduction="none"
    )
    return loss.view(ids.shape).mean(1)  # [B]: sample i's mean token loss


def test_gpt2_clipped_backward_matches_the_per_sample_loop():
    """Every parameter (Conv1D, LayerNorm, the tied wte/lm_head, the position embedding looked up
    with ids [1, T]) gets the clipped sum of the definition, float64, ≤ 1e-9."""
    from test_per_sample import check_against_loop

    model = torchmatgrad.nn.convert_linear(gpt2())
    assert model.lm_head.weight is model.transformer.wte.weight
    ids, labels = tokens(B=4), tokens(B=4, seed=2)
    check_against_loop(model, lambda: _gpt2_loss(model, ids, labels))
    # The position embedding's rows beyond T get nothing, the ones used get each sample's share.
    wpe = model.transformer.wpe.weight.grad
    assert wpe[T:].abs().max() == 0 and wpe[:T].abs().min() > 0


def test_gpt2_position_embedding_used_otherwise_is_refused():
    model = per_sample.enable(torchmatgrad.nn.convert_linear(gpt2()))
    wpe = model.transformer.wpe
    ids = tokens(B=2)
    h = model.transformer.wte(ids) * wpe(torch.arange(T).unsqueeze(0))  # not an addition
    loss = model.lm_head(h).square().mean((1, 2))
    with pytest.raises(RuntimeError, match=r"Embedding's input has shape \[1, 13\], shared by"):
        per_sample.clipped_backward(model, loss, 1.0)


def test_bench_dp_gpt2_runs(tmp_path):
    import json

    from torchmatgrad.cli import bench

    argv = ["--case", "dp-gpt2", "--device", "cpu", "--d", "64", "--blocks", "1", "--B", "2"]
    argv += ["--T", "5", "--reps", "2", "--warmup", "1", "--out", str(tmp_path), "--name", "g"]
    assert bench.main(argv) == 0
    rows = {r["variant"]: r for r in json.loads((tmp_path / "g.json").read_text())["rows"]}
    for name in ("non-private", "torchmatgrad"):
        assert rows[name]["error"] is None and rows[name]["model"] == "gpt2", rows[name]
        assert rows[name]["median_ms"] > 0 and rows[name]["peak_mb"] > 0
