"""convert_linear's reach and report: nn.Linear subclasses, nn.MultiheadAttention (and the
Transformer layers holding one) on torchmatgrad's op, exact against torch in float64."""

from __future__ import annotations

import copy

import pytest
import torch

import torchmatgrad
from torchmatgrad.mha import MultiheadAttention, multi_head_attention_forward
from torchmatgrad.nn import Linear, convert_linear
from torchmatgrad.testing import OpLog, rand

F64 = torch.float64
E, HEADS, L, S, N = 12, 3, 5, 7, 3  # odd sizes; 3 heads of 4


def _pair(seed=0, heads=HEADS, **kw):
    """(torch's MHA, a converted deep copy) with the same float64 parameters."""
    torch.manual_seed(seed)
    ref = torch.nn.MultiheadAttention(E, heads, dtype=F64, **kw)
    if ref.in_proj_bias is not None:  # torch initializes the biases to 0: make them count
        with torch.no_grad():
            ref.in_proj_bias.normal_()
            ref.out_proj.bias.normal_()
    ours = convert_linear(copy.deepcopy(ref))
    return ref, ours


def _grads(out, weights, leaves, seed):
    g = torch.Generator().manual_seed(seed)
    loss = (out * torch.randn(out.shape, dtype=F64, generator=g)).sum()
    if weights is not None:
        loss = loss + (weights * torch.randn(weights.shape, dtype=F64, generator=g)).sum()
    return torch.autograd.grad(loss, leaves, allow_unused=True)


def _assert_same(a, b, what):
    if a is None or b is None:
        assert a is None and b is None, what
        return
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=lambda m: f"{what}: {m}")


def _masks(kind, src=S):
    """key_padding_mask, attn_mask and is_causal for one masking case with ``src`` keys (never
    a fully masked row: that is NaN on both sides)."""
    g = torch.Generator().manual_seed(5)
    kpm = torch.zeros(N, src, dtype=torch.bool)
    kpm[0, -1] = kpm[2, :2] = True
    if kind == "none":
        return None, None, False
    if kind == "kpm-bool":
        return kpm, None, False
    if kind == "kpm-float+attn-2d-float":
        return (
            torch.zeros(N, src, dtype=F64).masked_fill(kpm, -1e4),
            torch.randn(L, src, dtype=F64, generator=g),
            False,
        )
    if kind == "attn-3d-bool+kpm-bool":
        attn = torch.rand(N * HEADS, L, src, generator=g) < 0.3
        attn[..., 2] = False
        return kpm, attn, False
    if kind == "causal":
        return None, torch.nn.Transformer.generate_square_subsequent_mask(L, dtype=F64), True
    if kind == "causal+kpm":
        mask = torch.nn.Transformer.generate_square_subsequent_mask(L, dtype=F64)
        pad = torch.zeros(N, src, dtype=F64)
        pad[0, -1] = pad[2, -2] = float("-inf")  # keys past the first: no row fully masked
        return pad, mask, True
    raise AssertionError(kind)


CONFIGS = {
    "seq-first": {},
    "batch-first": {"batch_first": True},
    "kdim-vdim": {"kdim": 5, "vdim": 9},
    "kdim-vdim-batch-first": {"kdim": 5, "vdim": 9, "batch_first": True},
    "bias-kv-zero-attn": {"add_bias_kv": True, "add_zero_attn": True},
    "no-bias": {"bias": False, "batch_first": True},
}
MASKS = ["none", "kpm-bool", "kpm-float+attn-2d-float", "attn-3d-bool+kpm-bool", "causal"]
WEIGHTS = [(False, True), (True, True), (True, False)]  # (need_weights, average_attn_weights)


