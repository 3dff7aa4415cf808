"""convert_attention / SelfAttentionAdapter: drop-in replacement of nn.MultiheadAttention in models.

References are the unconverted models, run under ``sdpa_kernel(SDPBackend.MATH)``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from backpack_attention import MultiheadSelfAttention, SelfAttentionAdapter, convert_attention

E, H, N, L = 8, 2, 3, 5


def make_mha(**kw):
    kw.setdefault("batch_first", True)
    m = nn.MultiheadAttention(E, H, dtype=torch.float64, **kw)
    with torch.no_grad():  # generic (non-zero) biases
        if m.in_proj_bias is not None:
            m.in_proj_bias.normal_()
            m.out_proj.bias.normal_()
    return m


class Wrap(nn.Module):
    """Calls its MHA as self-attention with need_weights=False and keeps the output only."""

    def __init__(self, mha):
        super().__init__()
        self.inner = mha

    def forward(self, x):
        return self.inner(x, x, x, need_weights=False)[0]


class Net(nn.Module):
    """MHAs nested at several depths: an encoder layer, a ModuleList, a Sequential, batch_first=False."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(E, E, dtype=torch.float64)
        self.enc = nn.TransformerEncoderLayer(E, H, 2 * E, dropout=0.0, batch_first=True, dtype=torch.float64)
        self.stack = nn.ModuleList([Wrap(make_mha()), nn.Sequential(nn.ReLU(), Wrap(make_mha()))])
        self.seq_first = make_mha(batch_first=False)

    def forward(self, x, src_mask=None, is_causal=False):
        h = self.enc(self.inp(x), src_mask=src_mask, is_causal=is_causal)
        for m in self.stack:
            h = h + m(h)
        hs = h.transpose(0, 1)  # [L, N, E] for the batch_first=False MHA
        return h + self.seq_first(hs, hs, hs, need_weights=False)[0].transpose(0, 1)


def mha_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]


@pytest.fixture
def x():
    torch.manual_seed(1)
    return torch.randn(N, L, E, dtype=torch.float64)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_nested_model_outputs_unchanged(mode, causal, x):
    torch.manual_seed(0)
    model = Net().train(mode == "train")
    names = mha_names(model)
    assert names == ["enc.self_attn", "stack.0.inner", "stack.1.1.inner", "seq_first"]
    converted = convert_attention(copy.deepcopy(model))
    assert mha_names(converted) == []
    adapters = {n: m for n, m in converted.named_modules() if isinstance(m, SelfAttentionAdapter)}
    assert sorted(adapters) == sorted(names)
    assert adapters["seq_first"].batch_first is False
    assert all(m.attention.training == (mode == "train") for m in adapters.values())
    kwargs = dict(src_mask=torch.ones(L, L, dtype=torch.bool).triu(1), is_causal=True) if causal else {}
    with torch.no_grad():
        with sdpa_kernel(SDPBackend.MATH):
            ref = model(x, **kwargs)
        out = converted(x, **kwargs)
    assert not torch.equal(ref, torch.zeros_like(ref))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    # parameters are the same numbers, in the attention modules BackPACK/curvlinops see
    for n in names:
        a = adapters[n].attention
        assert isinstance(a, MultiheadSelfAttention)
        torch.testing.assert_close(a.in_proj_weight, model.get_submodule(n).in_proj_weight, rtol=0, atol=0)


@pytest.mark.parametrize("fastpath", [True, False], ids=["fastpath", "nofastpath"])
def test_encoder_layer_eval_fast_path(fastpath, x):
    """In eval + no_grad torch may run the whole encoder layer fused; the converted one must not differ."""
    torch.manual_seed(2)
    layer = nn.TransformerEncoderLayer(E, H, 2 * E, dropout=0.0, batch_first=True, dtype=torch.float64).eval()
    converted = convert_attention(copy.deepcopy(layer))
    old = torch.backends.mha.get_fastpath_enabled()
    try:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        with torch.no_grad():
            ref = layer(x)
            out = converted(x)
    finally:
        torch.backends.mha.set_fastpath_enabled(old)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


def test_converted_model_gradients_match(x):
    torch.manual_seed(3)
    model = Net()
    converted = convert_attention(copy.deepcopy(model))
    with sdpa_kernel(SDPBackend.MATH):
        model(x).square().sum().backward()
    converted(x).square().sum().backward()
    ref = dict(model.named_parameters())
    got = dict(converted.named_parameters())
    rename = {"attention.out_proj_weight": "out_proj.weight", "attention.out_proj_bias": "out_proj.bias",
              "attention.in_proj_weight": "in_proj_weight", "attention.in_proj_bias": "in_proj_bias"}
    assert len(got) == len(ref)
    for n, p in got.items():
        for new, old in rename.items():
            n = n.replace(new, old)
        torch.testing.assert_close(p.grad, ref[n].grad, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("average", [True, False])
@pytest.mark.parametrize("masks", ["none", "padding", "causal"])
def test_need_weights_equal(batch_first, average, masks, x):
    torch.manual_seed(4)
    mha = make_mha(batch_first=batch_first)
    adapter = convert_attention(copy.deepcopy(mha))
    assert isinstance(adapter, SelfAttentionAdapter)  # a top-level MHA is returned converted
    inp = x if batch_first else x.transpose(0, 1).contiguous()
    kwargs = dict(need_weights=True, average_attn_weights=average)
    if masks == "padding":
        kpm = torch.zeros(N, L, dtype=torch.bool)
        kpm[0, 2:] = True
        kpm[2, 0] = True
        kwargs["key_padding_mask"] = kpm
    elif masks == "causal":
        kwargs.update(attn_mask=torch.ones(L, L, dtype=torch.bool).triu(1), is_causal=True)
    with sdpa_kernel(SDPBackend.MATH):
        out_ref, w_ref = mha(inp, inp, inp, **kwargs)
    out, w = adapter(inp, inp, inp, **kwargs)
    assert w.shape == w_ref.shape == ((N, L, L) if average else (N, H, L, L))
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w, w_ref, rtol=1e-10, atol=1e-12)
    out2, w2 = adapter(inp, inp, inp, **{**kwargs, "need_weights": False})
    assert w2 is None
    torch.testing.assert_close(out2, out_ref, rtol=1e-10, atol=1e-12)


