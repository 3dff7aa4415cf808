"""MultiheadSelfAttention against nn.MultiheadAttention, hand-written references and autograd.

References always run under ``sdpa_kernel(SDPBackend.MATH)`` (the kernel with every derivative);
our module runs with the default kernel selection (a fused kernel on CPU) unless a test says
otherwise.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from backpack_attention import MultiheadSelfAttention, SelfAttentionAdapter, param_index

DTYPES = [torch.float64, torch.float32]
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-4, atol=1e-5)}
BLOCKS = ("W_Q", "W_K", "W_V", "b_Q", "b_K", "b_V", "W_O", "b_O")


def math_kernel():
    return sdpa_kernel(SDPBackend.MATH)


def random_case(seed, dtype, bias=True, max_heads=4):
    """A random nn.MultiheadAttention(batch_first=True), our copy of it and an input."""
    rng = random.Random(seed)
    H = rng.randint(1, max_heads)
    d = rng.randint(1, 4)
    E, N, L = H * d, rng.randint(1, 3), rng.randint(1, 6)
    torch.manual_seed(seed)
    mha = nn.MultiheadAttention(E, H, bias=bias, batch_first=True, dtype=dtype)
    if bias:  # torch initialises biases to 0: make them generic
        with torch.no_grad():
            mha.in_proj_bias.normal_()
            mha.out_proj.bias.normal_()
    x = torch.randn(N, L, E, dtype=dtype)
    return mha, x


def causal_bool(L):
    """torch's bool attn_mask for causal attention: True above the diagonal = not allowed."""
    return torch.ones(L, L, dtype=torch.bool).triu(1)


def random_padding(N, L, seed, causal):
    """Random bool key_padding_mask [N, L] that leaves every query at least one key."""
    g = torch.Generator().manual_seed(seed)
    kpm = torch.rand(N, L, generator=g) < 0.4
    kpm[:, 0] = False  # key 0 is visible to every query, causal or not
    if not causal and L > 1:  # without causality, masking key 0 is fine if the last key is visible
        kpm[:, 0] = torch.rand(N, generator=g) < 0.5
        kpm[:, -1] = False
    return kpm


def torch_reference(mha, x, causal, kpm):
    """Output of nn.MultiheadAttention under the math kernel (causal via mask + is_causal)."""
    kwargs = dict(key_padding_mask=kpm, need_weights=False)
    if causal:
        kwargs.update(attn_mask=causal_bool(x.shape[1]), is_causal=True)
    with math_kernel():
        return mha(x, x, x, **kwargs)[0]