def _inputs(ref, call, seq_q=L, seq_k=S):
    bf = ref.batch_first

    def make(seq, dim, seed):
        shape = (N, seq, dim) if bf else (seq, N, dim)
        return rand(*shape, dtype=F64, requires_grad=True, seed=seed)

    q = make(seq_q, E, 1)
    if call == "self":
        return q, q, q
    k = make(seq_k, ref.kdim, 2)
    if call == "kv":
        return q, k, k
    return q, k, make(seq_k, ref.vdim, 3)


def _calls(config):
    if "kdim" in config:
        return ["cross"]
    return ["self", "kv", "cross"]


CASES = [
    (c, call, mask, w)
    for c in CONFIGS
    for call in _calls(CONFIGS[c])
    for mask in MASKS
    for w in WEIGHTS
    if not (mask == "causal" and call != "self")  # L x L causal mask: self-attention
]


@pytest.mark.parametrize(("config", "call", "mask", "weights"), CASES)
def test_mha_matches_torch(config, call, mask, weights):
    """Outputs, attention weights and every gradient (inputs and parameters) equal to torch's,
    float64, with the projections on torchmatgrad's op and none of torch's linear ops."""
    ref, ours = _pair(**CONFIGS[config])
    assert type(ours) is MultiheadAttention
    need_weights, average = weights
    seq_k = L if call == "self" else S
    q, k, v = _inputs(ref, call, seq_k=seq_k)
    kpm, attn, causal = _masks(mask, seq_k)
    if mask == "causal" and need_weights is False:
        kpm = None
    kw = dict(
        key_padding_mask=kpm,
        need_weights=need_weights,
        attn_mask=attn,
        average_attn_weights=average,
        is_causal=causal,
    )
    out_r, w_r = ref(q, k, v, **kw)
    log = OpLog()
    with log:
        out_o, w_o = ours(q, k, v, **kw)
    projections = 1 if call == "self" else 2 if call == "kv" else 3
    if "kdim" in config:
        projections = 3
    assert log.names.count("torchmatgrad.linear") == projections + 1, log.names
    assert not {"aten.linear", "aten.addmm", "aten.mm"} & set(log.names), log.names
    _assert_same(out_o, out_r, "output")
    _assert_same(w_o, w_r, "attention weights")
    leaves_r = [q, k, v, *ref.parameters()]
    leaves_o = [q, k, v, *ours.parameters()]
    for i, (a, b) in enumerate(
        zip(_grads(out_o, w_o, leaves_o, 7), _grads(out_r, w_r, leaves_r, 7), strict=True)
    ):
        _assert_same(a, b, f"gradient {i}")


@pytest.mark.parametrize("need_weights", [True, False])
def test_mha_unbatched_and_causal_with_padding(need_weights):
    ref, ours = _pair(batch_first=True)
    q = rand(L, E, dtype=F64, requires_grad=True, seed=4)  # unbatched (L, E)
    for a, b in zip(
        ours(q, q, q, need_weights=need_weights),
        ref(q, q, q, need_weights=need_weights),
        strict=True,
    ):
        _assert_same(a, b, "unbatched")
    kpm, attn, causal = _masks("causal+kpm", L)
    x = rand(N, L, E, dtype=F64, requires_grad=True, seed=6)
    kw = dict(key_padding_mask=kpm, attn_mask=attn, is_causal=causal, need_weights=need_weights)
    (out_r, w_r), (out_o, w_o) = ref(x, x, x, **kw), ours(x, x, x, **kw)
    _assert_same(out_o, out_r, "output")
    _assert_same(w_o, w_r, "weights")
    for a, b in zip(
        _grads(out_o, w_o, [x, *ours.parameters()], 1),
        _grads(out_r, w_r, [x, *ref.parameters()], 1),
        strict=True,
    ):
        _assert_same(a, b, "gradient")


