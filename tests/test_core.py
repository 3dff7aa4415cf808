"""Closed-form products of the attention core against torch.func, with and without chunking.

The chunked path (slices of the leading dimensions, :data:`core.CHUNK_BYTES`) is what long
sequences take; tests force it with a tiny chunk size so that it runs on small shapes.
"""

from __future__ import annotations

import pytest
import torch
from torch.func import grad, jacrev, jvp, vjp

from backpack_attention.derivatives import core
from backpack_attention.derivatives.core import (
    attention_matrix,
    core_forward,
    core_hvp,
    core_jvp,
    core_vjp,
)
from backpack_attention.derivatives.function import (
    CachedSoftmaxCore,
    SoftmaxAttentionCore,
    cached_attention,
    linear_backward,
    softmax_attention,
)
from reference import rel_error

DT = torch.float64
TOL = 1e-10



def _inputs(N=3, H=2, L=5, d=3, seed=0, mask=None):
    g = torch.Generator().manual_seed(seed)
    Q, K, V, dQ, dK, dV, G_O = (torch.randn(N, H, L, d, generator=g, dtype=DT) for _ in range(7))
    allowed = None
    if mask == "causal":
        allowed = torch.ones(L, L, dtype=torch.bool).tril()[None, None]
    elif mask == "padding":
        allowed = torch.ones(N, 1, L, L, dtype=torch.bool)
        allowed[0, ..., L - 2:] = False
        allowed[2, ..., 1] = False
    return Q, K, V, dQ, dK, dV, G_O, allowed


@pytest.fixture(params=[None, 1, 200], ids=["unchunked", "chunk-1-byte", "chunk-200-bytes"])
def chunk_bytes(request, monkeypatch):
    if request.param is not None:
        monkeypatch.setattr(core, "CHUNK_BYTES", request.param)
    return request.param


@pytest.mark.parametrize("kind", ["softmax", "linear"])
@pytest.mark.parametrize("mask", [None, "causal", "padding"])
def test_core_products_match_torch_func(chunk_bytes, kind, mask):
    Q, K, V, dQ, dK, dV, G_O, allowed = _inputs(mask=mask)
    f = lambda Q, K, V: core_forward(Q, K, V, allowed, kind)[0]  # noqa: E731
    A = attention_matrix(Q, K, allowed, kind)
    _, ref_jvp = jvp(f, (Q, K, V), (dQ, dK, dV))
    _, pullback = vjp(f, Q, K, V)
    ref_vjp = pullback(G_O)
    # Hessian of <G_O, O(Q, K, V)> along (dQ, dK, dV): the tangent of its gradient
    _, ref_hvp = jvp(grad(lambda Q, K, V: (G_O * f(Q, K, V)).sum(), argnums=(0, 1, 2)), (Q, K, V), (dQ, dK, dV))
    O = A @ V
    for A_ in (A, None if kind == "softmax" else A):  # softmax may recompute A chunk by chunk
        for O_ in (None, O):  # with the output, softmax row sums come from O (fewer L x L passes)
            assert rel_error(core_jvp(Q, K, V, A_, dQ, dK, dV, kind, allowed, O=O_), ref_jvp) < TOL
            assert rel_error(core_jvp(Q, K, V, A_, None, dK, None, kind, allowed, O=O_),
                        jvp(f, (Q, K, V), (0 * dQ, dK, 0 * dV))[1]) < TOL
            for a, b in zip(core_vjp(Q, K, V, A_, G_O, kind, allowed, O=O_), ref_vjp):
                assert rel_error(a, b) < TOL
            out = core_hvp(Q, K, V, A_, G_O, dQ, dK, dV, kind, allowed, O=O_)
            for a, b in zip(out[:3], ref_hvp):
                assert rel_error(a, b) < TOL
            assert rel_error(out[3], ref_jvp) < TOL
    # zero (None) tangents
    assert rel_error(core_jvp(Q, K, V, A, None, dK, None, kind, allowed), jvp(f, (Q, K, V), (0 * dQ, dK, 0 * dV))[1]) < TOL
    _, ref_hvp_v = jvp(grad(lambda Q, K, V: (G_O * f(Q, K, V)).sum(), argnums=(0, 1, 2)), (Q, K, V), (0 * dQ, 0 * dK, dV))
    for a, b in zip(core_hvp(Q, K, V, A, G_O, None, None, dV, kind, allowed)[:3], ref_hvp_v):
        assert rel_error(a, b, ref_hvp_v[0].norm()) < TOL