# ---- forward equality ------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("padding", [False, True], ids=["nopad", "pad"])
@pytest.mark.parametrize("seed", range(3))
def test_forward_matches_torch_train(dtype, bias, causal, padding, seed):
    mha, x = random_case(seed, dtype, bias)
    mha.train()
    ours = MultiheadSelfAttention.from_torch(mha, causal=causal)
    assert ours.training
    kpm = random_padding(x.shape[0], x.shape[1], seed, causal) if padding else None
    ref = torch_reference(mha, x, causal, kpm)
    out = ours(x, kpm)  # default kernel selection
    assert out.shape == x.shape and out.dtype == dtype
    torch.testing.assert_close(out, ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fastpath", [True, False], ids=["fastpath", "nofastpath"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("padding", [False, True], ids=["nopad", "pad"])
def test_forward_matches_torch_eval(dtype, fastpath, causal, padding):
    mha, x = random_case(11, dtype, max_heads=3)
    mha.eval()
    ours = MultiheadSelfAttention.from_torch(mha, causal=causal)
    assert not ours.training
    kpm = random_padding(x.shape[0], x.shape[1], 5, causal) if padding else None
    kwargs = dict(key_padding_mask=kpm, need_weights=False)
    if causal:
        kwargs.update(attn_mask=causal_bool(x.shape[1]), is_causal=True)
    old = torch.backends.mha.get_fastpath_enabled()
    try:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        with torch.no_grad():  # the fast path needs no_grad
            ref = mha(x, x, x, **kwargs)[0]
    finally:
        torch.backends.mha.set_fastpath_enabled(old)
    with torch.no_grad():
        out = ours(x, kpm)
    torch.testing.assert_close(out, ref, **TOL[dtype])


def test_attention_weights_match_torch():
    torch.manual_seed(3)
    mha = nn.MultiheadAttention(8, 4, batch_first=True, dtype=torch.float64)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    ours = MultiheadSelfAttention.from_torch(mha, causal=True)
    with math_kernel():
        _, A_ref = mha(x, x, x, attn_mask=causal_bool(5), average_attn_weights=False)
    torch.testing.assert_close(ours.attention_weights(x), A_ref, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_round_trip_exact(dtype, bias):
    mha, x = random_case(7, dtype, bias)
    mha.eval()
    ours = MultiheadSelfAttention.from_torch(mha)
    back = ours.to_torch()
    assert isinstance(back, nn.MultiheadAttention) and back.batch_first
    assert not back.training
    assert [n for n, _ in back.named_parameters()] == [n for n, _ in mha.named_parameters()]
    for (n, p), (_, q) in zip(mha.named_parameters(), back.named_parameters()):
        assert p.dtype == q.dtype and torch.equal(p, q), n
    names = [n for n in ["in_proj_weight", "in_proj_bias", "out_proj_weight", "out_proj_bias"]
             if bias or "bias" not in n]
    assert [n for n, _ in ours.named_parameters()] == names
    assert torch.equal(ours.out_proj_weight, mha.out_proj.weight)
    again = MultiheadSelfAttention.from_torch(back)
    for p, q in zip(ours.parameters(), again.parameters()):
        assert torch.equal(p, q)
    assert ours.to_torch(batch_first=False).batch_first is False


def test_from_torch_copies_not_shares():
    mha, x = random_case(2, torch.float64)
    ours = MultiheadSelfAttention.from_torch(mha)
    with torch.no_grad():
        ours.in_proj_weight.add_(1.0)
    assert not torch.equal(ours.in_proj_weight, mha.in_proj_weight)


def test_to_torch_refuses_linear_attention():
    with pytest.raises(ValueError, match="linear"):
        MultiheadSelfAttention(4, 2, attention="linear").to_torch()


# ---- linear attention ---------------------------------------------------------------------------
def linear_attention_reference(m: MultiheadSelfAttention, x, kpm=None):
    """Hand-written: masked raw scores / sqrt(d_head), A @ V, out projection (SPEC §1.1, §6.2)."""
    N, L, E = x.shape
    H, d = m.num_heads, E // m.num_heads
    W, b = m.in_proj_weight, m.in_proj_bias
    out = torch.zeros(N, L, E, dtype=x.dtype)
    for n in range(N):
        heads = []
        for h in range(H):
            proj = []
            for s in range(3):
                r = slice(s * E + h * d, s * E + (h + 1) * d)
                proj.append(x[n] @ W[r].T + (b[r] if b is not None else 0))
            q, k, v = proj
            T = q @ k.T / math.sqrt(d)
            mask = torch.ones(L, L, dtype=x.dtype)
            if m.causal:
                mask = mask.tril()
            if kpm is not None:
                mask = mask * (~kpm[n]).to(x.dtype)[None, :]
            heads.append((T * mask) @ v)
        out[n] = torch.cat(heads, dim=1) @ m.out_proj_weight.T
        if m.out_proj_bias is not None:
            out[n] = out[n] + m.out_proj_bias
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("padding", [False, True], ids=["nopad", "pad"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_linear_attention_matches_reference(dtype, causal, padding, bias):
    torch.manual_seed(4)
    m = MultiheadSelfAttention(6, 3, bias=bias, causal=causal, attention="linear", dtype=dtype)
    if bias:
        with torch.no_grad():
            m.in_proj_bias.normal_()
            m.out_proj_bias.normal_()
    x = torch.randn(2, 5, 6, dtype=dtype)
    kpm = random_padding(2, 5, 1, causal) if padding else None
    with torch.no_grad():
        torch.testing.assert_close(m(x, kpm), linear_attention_reference(m, x, kpm), **TOL[dtype])


# ---- derivatives ------------------------------------------------------------------------------
def _loss_weights(x, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(x.shape, generator=g, dtype=x.dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("padding", [False, True], ids=["nopad", "pad"])
def test_gradients_match_torch(dtype, causal, padding):
    mha, x = random_case(5, dtype)
    ours = MultiheadSelfAttention.from_torch(mha, causal=causal)
    kpm = random_padding(x.shape[0], x.shape[1], 2, causal) if padding else None
    w = _loss_weights(x)
    x1 = x.clone().requires_grad_()
    (torch_reference(mha, x1, causal, kpm) * w).sum().backward()
    x2 = x.clone().requires_grad_()
    (ours(x2, kpm) * w).sum().backward()  # default (fused) kernel
    torch.testing.assert_close(x2.grad, x1.grad, **TOL[dtype])
    ref = [mha.in_proj_weight.grad, mha.in_proj_bias.grad, mha.out_proj.weight.grad, mha.out_proj.bias.grad]
    for g, r in zip([p.grad for p in ours.parameters()], ref):
        torch.testing.assert_close(g, r, **TOL[dtype])


def _functional_losses(mha, ours, x, causal, kpm):
    """Scalar losses of (params, x) for torch MHA (math kernel) and ours (default kernel)."""
    w = _loss_weights(x, 1)

    def torch_loss(p, xx):
        kwargs = dict(key_padding_mask=kpm, need_weights=False)
        if causal:
            kwargs.update(attn_mask=causal_bool(xx.shape[1]), is_causal=True)
        with math_kernel():
            out = functional_call(mha, p, (xx, xx, xx), kwargs)[0]
        return (torch.sin(out) * w).sum()  # non-quadratic: the functional Hessian is non-zero

    def our_loss(p, xx):
        return (torch.sin(functional_call(ours, p, (xx, kpm))) * w).sum()

    torch_names = ["in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"]
    p_torch = {n: mha.get_parameter(n).detach() for n in torch_names}
    p_ours = {n: p.detach() for n, p in ours.named_parameters()}
    return torch_loss, our_loss, p_torch, p_ours


def _as_ours(tree):
    return [tree[n] for n in ["in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"]]


@pytest.mark.parametrize("causal,padding", [(False, False), (True, False), (True, True), (False, True)])
def test_torch_func_hessian_with_fused_kernel(causal, padding):
    mha, x = random_case(8, torch.float64, max_heads=3)
    ours = MultiheadSelfAttention.from_torch(mha, causal=causal)
    kpm = random_padding(x.shape[0], x.shape[1], 3, causal) if padding else None
    torch_loss, our_loss, p_torch, p_ours = _functional_losses(mha, ours, x, causal, kpm)
    H_ref = hessian(torch_loss, argnums=(0, 1))(p_torch, x)
    H = hessian(our_loss, argnums=(0, 1))(p_ours, x)
    # H[0] = {param a: (d/d params {param b: block}, d/dx block)}, H[1] = (d/d params, d/dx)
    ref_pp = _as_ours({a: _as_ours(H_ref[0][a][0]) for a in H_ref[0]})
    ours_pp = [list(H[0][a][0].values()) for a in H[0]]
    assert list(H[0]) == list(p_ours) and len(ours_pp) == 4
    assert any(float(b.abs().max()) > 1e-3 for row in ref_pp for b in row)
    for row, ref_row in zip(ours_pp, ref_pp):
        for b, r in zip(row, ref_row):
            torch.testing.assert_close(b, r, rtol=1e-9, atol=1e-11)
    # input-input and input-parameter blocks
    torch.testing.assert_close(H[1][1], H_ref[1][1], rtol=1e-9, atol=1e-11)
    for b, r in zip(H[1][0].values(), _as_ours(H_ref[1][0])):
        torch.testing.assert_close(b, r, rtol=1e-9, atol=1e-11)


def test_double_backward_hvp_with_fused_kernel():
    mha, x = random_case(9, torch.float64)
    ours = MultiheadSelfAttention.from_torch(mha, causal=True)
    torch_loss, our_loss, p_torch, p_ours = _functional_losses(mha, ours, x, True, None)
    g = torch.Generator().manual_seed(0)
    v = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in p_ours.values()]

    def hvp(loss_fn, params, vec):
        leaves = {n: p.clone().requires_grad_() for n, p in params.items()}
        grads = torch.autograd.grad(loss_fn(leaves, x), list(leaves.values()), create_graph=True)
        dot = sum((gr * vv).sum() for gr, vv in zip(grads, vec))
        return torch.autograd.grad(dot, list(leaves.values()))

    ref = hvp(torch_loss, p_torch, v)
    out = hvp(our_loss, p_ours, v)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_torch_func_jvp_with_fused_kernel(dtype, causal):
    mha, x = random_case(10, dtype)
    ours = MultiheadSelfAttention.from_torch(mha, causal=causal)
    torch_loss, our_loss, p_torch, p_ours = _functional_losses(mha, ours, x, causal, None)
    g = torch.Generator().manual_seed(1)
    t_ours = {n: torch.randn(p.shape, generator=g, dtype=dtype) for n, p in p_ours.items()}
    t_x = torch.randn(x.shape, generator=g, dtype=dtype)
    names = dict(zip(p_ours, p_torch))
    t_torch = {names[n]: t for n, t in t_ours.items()}
    val_ref, tan_ref = jvp(torch_loss, (p_torch, x), (t_torch, t_x))
    val, tan = jvp(our_loss, (p_ours, x), (t_ours, t_x))
    torch.testing.assert_close(val, val_ref, **TOL[dtype])
    torch.testing.assert_close(tan, tan_ref, **TOL[dtype])


def test_fused_kernel_lacks_forward_ad_in_torch():
    """The premise of docs/fused_kernels.md: torch's default MHA path has no forward-mode AD.

    If this starts failing, torch closed the gap: update the docs (our module must still work).
    """
    mha, x = random_case(1, torch.float64)
    p = {n: q.detach() for n, q in mha.named_parameters()}
    t = {n: torch.ones_like(q) for n, q in p.items()}

    def f(params):
        return functional_call(mha, params, (x, x, x), dict(need_weights=False))[0].sum()

    with pytest.raises((NotImplementedError, RuntimeError), match="forward AD|not implemented"):
        jvp(f, (p,), (t,))


# ---- param_index -------------------------------------------------------------------------------
def encoded(E, H, bias):
    """A module whose parameter entries encode (param id, row, col) as 10^6 id + 10^3 row + col."""
    m = MultiheadSelfAttention(E, H, bias=bias, dtype=torch.float64)
    with torch.no_grad():
        for pid, name in enumerate(["in_proj_weight", "in_proj_bias", "out_proj_weight", "out_proj_bias"]):
            p = getattr(m, name)
            if p is None:
                continue
            rows = torch.arange(p.shape[0], dtype=torch.float64)
            cols = torch.arange(p.shape[1], dtype=torch.float64) if p.dim() == 2 else torch.zeros(1, dtype=torch.float64)
            code = 1e6 * pid + 1e3 * rows[:, None] + cols[None, :]
            p.copy_(code.reshape(p.shape))
    return m


def code(pid, row, col=0):
    return 1e6 * pid + 1e3 * row + col


def expected_codes(name, E, H, head):
    """Codes of block ``name`` built from the SPEC §5.3 table (torch row-major order)."""
    d = E // H
    heads = range(H) if head is None else [head]
    s = {"Q": 0, "K": 1, "V": 2}.get(name[-1])
    if name in ("W_Q", "W_K", "W_V"):  # W^h[a, c] = in_proj_weight[s*E + h*d + c, a]
        return [code(0, s * E + h * d + c, a) for h in heads for c in range(d) for a in range(E)]
    if name in ("b_Q", "b_K", "b_V"):  # b^h[c] = in_proj_bias[s*E + h*d + c]
        return [code(1, s * E + h * d + c) for h in heads for c in range(d)]
    if name == "W_O":  # W_O[h*d + e, o] = out_proj.weight[o, h*d + e]
        cols = [h * d + e for h in heads for e in range(d)]
        return [code(2, o, c) for o in range(E) for c in cols]
    return [code(3, o) for o in range(E)]  # b_O


@pytest.mark.parametrize("E,H", [(4, 1), (6, 2), (12, 3), (8, 4)])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_param_index_matches_spec_table(E, H, bias):
    m = encoded(E, H, bias)
    flat = torch.cat([p.reshape(-1) for p in m.parameters()])
    names = [n for n in BLOCKS if bias or not n.startswith("b_")]
    seen = []
    for name in names:
        for head in [None] + ([] if name == "b_O" else list(range(H))):
            idx = param_index(m, name, head)
            assert idx.dtype == torch.long
            assert flat[idx].tolist() == expected_codes(name, E, H, head), (name, head)
            if head is not None or name == "b_O":
                seen.append(idx)
    # the per-head blocks partition the parameters
    allidx = torch.cat(seen).sort().values
    assert torch.equal(allidx, torch.arange(flat.numel()))


def test_param_index_same_for_torch_and_adapter():
    mha = nn.MultiheadAttention(6, 3, batch_first=True)
    ours = MultiheadSelfAttention.from_torch(mha)
    adapter = SelfAttentionAdapter.from_torch(mha)
    for name in BLOCKS:
        for head in [None] + ([] if name == "b_O" else [0, 2]):
            a = param_index(ours, name, head)
            assert torch.equal(a, param_index(mha, name, head))
            assert torch.equal(a, param_index(adapter, name, head))
    # torch's own parameter order gives the same flattening
    assert torch.equal(torch.cat([p.reshape(-1) for p in mha.parameters()]),
                       torch.cat([p.reshape(-1) for p in ours.parameters()]))


def test_param_index_selects_gradient_of_a_head():
    """Semantic check: zeroing head h's W_V rows changes nothing in the gradient of other heads' W_V."""
    torch.manual_seed(0)
    m = MultiheadSelfAttention(6, 3, dtype=torch.float64)
    x = torch.randn(2, 4, 6, dtype=torch.float64)
    m(x).square().sum().backward()
    g = torch.cat([p.grad.reshape(-1) for p in m.parameters()])
    d = 2
    direct = m.in_proj_weight.grad[2 * 6 + 1 * d: 2 * 6 + 2 * d]  # W_V of head 1 (torch layout)
    torch.testing.assert_close(g[param_index(m, "W_V", 1)], direct.reshape(-1), rtol=0, atol=0)
    direct_o = m.out_proj_weight.grad[:, 1 * d: 2 * d]
    torch.testing.assert_close(g[param_index(m, "W_O", 1)], direct_o.reshape(-1), rtol=0, atol=0)


def test_param_index_errors():
    m = MultiheadSelfAttention(4, 2, bias=False)
    for name in ("b_Q", "b_K", "b_V", "b_O"):
        with pytest.raises(ValueError, match="bias=False"):
            param_index(m, name)
    m = MultiheadSelfAttention(4, 2)
    with pytest.raises(ValueError, match="W_Q"):
        param_index(m, "W_X")
    for bad in (2, -1, 1.0, True):
        with pytest.raises(ValueError, match="head"):
            param_index(m, "W_Q", bad)
    with pytest.raises(ValueError, match="b_O"):
        param_index(m, "b_O", 0)
    with pytest.raises(TypeError, match="convert_attention"):
        param_index(nn.Linear(4, 4), "W_Q")
    with pytest.raises(ValueError, match="kdim"):
        param_index(nn.MultiheadAttention(4, 2, kdim=3, vdim=3), "W_Q")


# ---- bad inputs ------------------------------------------------------------------------------
@pytest.mark.parametrize("E,H", [(6, 4), (5, 2), (3, 6)])
def test_embed_dim_not_divisible(E, H):
    with pytest.raises(ValueError, match=f"embed_dim \\({E}\\) must be divisible by num_heads \\({H}\\)"):
        MultiheadSelfAttention(E, H)


@pytest.mark.parametrize("kwargs,match", [
    (dict(embed_dim=0, num_heads=1), "embed_dim"),
    (dict(embed_dim=4, num_heads=0), "num_heads"),
    (dict(embed_dim=4.0, num_heads=1), "embed_dim"),
    (dict(embed_dim=4, num_heads=2, attention="sigmoid"), "attention"),
])
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MultiheadSelfAttention(**kwargs)


def _bad_inputs():
    N, L, E = 2, 4, 6
    x = torch.randn(N, L, E)
    return [
        ("x 2-D", (torch.randn(L, E),), ValueError, "shape"),
        ("x 4-D", (torch.randn(1, N, L, E),), ValueError, "shape"),
        ("x last dim", (torch.randn(N, L, E + 1),), ValueError, "E=6"),
        ("x int", (torch.ones(N, L, E, dtype=torch.long),), TypeError, "floating"),
        ("x dtype", (torch.randn(N, L, E, dtype=torch.float64),), TypeError, "float64"),
        ("x list", ([[0.0] * E],), TypeError, "Tensor"),
        ("kpm shape", (x, torch.zeros(N, L + 1, dtype=torch.bool)), ValueError, "key_padding_mask"),
        ("kpm transposed", (x, torch.zeros(L, N, dtype=torch.bool)), ValueError, "key_padding_mask"),
        ("kpm int", (x, torch.zeros(N, L, dtype=torch.long)), TypeError, "key_padding_mask"),
        ("kpm fully masked", (x, torch.ones(N, L, dtype=torch.bool)), ValueError, "fully masked"),
        ("attn_mask shape", (x, None, torch.zeros(L, L + 1, dtype=torch.bool)), ValueError, "attn_mask"),
        ("attn_mask additive", (x, None, torch.randn(L, L)), ValueError, "attn_mask"),
    ]


@pytest.mark.parametrize("case", _bad_inputs(), ids=lambda c: c[0])
def test_bad_inputs_raise_before_any_work(case, monkeypatch):
    _, args, exc, match = case
    torch.manual_seed(0)
    m = MultiheadSelfAttention(6, 2, causal=True)
    before = [p.detach().clone() for p in m.parameters()]
    args_before = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    calls = []
    real = m.project_qkv
    monkeypatch.setattr(m, "project_qkv", lambda t: calls.append(1) or real(t))
    with pytest.raises(exc, match=match):
        m(*args)
    assert calls == [], "the projections ran before the input was rejected"
    for p, b in zip(m.parameters(), before):
        assert torch.equal(p, b) and p.grad is None
    for a, b in zip(args, args_before):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)
    # the module still works afterwards
    assert m(torch.randn(2, 4, 6)).shape == (2, 4, 6)
