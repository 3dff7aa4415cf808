"""Adapters for attention of other libraries (docs/adapters.md): the SDPA drop-in against torch's
math kernel, the routing mechanism, and a nanoGPT-style model converted end to end.

Library models (HuggingFace, timm) are in test_adapters_hf.py and test_adapters_timm.py; they
import the helpers below (``check_conversion``, ``check_operators``).
"""

from __future__ import annotations

import copy
import re
import math
import pickle
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import backpack_attention as ba
from backpack_attention.adapters import converted_modules, find_other_attention, scaled_dot_product_attention
from backpack_attention.derivatives.function import cached_attention
from reference import batch_weights, dense_ggn, dense_hessian_double_backward, rel_error

DT = torch.float64


# ---------------------------------------------------------------------------------------------
# helpers shared with the library test files
# ---------------------------------------------------------------------------------------------
def perturb_norms(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial LayerNorm weights and biases (their Hessian rows are where torch.func is wrong)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm) and m.weight is not None:
                m.weight.add_(0.3 * torch.randn(m.weight.shape, generator=g, dtype=m.weight.dtype))
                m.bias.add_(0.3 * torch.randn(m.bias.shape, generator=g, dtype=m.bias.dtype))


def hvp_double_backward(model, loss_func, params, batches, V):
    """``H @ V`` (``V [P, K]``) of the empirical risk by double backward on ``model`` under the math
    SDPA kernel: the columns of ``dense_hessian_double_backward`` along ``V``, at ``K`` backward passes."""
    params = list(params)
    out = torch.zeros_like(V)
    with sdpa_kernel(SDPBackend.MATH):
        for (X, y), w in zip(batches, batch_weights(loss_func, batches)):
            g = torch.autograd.grad(w * loss_func(model(X), y), params, create_graph=True)
            flat = torch.cat([t.reshape(-1) for t in g])
            for k in range(V.shape[1]):
                rows = torch.autograd.grad(flat, params, V[:, k], retain_graph=True, allow_unused=True)
                out[:, k] += torch.cat([torch.zeros(p.numel(), dtype=V.dtype) if r is None else r.reshape(-1)
                                        for r, p in zip(rows, params)])
    return out


def check_operators(ref, ours, loss_func, data, batch_size_fn=None, K=3, dense_hessian=False, tol=1e-10):
    """Whole-model Hessian and GGN products of our operators on ``ours`` (all parameters) equal
    double-backward / reverse-mode references on the original ``ref`` (math SDPA kernel)."""
    ref_params, params = list(ref.parameters()), list(ours.parameters())
    P = sum(p.numel() for p in params)
    V = torch.randn(P, K, dtype=DT, generator=torch.Generator().manual_seed(3))
    if dense_hessian:
        HV_ref = dense_hessian_double_backward(ref, loss_func, ref_params, data) @ V
    else:
        HV_ref = hvp_double_backward(ref, loss_func, ref_params, data, V)
    GV_ref = dense_ggn(ref, loss_func, ref_params, data) @ V
    kw = dict(batch_size_fn=batch_size_fn) if batch_size_fn is not None else {}
    H = ba.AttentionHessianLinearOperator(ours, loss_func, params, data, **kw)
    G = ba.AttentionGGNLinearOperator(ours, loss_func, params, data, **kw)
    assert rel_error(H @ V, HV_ref) < tol
    assert rel_error(G @ V, GV_ref) < tol


def check_conversion(model, call, expected_kinds):
    """Convert a deep copy of ``model``: same parameter objects and state_dict keys, the expected
    modules converted, outputs equal in eval (and train) mode; converting again changes nothing.
    Returns the converted copy."""
    ref = model
    ours = copy.deepcopy(model)
    params, keys = list(ours.parameters()), list(ours.state_dict())
    assert ba.convert_attention(ours) is ours
    assert len(list(ours.parameters())) == len(params) and all(a is b for a, b in zip(ours.parameters(), params))
    assert list(ours.state_dict()) == keys
    kinds = sorted({k for _, k in converted_modules(ours)})
    assert kinds == sorted(expected_kinds), kinds
    assert ours._backpack_attention_converted == converted_modules(ours)
    for training in (False, True):
        ref.train(training), ours.train(training)
        with sdpa_kernel(SDPBackend.MATH):
            r = call(ref)
        torch.testing.assert_close(call(ours), r, rtol=1e-12, atol=1e-12)
    ref.eval(), ours.eval()
    before = converted_modules(ours)
    assert ba.convert_attention(ours) is ours  # twice: harmless
    assert converted_modules(ours) == before
    torch.testing.assert_close(call(ours), call(ref), rtol=1e-12, atol=1e-12)
    return ours