def test_mha_same_parameters_and_state_dict():
    torch.manual_seed(0)
    for kw in ({}, {"kdim": 5, "vdim": 9, "add_bias_kv": True}):
        ref = torch.nn.MultiheadAttention(E, HEADS, **kw).eval()
        params = dict(ref.named_parameters())
        ours, rep = convert_linear(ref, report=True)
        assert type(ours) is MultiheadAttention and ours is not ref and not ours.training
        assert dict(ours.named_parameters()).keys() == params.keys()
        assert all(p is params[n] for n, p in ours.named_parameters())
        assert list(ours.state_dict()) == list(ref.state_dict())
        assert ours.out_proj is not ref.out_proj and type(ours.out_proj) is Linear
        assert ours.out_proj.weight is ref.out_proj.weight
        assert rep.converted == [
            ("", "MultiheadAttention"),
            ("out_proj", "NonDynamicallyQuantizableLinear"),
        ]
        fresh = torch.nn.MultiheadAttention(E, HEADS, **kw)
        fresh.load_state_dict(ours.state_dict(), strict=True)
        # The original keeps its own (torch) out_proj: converting does not change it.
        assert type(ref.out_proj) is torch.nn.modules.linear.NonDynamicallyQuantizableLinear
    with pytest.raises(TypeError, match="MultiheadAttention"):
        MultiheadAttention.from_mha(torch.nn.Linear(2, 2))


def test_mha_gradcheck():
    """The projections' backward (torchmatgrad's) through torch's attention, numerically."""
    e, heads = 6, 2
    g = torch.Generator().manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, dtype=F64, generator=g).requires_grad_()

    q, k = t(3, 2, e), t(4, 2, e)
    w_in, b_in, w_out, b_out = t(3 * e, e), t(3 * e), t(e, e), t(e)
    bias_k, bias_v = t(1, 1, e), t(1, 1, e)
    kpm = torch.tensor([[False, False, False, True], [True, False, False, False]])

    def fn(q, k, w_in, b_in, w_out, b_out, bias_k, bias_v):
        out, w = multi_head_attention_forward(
            q, k, k, e, heads, w_in, b_in, bias_k, bias_v, True, 0.0, w_out, b_out,
            key_padding_mask=kpm, average_attn_weights=False,
        )  # fmt: skip
        return out, w

    assert torch.autograd.gradcheck(fn, (q, k, w_in, b_in, w_out, b_out, bias_k, bias_v))


def test_mha_dropout_train_and_eval():
    """dropout > 0: in eval (grad enabled, so on our path) it is off, as torch's; in training,
    the same seed draws the same dropout masks (the projections draw no random numbers)."""
    ref, ours = _pair(dropout=0.3, batch_first=True)
    x = rand(N, L, E, dtype=F64, requires_grad=True, seed=3)
    ref.eval()
    ours.eval()
    log = OpLog()
    with log:
        out_o = ours(x, x, x)[0]
    assert "torchmatgrad.linear" in log.names
    _assert_same(out_o, ref(x, x, x)[0], "eval output")
    ref.train()
    ours.train()
    for need_weights in (True, False):
        torch.manual_seed(11)
        out_r, w_r = ref(x, x, x, need_weights=need_weights)
        torch.manual_seed(11)
        out_o, w_o = ours(x, x, x, need_weights=need_weights)
        _assert_same(out_o, out_r, "train output")
        _assert_same(w_o, w_r, "train weights")


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_mha_fast_path_is_torchs():
    """Eval with no gradient is where torch's fused fast path can run: there the converted MHA
    is torch's forward unchanged, and torch takes the fast path (nested tensors included)."""
    ref, ours = _pair(batch_first=True, heads=4)  # the fast path wants an even head count
    ref.eval()
    ours.eval()
    x = rand(N, L, E, dtype=F64, seed=2)
    kpm = _masks("kpm-bool", L)[0]
    for kw in ({}, {"key_padding_mask": kpm}, {"need_weights": False}):
        with torch.no_grad():
            log = OpLog()
            with log:
                got = ours(x, x, x, **kw)
            want = ref(x, x, x, **kw)
        assert "aten._native_multi_head_attention" in log.names, log.names
        assert "torchmatgrad.linear" not in log.names
        for a, b in zip(got, want, strict=True):
            _assert_same(a, b, f"fast path {kw}")
    nested = torch.nested.nested_tensor([rand(4, E, dtype=F64), rand(2, E, dtype=F64)])
    with torch.inference_mode():
        got, want = ours(nested, nested, nested)[0], ref(nested, nested, nested)[0]
    for a, b in zip(got.unbind(), want.unbind(), strict=True):
        _assert_same(a, b, "nested")
    # The same module with a gradient to compute (grad enabled, parameters requiring it) takes
    # our path: torch's fast path would not run there either.
    log = OpLog()
    with log:
        got = ours(x, x, x)
    assert (
        "torchmatgrad.linear" in log.names and "aten._native_multi_head_attention" not in log.names
    )
    _assert_same(got[0], ref(x, x, x)[0], "eval with grad")