def test_broadcast_leading_dimensions(chunk_bytes):
    """Cotangents with an extra leading axis (BackPACK's [V, N, H, L, d]) broadcast against A."""
    Q, K, V, _, _, _, _, allowed = _inputs(mask="padding")
    G = torch.randn(4, *Q.shape, dtype=DT, generator=torch.Generator().manual_seed(1))
    A = attention_matrix(Q, K, allowed)
    f = lambda Q, K, V: core_forward(Q, K, V, allowed)[0]  # noqa: E731
    out = core_vjp(Q, K, V, A, G, allowed=allowed)
    _, pullback = vjp(f, Q, K, V)
    for v in range(4):
        for a, b in zip(out, pullback(G[v])):
            assert rel_error(a[v], b) < TOL
    dO = core_jvp(Q, K, V, A, G, None, None, allowed=allowed)
    for v in range(4):
        assert rel_error(dO[v], jvp(f, (Q, K, V), (G[v], 0 * K, 0 * V))[1]) < TOL


def test_chunking_really_slices(monkeypatch):
    """With a tiny chunk size, ``chunked`` calls the kernel once per [L, L] matrix."""
    Q, K, V, dQ, dK, dV, G_O, _ = _inputs(N=3, H=2)
    calls = []

    def f(*args):
        calls.append(args[0].shape)
        return (args[0] * 2,)

    monkeypatch.setattr(core, "CHUNK_BYTES", 1)
    (out,) = core.chunked(f, Q, K, L=Q.shape[-2])
    assert len(calls) == 6 and all(s[:2] == (1, 1) for s in calls)
    assert torch.equal(out, 2 * Q)


def test_chunk_size_per_device():
    """Cache-sized slices on the CPU; on accelerators chunks only bound memory (no tiny kernels)."""
    assert core.chunk_bytes(torch.device("cpu")) == core.CHUNK_BYTES
    assert core.chunk_bytes(torch.device("cuda", 0)) == core.ACCELERATOR_CHUNK_BYTES > 100 * core.CHUNK_BYTES


def test_autograd_functions_second_order(chunk_bytes):
    """Fused and cached cores: Hessians (double backward) and forward mode equal the math path."""
    Q, K, V, dQ, dK, dV, G_O, allowed = _inputs(mask="padding")
    math = lambda Q, K, V: (G_O * core_forward(Q, K, V, allowed)[0]).sum()  # noqa: E731
    fused = lambda Q, K, V: (G_O * SoftmaxAttentionCore.apply(Q, K, V, allowed, False)).sum()  # noqa: E731

    def cached(Q, K, V):
        with cached_attention():
            return (G_O * softmax_attention(Q, K, V, allowed)).sum()

    ref = jacrev(jacrev(math, argnums=(0, 1, 2)), argnums=(0, 1, 2))(Q, K, V)
    scale = max(r.norm() for row in ref for r in row)
    assert ref[2][2].norm() == 0 and ref[0][0].norm() > 0  # (V, V) vanishes, (Q, Q) does not
    for fun in (fused, cached):
        hess = torch.autograd.functional.hessian(fun, (Q, K, V))
        for i in range(3):
            for j in range(3):
                assert rel_error(hess[i][j], ref[i][j], scale) < TOL
    _, t_ref = jvp(lambda Q, K, V: core_forward(Q, K, V, allowed)[0], (Q, K, V), (dQ, dK, dV))
    _, t = jvp(lambda Q, K, V: SoftmaxAttentionCore.apply(Q, K, V, allowed, False), (Q, K, V), (dQ, dK, dV))
    assert rel_error(t, t_ref) < TOL
    # linear_backward: the recorded backward graph is linear in the cotangent; its derivative in
    # the cotangent is the JVP (the double-VJP trick), with Q, K, V held constant
    Qr, Kr, Vr = (t.clone().requires_grad_(True) for t in (Q, K, V))
    with cached_attention():
        O = softmax_attention(Qr, Kr, Vr, allowed)
    u = torch.zeros_like(O, requires_grad=True)
    with linear_backward():
        gQ, gK, gV = torch.autograd.grad(O, (Qr, Kr, Vr), u, create_graph=True)
    (Jv,) = torch.autograd.grad((gQ, gK, gV), u, (dQ, dK, dV))
    assert rel_error(Jv, t_ref) < TOL
    assert type(O.grad_fn).__name__ == CachedSoftmaxCore.__name__ + "Backward"