def assert_untouched(model, snapshot):
    """``model`` is as ``snapshot`` (a deepcopy taken before a refused conversion)."""
    assert converted_modules(model) == []
    assert [n for n, _ in model.named_modules()] == [n for n, _ in snapshot.named_modules()]
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    assert not hasattr(model, "_backpack_attention_converted")


def check_dropout_refused(model, call, name: str, p: float):
    """A model in training mode whose attention ``name`` (a regex of ``"path (Class)"``) has dropout
    ``p``: conversion refuses it and leaves it untouched; converted in eval mode, a call in training
    mode refuses it."""
    snapshot = copy.deepcopy(model)
    with pytest.raises(ValueError, match=name + r": attention dropout p=" + re.escape(str(p))):
        ba.convert_attention(model)
    assert_untouched(model, snapshot)
    ba.convert_attention(model.eval())
    model.train()
    with pytest.raises(ValueError, match=name + r": attention dropout"):
        call(model)


# ---------------------------------------------------------------------------------------------
# the SDPA drop-in against torch's math kernel
# ---------------------------------------------------------------------------------------------
def _derivatives(f, q, k, v, kw, seed=0, jvp=True):
    """Output, gradient, a Hessian-vector product (double backward) and a jvp of ``f``."""
    g = torch.Generator().manual_seed(seed)
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    o = f(qq, kk, vv, **kw)
    w = torch.randn(o.shape, dtype=DT, generator=g)
    grads = torch.autograd.grad((o * w).sum(), (qq, kk, vv), create_graph=True)
    us = [torch.randn(t.shape, dtype=DT, generator=g) for t in grads]
    hvp = torch.autograd.grad(sum((a * u).sum() for a, u in zip(grads, us)), (qq, kk, vv))
    out = [o.detach(), *(t.detach() for t in grads), *hvp]
    if jvp:
        tangents = tuple(torch.randn(t.shape, dtype=DT, generator=g) for t in (q, k, v))
        out.append(torch.func.jvp(lambda a, b, c: f(a, b, c, **kw), (q, k, v), tangents)[1])
    return out