def _layer_pair(cls, seed=0, heads=HEADS, **kw):
    torch.manual_seed(seed)
    ref = cls(E, heads, dim_feedforward=17, dropout=0.0, dtype=F64, **kw)
    return ref, convert_linear(copy.deepcopy(ref))


@pytest.mark.parametrize("batch_first", [False, True])
def test_transformer_layers_match_torch(batch_first):
    enc_r, enc_o = _layer_pair(torch.nn.TransformerEncoderLayer, batch_first=batch_first)
    dec_r, dec_o = _layer_pair(torch.nn.TransformerDecoderLayer, batch_first=batch_first)
    assert type(enc_o.self_attn) is MultiheadAttention and type(enc_o.linear1) is Linear
    assert type(dec_o.multihead_attn) is MultiheadAttention
    src = rand(*((N, S, E) if batch_first else (S, N, E)), dtype=F64, requires_grad=True, seed=1)
    tgt = rand(*((N, L, E) if batch_first else (L, N, E)), dtype=F64, requires_grad=True, seed=2)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(L, dtype=F64)
    kpm = _masks("kpm-bool")[0]

    def run(enc, dec):
        mem = enc(src, src_key_padding_mask=kpm)
        return dec(tgt, mem, tgt_mask=causal, tgt_is_causal=True, memory_key_padding_mask=kpm)

    log = OpLog()
    with log:
        out_o = run(enc_o, dec_o)
    # encoder: in_proj, out_proj, 2 FFN; decoder: self (1 + 1), cross (q, kv: 2 + 1), 2 FFN.
    assert log.names.count("torchmatgrad.linear") == 4 + 7, log.names
    assert not {"aten.linear", "aten.addmm", "aten.mm"} & set(log.names)
    out_r = run(enc_r, dec_r)
    _assert_same(out_o, out_r, "output")
    leaves_o = [src, tgt, *enc_o.parameters(), *dec_o.parameters()]
    leaves_r = [src, tgt, *enc_r.parameters(), *dec_r.parameters()]
    for i, (a, b) in enumerate(
        zip(_grads(out_o, None, leaves_o, 3), _grads(out_r, None, leaves_r, 3), strict=True)
    ):
        _assert_same(a, b, f"gradient {i}")
    # Inference: torch's encoder-layer fast path (batch first, an even head count) reads the
    # (shared) weights itself.
    enc_r, enc_o = _layer_pair(torch.nn.TransformerEncoderLayer, heads=4, batch_first=batch_first)
    enc_r.eval()
    enc_o.eval()
    with torch.no_grad():
        log = OpLog()
        with log:
            got = enc_o(src)
        want = enc_r(src)
    assert ("aten._transformer_encoder_layer_fwd" in log.names) == batch_first, log.names
    _assert_same(got, want, "inference")


