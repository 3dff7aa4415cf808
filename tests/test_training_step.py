"""The training step: first-order gradients through torch's fused SDPA backward.

:class:`SoftmaxAttentionCore` records torch's own graph of the fused kernel in forward and
differentiates through it in a plain backward; the closed forms (``core_vjp``, ``core_jvp``) take
over only for double backward, forward mode and torch.func transforms. References are
``nn.MultiheadAttention`` under the math kernel (float64).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.utils.checkpoint
from torch import nn
from torch.func import functional_call, grad, hessian, jvp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

import backpack_attention.derivatives.function as function
from backpack_attention import MultiheadSelfAttention
from backpack_attention.derivatives.core import core_forward
from backpack_attention.derivatives.function import SoftmaxAttentionCore

ROOT = Path(__file__).resolve().parents[1]
DT = torch.float64
TOL = 1e-10


def rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def case(seed=0, bias=True, N=3, L=7, E=12, H=3, dtype=DT):
    torch.manual_seed(seed)
    mha = nn.MultiheadAttention(E, H, bias=bias, batch_first=True, dtype=dtype)
    if bias:  # torch initialises biases to 0: make them generic
        with torch.no_grad():
            mha.in_proj_bias.normal_()
            mha.out_proj.bias.normal_()
    x = torch.randn(N, L, E, dtype=dtype)
    G = torch.randn(N, L, E, dtype=dtype)
    return mha, x, G


def padding(N, L, seed=1):
    g = torch.Generator().manual_seed(seed)
    kpm = torch.rand(N, L, generator=g) < 0.4
    kpm[:, 0] = False  # every query (causal or not) sees key 0
    return kpm


def torch_grads(mha, x, G, causal, kpm, math=True):
    """Gradients (in_proj_weight, [in_proj_bias], out_proj.weight, [out_proj.bias], x) of <G, mha(x)>."""
    x = x.clone().requires_grad_()
    kw = dict(key_padding_mask=kpm, need_weights=False)
    if causal:
        kw.update(attn_mask=torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).triu(1), is_causal=True)
    params = [mha.in_proj_weight, mha.in_proj_bias, mha.out_proj.weight, mha.out_proj.bias]
    params = [p for p in params if p is not None]
    if math:
        with sdpa_kernel(SDPBackend.MATH):
            out = mha(x, x, x, **kw)[0]
    else:
        out = mha(x, x, x, **kw)[0]
    return torch.autograd.grad(out, params + [x], G)


def our_grads(ours, x, G, kpm, create_graph=False):
    x = x.clone().requires_grad_()
    out = ours(x, kpm)
    return torch.autograd.grad(out, list(ours.parameters()) + [x], G, create_graph=create_graph)


@pytest.fixture
def vjp_calls(monkeypatch):
    """Counts calls of the closed-form ``core_vjp`` from :class:`SoftmaxAttentionCore`."""
    calls = []
    original = function.core_vjp

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(function, "core_vjp", counting)
    return calls


@pytest.fixture
def sdpa_calls(monkeypatch):
    """``(grad mode, q.requires_grad)`` of each SDPA call made by :class:`SoftmaxAttentionCore`."""
    calls = []
    original = function.F.scaled_dot_product_attention

    def spy(q, *args, **kwargs):
        if sys._getframe(1).f_globals is vars(function):  # not nn.MultiheadAttention's calls
            calls.append((torch.is_grad_enabled(), q.requires_grad))
        return original(q, *args, **kwargs)

    monkeypatch.setattr(function.F, "scaled_dot_product_attention", spy)
    return calls


# ---- first order: equal to nn.MultiheadAttention, through the fused backward -------------------
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("pad", [False, True], ids=["nopad", "pad"])
@pytest.mark.parametrize("seed", range(2))
def test_gradients_match_torch_math_kernel(bias, causal, pad, seed, vjp_calls):
    mha, x, G = case(seed, bias)
    ours = MultiheadSelfAttention.from_torch(mha, causal=causal)
    kpm = padding(x.shape[0], x.shape[1], seed) if pad else None
    ref = torch_grads(mha, x, G, causal, kpm)
    out = our_grads(ours, x, G, kpm)  # default kernel selection
    assert len(out) == len(ref) == (5 if bias else 3)
    for a, b in zip(out, ref):
        assert a.dtype == DT and rel(a, b) < TOL
    assert vjp_calls == []  # the fused backward, not the closed form


def test_gradients_with_attn_mask_and_padding(vjp_calls):
    """A general bool ``attn_mask`` together with padding (neither is ``is_causal``)."""
    mha, x, G = case(4)
    L = x.shape[1]
    attn_mask = torch.rand(L, L, generator=torch.Generator().manual_seed(2)) < 0.3
    attn_mask.fill_diagonal_(False)
    kpm = padding(x.shape[0], L, 3)
    kpm[:, :] = False
    kpm[0, 1:3] = True
    attn_mask[:, 0] = False
    xr = x.clone().requires_grad_()
    with sdpa_kernel(SDPBackend.MATH):
        ref_out = mha(xr, xr, xr, key_padding_mask=kpm, attn_mask=attn_mask, need_weights=False)[0]
    ref = torch.autograd.grad(ref_out, list(mha.parameters()) + [xr], G)
    ours = MultiheadSelfAttention.from_torch(mha)
    xo = x.clone().requires_grad_()
    out = torch.autograd.grad(ours(xo, kpm, attn_mask), list(ours.parameters()) + [xo], G)
    for a, b in zip(out, ref):
        assert rel(a, b) < TOL
    assert vjp_calls == []


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_float32_gradients_match_torch_default_kernel(causal):
    """float32, both sides on the default (fused) kernel: the same backward, so nearly equal."""
    mha, x, G = case(5, dtype=torch.float32, L=33, E=16, H=2)
    ours = MultiheadSelfAttention.from_torch(mha, causal=causal)
    ref = torch_grads(mha, x, G, causal, None, math=False)
    for a, b in zip(our_grads(ours, x, G, None), ref):
        assert a.dtype == torch.float32 and rel(a, b) < 1e-5


def test_core_backward_uses_torch_fused_node():
    """The recorded graph is a single fused-SDPA node whose saved tensors are O(L d) (no L x L)."""
    N, H, L, d = 2, 3, 32, 4
    Q, K, V = (torch.randn(N, H, L, d, dtype=DT, requires_grad=True) for _ in range(3))
    keys = torch.ones(N, 1, 1, L, dtype=torch.bool)
    keys[0, ..., 5:9] = False
    for allowed, causal in ((None, True), (None, False), (keys.expand(N, 1, L, L), False)):
        O = SoftmaxAttentionCore.apply(Q, K, V, allowed, causal)
        q, _, _, out = O.grad_fn.fused
        node = out.grad_fn
        assert "ScaledDotProduct" in type(node).__name__
        assert all(type(f).__name__ == "AccumulateGrad" for f, _ in node.next_functions)
        saved = [getattr(node, a) for a in dir(node) if a.startswith("_saved_")]
        saved = [t for t in saved if isinstance(t, torch.Tensor)]
        assert saved and max(t.numel() for t in saved) <= N * H * L * d  # no [.., L, L] tensor
        assert q.data_ptr() == Q.data_ptr() and out.data_ptr() == O.data_ptr()  # no copies


@pytest.mark.parametrize("reentrant", [False, True], ids=["nonreentrant", "reentrant"])
def test_activation_checkpointing_uses_fused_backward(reentrant, vjp_calls):
    """torch.utils.checkpoint recomputes the forward in backward (and records the graph again)."""
    mha, x, G = case(13)
    ours = MultiheadSelfAttention.from_torch(mha, causal=True)
    ref = our_grads(ours, x, G, None)
    xr = x.clone().requires_grad_()
    out = torch.utils.checkpoint.checkpoint(ours, xr, use_reentrant=reentrant)
    out.backward(G)
    for a, b in zip([p.grad for p in ours.parameters()] + [xr.grad], ref):
        assert rel(a, b) < TOL
    assert vjp_calls == []


# ---- which path runs when --------------------------------------------------------------------
def test_plain_backward_uses_fused_and_create_graph_uses_closed_form(vjp_calls):
    mha, x, G = case(6)
    ours = MultiheadSelfAttention.from_torch(mha, causal=True)
    our_grads(ours, x, G, None)
    assert vjp_calls == []
    grads = our_grads(ours, x, G, None, create_graph=True)
    assert len(vjp_calls) == 1 and grads[0].requires_grad and grads[-1].requires_grad  # W_in, x


def test_double_backward_matches_torch(vjp_calls):
    """Hessian-vector product (double backward) of <G, f(x)> in the parameters and the input."""
    mha, x, G = case(7)
    kpm = padding(x.shape[0], x.shape[1], 4)
    ours = MultiheadSelfAttention.from_torch(mha, causal=True)

    def hvp(module, call):
        xr = x.clone().requires_grad_()
        leaves = list(module.parameters()) + [xr]
        vec = [torch.randn(t.shape, generator=torch.Generator().manual_seed(i), dtype=DT) for i, t in enumerate(leaves)]
        out = call(xr)
        grads = torch.autograd.grad((torch.sin(out) * G).sum(), leaves, create_graph=True)
        return torch.autograd.grad(sum((a * v).sum() for a, v in zip(grads, vec)), leaves)

    mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).triu(1)
    with sdpa_kernel(SDPBackend.MATH):
        ref = hvp(mha, lambda xr: mha(xr, xr, xr, key_padding_mask=kpm, attn_mask=mask, is_causal=True,
                                      need_weights=False)[0])
    out = hvp(ours, lambda xr: ours(xr, kpm))
    for a, b in zip(out, ref):
        assert rel(a, b) < 1e-9
    assert len(vjp_calls) == 1


def test_retained_graph_second_backward_is_closed_form(vjp_calls):
    """The recorded graph is used once; a second backward through a retained graph is exact too."""
    mha, x, G = case(8)
    ours = MultiheadSelfAttention.from_torch(mha, causal=True)
    xr = x.clone().requires_grad_()
    out = ours(xr)
    first = torch.autograd.grad(out, [xr, ours.in_proj_weight], G, retain_graph=True)
    assert vjp_calls == []
    second = torch.autograd.grad(out, [xr, ours.in_proj_weight], G)
    assert len(vjp_calls) == 1
    for a, b in zip(first, second):
        assert rel(a, b) < TOL


def test_only_needed_gradients():
    """Inputs that do not require grad get none (the fused graph is built for the others)."""
    N, H, L, d = 2, 2, 6, 3
    Q, K = (torch.randn(N, H, L, d, dtype=DT) for _ in range(2))
    V = torch.randn(N, H, L, d, dtype=DT, requires_grad=True)
    dO = torch.randn(N, H, L, d, dtype=DT)
    O = SoftmaxAttentionCore.apply(Q, K, V, None, True)
    (gV,) = torch.autograd.grad(O, V, dO)
    allowed = torch.ones(L, L, dtype=torch.bool).tril()
    ref = core_forward(Q, K, V.detach(), allowed)[1].transpose(-1, -2) @ dO
    assert rel(gV, ref) < TOL


def test_no_graph_recorded_without_grad(sdpa_calls):
    """no_grad / inference_mode / parameters without grad: one plain kernel call, nothing recorded."""
    mha, x, _ = case(9)
    ours = MultiheadSelfAttention.from_torch(mha, causal=True)
    with torch.no_grad():
        ours(x)
    with torch.inference_mode():
        ours(x)
    for p in ours.parameters():
        p.requires_grad_(False)
    ours(x)
    assert sdpa_calls == [(False, False)] * 3
    Q = torch.randn(1, 1, 4, 2, dtype=DT, requires_grad=True)
    with torch.inference_mode():  # leaves that require grad, inference mode: nothing recorded
        O = SoftmaxAttentionCore.apply(Q, Q, Q, None, False)
    assert O.grad_fn is None and sdpa_calls[-1] == (False, True)
    with torch.no_grad():  # grad mode off: no node, so whatever forward saw is not kept
        O = SoftmaxAttentionCore.apply(Q, Q, Q, None, False)
    assert O.grad_fn is None and function._fused.graph is None
    for p in ours.parameters():
        p.requires_grad_(True)
    ours(x)
    assert sdpa_calls[-1] == (True, True)  # the training forward records the kernel's graph
    assert function._fused.graph is None  # handed over to the autograd node


# ---- higher order and torch.func still work (closed forms) -----------------------------------
def _losses(mha, ours, x, causal):
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=DT)
    names = ["in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"]

    def torch_loss(p, xx):
        kw = dict(need_weights=False)
        if causal:
            kw.update(attn_mask=torch.ones(xx.shape[1], xx.shape[1], dtype=torch.bool).triu(1), is_causal=True)
        with sdpa_kernel(SDPBackend.MATH):
            return (torch.sin(functional_call(mha, dict(zip(names, p)), (xx, xx, xx), kw)[0]) * w).sum()

    def our_loss(p, xx):
        return (torch.sin(functional_call(ours, dict(zip(names[:2] + ["out_proj_weight", "out_proj_bias"], p)),
                                          (xx,))) * w).sum()

    params = tuple(p.detach() for p in ours.parameters())
    return torch_loss, our_loss, params


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_torch_func_jvp_hessian_vmap(causal, sdpa_calls):
    mha, x, _ = case(10, N=2, L=4, E=6, H=2)
    ours = MultiheadSelfAttention.from_torch(mha, causal=causal)
    torch_loss, our_loss, params = _losses(mha, ours, x, causal)
    g = torch.Generator().manual_seed(5)
    tangents = tuple(torch.randn(p.shape, generator=g, dtype=DT) for p in params)
    t_x = torch.randn(x.shape, generator=g, dtype=DT)
    _, tan = jvp(our_loss, (params, x), (tangents, t_x))
    _, tan_ref = jvp(torch_loss, (params, x), (tangents, t_x))
    assert rel(tan, tan_ref) < TOL
    H = hessian(our_loss, argnums=1)(params, x)
    H_ref = hessian(torch_loss, argnums=1)(params, x)
    assert rel(H, H_ref) < 1e-9
    # per-sample gradients with vmap(grad) equal a loop of plain (fused) backward passes
    per_sample = vmap(grad(lambda p, xx: our_loss(p, xx[None])), in_dims=(None, 0))(params, x)
    for n in range(x.shape[0]):
        ps = [p.clone().requires_grad_() for p in params]
        loop = torch.autograd.grad(our_loss(ps, x[n:n + 1]), ps)
        for a, b in zip(per_sample, loop):
            assert rel(a[n], b) < TOL
    # functorch transforms never record the kernel's graph (forward stays a pure function)
    assert len(sdpa_calls) == 3 + x.shape[0]
    assert (True, True) not in sdpa_calls[:3] and sdpa_calls[3:] == [(True, True)] * x.shape[0]


def test_forward_ad_of_core_matches_math():
    N, H, L, d = 2, 2, 5, 3
    g = torch.Generator().manual_seed(0)
    Q, K, V, dQ, dK, dV = (torch.randn(N, H, L, d, generator=g, dtype=DT) for _ in range(6))
    allowed = torch.ones(L, L, dtype=torch.bool).tril()
    _, t = jvp(lambda Q, K, V: SoftmaxAttentionCore.apply(Q, K, V, allowed, True), (Q, K, V), (dQ, dK, dV))
    _, t_ref = jvp(lambda Q, K, V: core_forward(Q, K, V, allowed)[0], (Q, K, V), (dQ, dK, dV))
    assert rel(t, t_ref) < TOL


def test_torch_compile_still_works():
    """Under torch.compile the core keeps to its pure forward and closed-form backward."""
    mha, x, G = case(12, dtype=torch.float32, L=9, E=12, H=3)
    ours = MultiheadSelfAttention.from_torch(mha, causal=True)
    ref = our_grads(ours, x, G, None)
    compiled = torch.compile(ours)
    xr = x.clone().requires_grad_()
    out = torch.autograd.grad(compiled(xr), list(ours.parameters()) + [xr], G)
    for a, b in zip(out, ref):
        assert rel(a, b) < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_gradients_match_torch(dtype):
    mha, x, G = case(11, dtype=dtype, L=64, E=64, H=2)
    mha, x, G = mha.cuda(), x.cuda(), G.cuda()
    ours = MultiheadSelfAttention.from_torch(mha, causal=True)
    ref = torch_grads(mha, x, G, True, None, math=False)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for a, b in zip(our_grads(ours, x, G, None), ref):
        assert a.device == b.device and rel(a.float(), b.float()) < tol
    grads = our_grads(ours, x, G, None, create_graph=True)  # closed form on the GPU
    assert grads[0].requires_grad
    if dtype == torch.float32:
        assert rel(grads[0], ref[0]) < tol


# ---- the benchmark script keeps running -------------------------------------------------------
def test_training_step_benchmark_quick(tmp_path):
    report = tmp_path / "ts.md"
    proc = subprocess.run([sys.executable, "benchmarks/training_step.py", "--quick", "--repeats", "1",
                           "--out", str(report)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = report.read_text()
    assert "ours / fastest torch" in text and "is_causal" in text and "Target" in text