def _qkv(N=2, H=3, L=5, d=4, dv=None, Hkv=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(N, H, L, d, dtype=DT, generator=g)
    k = torch.randn(N, Hkv or H, L, d, dtype=DT, generator=g)
    v = torch.randn(N, Hkv or H, L, dv or d, dtype=DT, generator=g)
    return q, k, v


def _masks(N=2, L=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    allowed = torch.rand(N, 1, L, L, generator=g) > 0.4
    allowed[..., 0] = True
    allowed[0, 0, 2] = False  # a query row that attends to nothing (0 output, as torch)
    neg_inf = torch.zeros(N, 1, L, L, dtype=DT).masked_fill(~allowed, float("-inf"))
    hf = torch.zeros(N, 1, L, L, dtype=DT).masked_fill(~allowed, torch.finfo(DT).min)
    hf[0, 0, 2] = float("-inf")  # fully masked rows must be -inf (finite ones are refused)
    return allowed, neg_inf, hf


ALLOWED, NEG_INF, FINFO_MIN = _masks()
CASES = {
    "plain": dict(),
    "causal": dict(is_causal=True),
    "bool": dict(attn_mask=ALLOWED),
    "bool-2d-scale": dict(attn_mask=ALLOWED[1, 0], scale=1.3),
    "neg-inf": dict(attn_mask=NEG_INF),
    "finfo-min": dict(attn_mask=FINFO_MIN),
    "key-padding": dict(attn_mask=ALLOWED[:, :, :1]),
    "scale": dict(scale=0.7),
    "causal-scale": dict(is_causal=True, scale=0.3),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sdpa_equals_torch_math_kernel(case):
    q, k, v = _qkv(dv=6)
    kw = CASES[case]
    with sdpa_kernel(SDPBackend.MATH):
        ref = _derivatives(F.scaled_dot_product_attention, q, k, v, kw)
    ours = _derivatives(scaled_dot_product_attention, q, k, v, kw)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", ["three-d", "gqa", "broadcast-batch"])
def test_sdpa_shapes_equal_torch_math_kernel(case):
    if case == "three-d":
        q, k, v = (t[:, 0] for t in _qkv())
        kw = dict(attn_mask=ALLOWED[:, 0])
    elif case == "gqa":
        q, k, v = _qkv(H=6, Hkv=2)
        kw = dict(enable_gqa=True, is_causal=True)
    else:
        q, k, v = _qkv()
        q = q[:1]  # one query set against a batch of keys and values
        kw = dict(attn_mask=ALLOWED)
    with sdpa_kernel(SDPBackend.MATH):
        ref = _derivatives(F.scaled_dot_product_attention, q, k, v, kw)
    ours = _derivatives(scaled_dot_product_attention, q, k, v, kw)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", ["causal", "bool", "finfo-min"])
def test_sdpa_in_the_operators_cached_forward(case):
    """Inside cached_attention() (the operators' forward) the cached core gives the same values,
    gradients and double-backward products."""
    q, k, v = _qkv()
    kw = CASES[case]
    with sdpa_kernel(SDPBackend.MATH):
        ref = _derivatives(F.scaled_dot_product_attention, q, k, v, kw, jvp=False)
    with cached_attention():
        ours = _derivatives(scaled_dot_product_attention, q, k, v, kw, jvp=False)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_sdpa_refusals():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="dropout"):
        scaled_dot_product_attention(q, k, v, dropout_p=0.1)
    bias = torch.randn(5, 5, dtype=DT)
    with pytest.raises(ValueError, match="additive attention bias"):
        scaled_dot_product_attention(q, k, v, attn_mask=bias)
    with pytest.raises(ValueError, match="requires grad"):
        scaled_dot_product_attention(q, k, v, attn_mask=torch.zeros(5, 5, dtype=DT, requires_grad=True))
    finite = torch.zeros(5, 5, dtype=DT)
    finite[1] = torch.finfo(DT).min
    with pytest.raises(ValueError, match="finite values"):
        scaled_dot_product_attention(q, k, v, attn_mask=finite)
    with pytest.raises(ValueError, match="cross-attention or a KV cache"):
        scaled_dot_product_attention(q, k[:, :, :3], v[:, :, :3])
    with pytest.raises(RuntimeError, match="is_causal"):
        scaled_dot_product_attention(q, k, v, attn_mask=ALLOWED, is_causal=True)


# ---------------------------------------------------------------------------------------------
# a nanoGPT-style model (fused qkv Linear + F.scaled_dot_product_attention)
# ---------------------------------------------------------------------------------------------
class CausalSelfAttention(nn.Module):
    """nanoGPT's attention (model.py), unchanged apart from the constructor's arguments."""

    def __init__(self, n_embd, n_head, bias=True, dropout=0.0, block_size=8):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.attn_dropout = nn.Dropout(dropout)
        self.resid_dropout = nn.Dropout(dropout)
        self.n_head, self.n_embd, self.dropout = n_head, n_embd, dropout
        self.flash = hasattr(torch.nn.functional, "scaled_dot_product_attention")
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if self.flash:
            y = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=None, dropout_p=self.dropout if self.training else 0, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
            att = self.attn_dropout(F.softmax(att, dim=-1))
            y = att @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class Block(nn.Module):
    def __init__(self, n_embd, n_head, dropout=0.0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout=dropout)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 2 * n_embd), nn.GELU(), nn.Linear(2 * n_embd, n_embd))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    """Token + position embeddings, blocks, final LayerNorm, tied LM head; logits ``[N, V, T]``."""

    def __init__(self, vocab=5, n_embd=4, n_head=2, n_layer=2, block_size=8, dropout=0.0):
        super().__init__()
        self.wte = nn.Embedding(vocab, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.h = nn.ModuleList([Block(n_embd, n_head, dropout) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)
        self.wte.weight = self.lm_head.weight  # weight tying, as nanoGPT

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x)).transpose(1, 2)