def test_mha_compile_fullgraph():
    ref, ours = _pair(batch_first=True)
    x = rand(N, L, E, dtype=F64, requires_grad=True, seed=8)
    kpm = _masks("kpm-bool", L)[0]
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    @torch.compile(fullgraph=True, backend=backend)
    def run(x):
        return ours(x, x, x, key_padding_mask=kpm, need_weights=False)[0]

    out = run(x)
    assert len(graphs) == 1 and graphs[0].count("torchmatgrad.linear") == 2, graphs
    want = ref(x, x, x, key_padding_mask=kpm, need_weights=False)[0]
    _assert_same(out, want, "compiled output")
    for a, b in zip(
        _grads(out, None, [x, *ours.parameters()], 2),
        _grads(want, None, [x, *ref.parameters()], 2),
        strict=True,
    ):
        _assert_same(a, b, "compiled gradient")


# ---- the report --------------------------------------------------------------------------


class _OwnForward(torch.nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


class _OwnAttention(torch.nn.MultiheadAttention):
    def forward(self, *args, **kwargs):
        return super().forward(*args, **kwargs)


def test_convert_linear_report_subclasses_and_filter():
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(8, 2)
    own_attn = _OwnAttention(8, 2)
    model = torch.nn.ModuleDict(
        {
            "a": torch.nn.Linear(8, 8),
            "own": _OwnForward(8, 8),
            "lazy": torch.nn.LazyLinear(3),
            "attn": mha,
            "own_attn": own_attn,
            "bil": torch.nn.Bilinear(2, 3, 4),
            "skip": torch.nn.Linear(8, 4),
        }
    )
    _, rep = convert_linear(model, report=True, filter_fn=lambda m, fqn: fqn != "skip")
    # nn.Linear, the subclass that keeps nn.Linear's forward, and MHA are converted, sharing
    # their parameters; inside the subclass of MHA that has its own forward, out_proj is.
    assert type(model["a"]) is Linear and type(model["attn"]) is MultiheadAttention
    assert type(model["attn"].out_proj) is Linear
    assert model["attn"].in_proj_weight is mha.in_proj_weight
    assert sorted(rep.converted) == [
        ("a", "Linear"),
        ("attn", "MultiheadAttention"),
        ("attn.out_proj", "NonDynamicallyQuantizableLinear"),
        ("own_attn.out_proj", "NonDynamicallyQuantizableLinear"),
    ]
    left = {name: why for name, _, why in rep.left}
    assert set(left) == {"own", "lazy", "own_attn", "bil", "skip"}
    assert "overrides forward" in left["own"] and "overrides forward" in left["own_attn"]
    assert "lazy" in left["lazy"] and "bilinear" in left["bil"]
    assert left["skip"] == "excluded by filter_fn"
    assert type(model["own"]) is _OwnForward and type(model["skip"]) is torch.nn.Linear
    text = str(rep)
    assert text.startswith("converted 4 module(s), left 5") and "attn.out_proj" in text
    assert "  left       skip: Linear: excluded by filter_fn" in text.splitlines()
    # The subclass of MHA with its own forward still computes what it did (it reads
    # out_proj.weight itself, the same Parameter).
    x = rand(5, 1, 8)
    ref = _OwnAttention(8, 2)
    ref.load_state_dict(own_attn.state_dict())
    torch.testing.assert_close(own_attn(x, x, x)[0], ref(x, x, x)[0])


def test_convert_linear_filter_sees_every_candidate_and_keeps_children():
    """filter_fn(module, fqn) is asked once per convertible module; a module it excludes is
    left, its children are still walked."""
    enc = torch.nn.TransformerEncoderLayer(8, 2, dim_feedforward=5)
    seen = []

    def keep(module, fqn):
        seen.append((fqn, type(module).__name__))
        return fqn != "self_attn"

    _, rep = convert_linear(enc, report=True, filter_fn=keep)
    assert seen == [
        ("self_attn", "MultiheadAttention"),
        ("self_attn.out_proj", "NonDynamicallyQuantizableLinear"),
        ("linear1", "Linear"),
        ("linear2", "Linear"),
    ]
    assert type(enc.self_attn) is torch.nn.MultiheadAttention
    assert type(enc.self_attn.out_proj) is Linear
    assert rep.left == [("self_attn", "MultiheadAttention", "excluded by filter_fn")]


def test_convert_linear_warns_when_nothing_converted():
    with pytest.warns(UserWarning, match=r"nothing; left: 0 \(a subclass that overrides"):
        convert_linear(torch.nn.Sequential(_OwnForward(3, 3)))
    model = torch.nn.Sequential(Linear(3, 3))  # already converted: nothing to do, and it says so
    with pytest.warns(UserWarning, match="converted nothing"):
        assert convert_linear(model) is model
    again = convert_linear(torch.nn.MultiheadAttention(4, 2))
    with pytest.warns(UserWarning, match="converted nothing"):
        assert convert_linear(again) is again


def test_linear_mode_routes_unconverted_mha():
    """Under linear_mode(), torch's own MHA runs its projections on the op (the mode routes
    F.multi_head_attention_forward, which it could not otherwise reach), exactly."""
    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(E, HEADS, kdim=5, vdim=9, dtype=F64)
    q, k, v = _inputs(ref, "cross")
    out_r, w_r = ref(q, k, v)
    log = OpLog()
    with log, torchmatgrad.linear_mode():
        out_o, w_o = ref(q, k, v)
    assert log.names.count("torchmatgrad.linear") == 4
    assert not {"aten.linear", "aten.addmm", "aten.mm"} & set(log.names)
    _assert_same(out_o, out_r, "output")
    _assert_same(w_o, w_r, "weights")


def test_functional_static_kv_and_errors():
    """torchmatgrad.mha.multi_head_attention_forward against torch's function itself: static
    keys and values (which nn.MultiheadAttention never passes), and its shape errors."""
    g = torch.Generator().manual_seed(9)

    def t(*shape):
        return torch.randn(*shape, dtype=F64, generator=g).requires_grad_()

    head = E // HEADS
    q, k = t(L, N, E), t(S, N, E)
    w_in, b_in, w_out, b_out = t(3 * E, E), t(3 * E), t(E, E), t(E)
    static_k, static_v = t(N * HEADS, S + 2, head), t(N * HEADS, S + 2, head)
    args = (q, k, k, E, HEADS, w_in, b_in, None, None, False, 0.0, w_out, b_out)
    kw = dict(static_k=static_k, static_v=static_v, average_attn_weights=False)
    got = multi_head_attention_forward(*args, **kw)
    want = torch.nn.functional.multi_head_attention_forward(*args, **kw)
    leaves = [q, k, w_in, b_in, w_out, b_out, static_k, static_v]
    for a, b in zip(got, want, strict=True):
        _assert_same(a, b, "static")
    for a, b in zip(_grads(*got, leaves, 1), _grads(*want, leaves, 1), strict=True):
        _assert_same(a, b, "static gradient")
    with pytest.raises(ValueError, match=r"query must be 2-D \(L, E\) or 3-D"):
        multi_head_attention_forward(q[None], *args[1:])
    with pytest.raises(ValueError, match="key_padding_mask must be 2-D"):
        multi_head_attention_forward(*args, key_padding_mask=torch.zeros(S, dtype=torch.bool))
    with pytest.raises(TypeError, match="attn_mask must be a bool or floating-point tensor"):
        multi_head_attention_forward(*args, attn_mask=torch.zeros(L, S, dtype=torch.int64))
    with pytest.raises(ValueError, match="static_k must be"):
        multi_head_attention_forward(*args, static_k=static_k[:, :, 1:], static_v=static_v)
    with pytest.raises(RuntimeError, match="Need attn_mask if specifying the is_causal"):
        multi_head_attention_forward(*args, is_causal=True)