def test_adapter_keeps_training_mode():
    mha = make_mha().eval()
    assert convert_attention(mha).training is False


def test_float_attn_mask(x):
    mha = make_mha()
    adapter = convert_attention(copy.deepcopy(mha))
    mask = torch.zeros(L, L, dtype=torch.float64).masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
    with sdpa_kernel(SDPBackend.MATH):
        ref = mha(x, x, x, attn_mask=mask, need_weights=False)[0]
    torch.testing.assert_close(adapter(x, x, x, attn_mask=mask, need_weights=False)[0], ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("fastpath", [True, False], ids=["fastpath", "nofastpath"])
def test_encoder_stack_with_key_padding_mask(mode, fastpath, x):
    """nn.TransformerEncoder(Layer) hands self_attn float 0/-inf masks (it canonicalises bool ones)."""
    torch.manual_seed(5)
    layer = nn.TransformerEncoderLayer(E, H, 2 * E, dropout=0.0, batch_first=True, dtype=torch.float64)
    enc = nn.TransformerEncoder(layer, 2).train(mode == "train")
    converted = convert_attention(copy.deepcopy(enc))
    assert len(mha_names(enc)) == 2 and mha_names(converted) == []
    kpm = torch.zeros(N, L, dtype=torch.bool)
    kpm[0, 3:] = True
    kpm[1, 0] = True
    old = torch.backends.mha.get_fastpath_enabled()
    try:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        with torch.no_grad():
            with sdpa_kernel(SDPBackend.MATH):
                ref = enc(x, src_key_padding_mask=kpm)
            out = converted(x, src_key_padding_mask=kpm)
    finally:
        torch.backends.mha.set_fastpath_enabled(old)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


def test_adapter_float_key_padding_mask(x):
    mha = make_mha()
    adapter = convert_attention(copy.deepcopy(mha))
    kpm = torch.zeros(N, L, dtype=torch.bool)
    kpm[2, 1:3] = True
    fkpm = torch.zeros(N, L, dtype=torch.float64).masked_fill(kpm, float("-inf"))
    with sdpa_kernel(SDPBackend.MATH):
        ref, w_ref = mha(x, x, x, key_padding_mask=kpm)
    out, w = adapter(x, x, x, key_padding_mask=fkpm)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w, w_ref, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="key_padding_mask"):
        adapter(x, x, x, key_padding_mask=torch.randn(N, L, dtype=torch.float64))  # additive biases


# ---- refusals ------------------------------------------------------------------------------------
class Holder(nn.Module):
    def __init__(self, bad):
        super().__init__()
        self.good = make_mha()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Identity(), bad)])


@pytest.mark.parametrize("kw,match", [
    (dict(kdim=4, vdim=4), "kdim"),
    (dict(vdim=3), "vdim"),
    (dict(dropout=0.1), "dropout"),
    (dict(add_bias_kv=True), "add_bias_kv"),
    (dict(add_zero_attn=True), "add_zero_attn"),
])
def test_refuses_unconvertible_with_module_name(kw, match):
    model = Holder(nn.MultiheadAttention(E, H, batch_first=True, **kw))
    with pytest.raises(ValueError, match=match) as info:
        convert_attention(model)
    assert "blocks.0.1" in str(info.value)
    # nothing was replaced: the check runs before any replacement
    assert isinstance(model.good, nn.MultiheadAttention)
    with pytest.raises(ValueError, match=match):
        MultiheadSelfAttention.from_torch(model.blocks[0][1])


def test_cross_attention_call_raises(x):
    model = convert_attention(Holder(nn.Identity()))
    y = torch.randn(N, L, E, dtype=torch.float64)
    with pytest.raises(ValueError, match="good.*cross-attention"):
        model.good(x, y, y)
    with pytest.raises(ValueError, match="cross-attention"):
        model.good(x, x, y)
    with pytest.raises(ValueError, match="cross-attention"):
        model.good(x, x.clone(), x.clone())  # equal values, different tensors: refused, not guessed


def test_is_causal_without_mask_raises(x):
    adapter = convert_attention(make_mha())
    with pytest.raises(ValueError, match="is_causal"):
        adapter(x, x, x, is_causal=True)


def test_convert_rejects_non_module():
    with pytest.raises(TypeError, match="nn.Module"):
        convert_attention("not a model")


def test_round_trip_through_adapter(x):
    mha = make_mha(batch_first=False)
    adapter = SelfAttentionAdapter.from_torch(mha)
    back = adapter.to_torch()
    assert back.batch_first is False
    for p, q in zip(mha.parameters(), back.parameters()):
        assert torch.equal(p, q)