def _nanogpt(seed=0, **kw):
    torch.manual_seed(seed)
    model = NanoGPT(**kw).to(DT)
    perturb_norms(model, seed)
    g = torch.Generator().manual_seed(seed)
    data = [(torch.randint(0, 5, (2, 4), generator=g), torch.randint(0, 5, (2, 4), generator=g)) for _ in range(2)]
    return model, data


def test_nanogpt_conversion_outputs_and_curvature():
    ref, data = _nanogpt()
    X = data[0][0]
    ours = check_conversion(ref, lambda m: m(X), ["fused-qkv.CausalSelfAttention"])
    assert [n for n, _ in converted_modules(ours)] == ["h.0.attn", "h.1.attn"]
    assert ours.wte.weight is ours.lm_head.weight
    # the training step runs (fused forward, torch's backward) and matches the math kernel
    loss = nn.CrossEntropyLoss()
    g = torch.autograd.grad(loss(ours(X), data[0][1]), list(ours.parameters()))
    with sdpa_kernel(SDPBackend.MATH):
        g_ref = torch.autograd.grad(loss(ref(X), data[0][1]), list(ref.parameters()))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    check_operators(ref, ours, loss, data, dense_hessian=True)


def test_nanogpt_torch_func_hessian_and_double_backward_work():
    """Fused SDPA has no double backward or forward-mode AD; the converted model has both."""
    ref, data = _nanogpt(seed=1, n_layer=1)
    ours = ba.convert_attention(copy.deepcopy(ref))
    X, y = data[0]
    loss = nn.CrossEntropyLoss()
    w = ours.h[0].attn.c_attn.weight
    f = lambda W: loss(torch.func.functional_call(ours, {"h.0.attn.c_attn.weight": W}, (X,)), y)  # noqa: E731
    f_ref = lambda W: loss(torch.func.functional_call(ref, {"h.0.attn.c_attn.weight": W}, (X,)), y)  # noqa: E731
    with sdpa_kernel(SDPBackend.MATH):
        H_ref = torch.func.hessian(f_ref)(w.detach())
    torch.testing.assert_close(torch.func.hessian(f)(w.detach()), H_ref, rtol=1e-10, atol=1e-12)


def test_nanogpt_without_flash_is_switched():
    ref, data = _nanogpt(seed=2, n_layer=1)
    ref.h[0].attn.flash = False
    ours = ba.convert_attention(copy.deepcopy(ref))
    assert ours.h[0].attn.flash is True
    torch.testing.assert_close(ours(data[0][0]), ref(data[0][0]), rtol=1e-12, atol=1e-12)


def test_nanogpt_dropout_refused_in_training_and_at_calls():
    ref, data = _nanogpt(seed=3, n_layer=1, dropout=0.1)
    model = copy.deepcopy(ref).train()
    snapshot = copy.deepcopy(model)
    with pytest.raises(ValueError, match=r"h\.0\.attn \(CausalSelfAttention\): attention dropout p=0\.1"):
        ba.convert_attention(model)
    assert_untouched(model, snapshot)
    model.eval()
    ba.convert_attention(model)  # eval mode: converted
    torch.testing.assert_close(model(data[0][0]), ref.eval()(data[0][0]), rtol=1e-12, atol=1e-12)
    model.train()
    with pytest.raises(ValueError, match=r"h\.0\.attn \(CausalSelfAttention\): attention dropout"):
        model(data[0][0])
    assert torch.overrides._get_current_function_mode_stack() == []


def test_refusal_leaves_mixed_model_untouched():
    """An nn.MultiheadAttention that could be converted is not replaced when another module is refused."""
    ref, _ = _nanogpt(seed=4, n_layer=1, dropout=0.1)
    model = nn.ModuleDict({"gpt": ref, "mha": nn.MultiheadAttention(4, 2, batch_first=True, dtype=DT)}).train()
    snapshot = copy.deepcopy(model)
    with pytest.raises(ValueError, match="gpt.h.0.attn"):
        ba.convert_attention(model)
    assert isinstance(model["mha"], nn.MultiheadAttention)
    assert_untouched(model, snapshot)
    model.eval()
    ba.convert_attention(model)
    assert sorted(k for _, k in converted_modules(model)) == ["fused-qkv.CausalSelfAttention", "torch.nn.MultiheadAttention"]


# ---------------------------------------------------------------------------------------------
# the routing mechanism
# ---------------------------------------------------------------------------------------------
class _Raises(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(4, 12, dtype=DT)

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 2)).permute(2, 0, 3, 1, 4)
        F.scaled_dot_product_attention(q, k, v)
        raise RuntimeError("boom")


def test_routing_is_local_to_the_module_and_survives_exceptions():
    ref, data = _nanogpt(seed=5, n_layer=1)
    ours = ba.convert_attention(copy.deepcopy(ref))
    q, k, v = _qkv()
    # outside the converted module torch's SDPA runs as usual (dropout is allowed there)
    F.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    bad = ba.convert_attention(nn.Sequential(_Raises()))
    with pytest.raises(RuntimeError, match="boom"):
        bad(torch.randn(2, 3, 4, dtype=DT))
    assert torch.overrides._get_current_function_mode_stack() == []
    F.scaled_dot_product_attention(q, k, v, dropout_p=0.5)  # still torch's
    torch.testing.assert_close(ours(data[0][0]), ref(data[0][0]), rtol=1e-12, atol=1e-12)


def test_routing_is_per_thread():
    """While one thread runs a converted module's forward, another thread's SDPA is torch's."""
    inside, done = threading.Event(), threading.Event()
    errors = []

    class Waits(CausalSelfAttention):
        def forward(self, x):
            inside.set()
            done.wait(10)
            return super().forward(x)

    model = ba.convert_attention(nn.Sequential(Waits(4, 2).to(DT)).eval())
    t = threading.Thread(target=lambda: model(torch.randn(1, 3, 4, dtype=DT)))
    t.start()
    inside.wait(10)
    try:
        q, k, v = _qkv()
        F.scaled_dot_product_attention(q, k, v, dropout_p=0.5)  # ours would refuse dropout
    except Exception as e:  # pragma: no cover
        errors.append(e)
    finally:
        done.set()
        t.join()
    assert not errors


def test_converted_model_copies_and_pickles():
    ref, data = _nanogpt(seed=6, n_layer=1)
    ours = ba.convert_attention(copy.deepcopy(ref))
    for clone in (copy.deepcopy(ours), pickle.loads(pickle.dumps(ours))):
        assert converted_modules(clone) == converted_modules(ours)
        torch.testing.assert_close(clone(data[0][0]), ref(data[0][0]), rtol=1e-12, atol=1e-12)
        clone.h[0].attn.train()
        clone.h[0].attn.dropout = 0.5
        with pytest.raises(ValueError, match="attention dropout"):  # routed: ours refuses
            clone(data[0][0])


def test_find_changes_nothing_and_nothing_to_convert_is_an_error():
    class Attention(nn.Module):  # attention without a fused qkv projection: not recognised
        def __init__(self):
            super().__init__()
            self.q = nn.Linear(4, 4)

        def forward(self, x):
            return F.scaled_dot_product_attention(self.q(x), x, x)

    model = nn.Sequential(Attention())
    assert find_other_attention(model) == []
    with pytest.raises(ValueError, match=r"no nn.MultiheadAttention to convert.*'0 \(Attention\)'"):
        ba.convert_attention(model)
    assert ba.convert_attention(model, strict=False) is model
    assert not hasattr(model, "_backpack_attention_converted")
