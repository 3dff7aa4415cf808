"""Closed-form LayerNorm nodes of the cached operator graph against torch.func (float64)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import hessian, jvp

from backpack_attention.derivatives.function import linear_backward
from backpack_attention.derivatives.layernorm import CachedLayerNorm, layer_norm_nodes
from reference import rel_error

DT = torch.float64
TOL = 1e-12


@pytest.mark.parametrize("shape, affine", [((5,), True), ((3, 4), True), ((5,), False)])
def test_jvp_by_double_vjp_and_hessian(shape, affine):
    g = torch.Generator().manual_seed(0)
    ln = nn.LayerNorm(shape, elementwise_affine=affine, dtype=DT)
    if affine:
        with torch.no_grad():
            ln.weight.copy_(torch.randn(shape, generator=g, dtype=DT))
            ln.bias.copy_(torch.randn(shape, generator=g, dtype=DT))
    ln.requires_grad_(False)  # the cached node replaces torch's only when LN's parameters are fixed
    x = torch.randn(2, 3, *shape, generator=g, dtype=DT)
    dx = torch.randn_like(x)
    w = torch.randn_like(x)
    f = lambda x: nn.functional.layer_norm(x, shape, ln.weight, ln.bias, ln.eps)  # noqa: E731
    _, ref_jvp = jvp(f, (x,), (dx,))

    xr = x.clone().requires_grad_(True)
    with layer_norm_nodes(ln):
        y = ln(xr)
    assert type(y.grad_fn).__name__ == CachedLayerNorm.__name__ + "Backward"
    assert torch.equal(y, f(x))
    # the double-VJP trick inside linear_backward: closed-form transposed Jacobian and its JVP
    u = torch.zeros_like(y, requires_grad=True)
    with linear_backward():
        (Jt_u,) = torch.autograd.grad(y, xr, u, create_graph=True)
    (Jdx,) = torch.autograd.grad(Jt_u, u, dx)
    assert rel_error(Jdx, ref_jvp) < TOL
    # outside linear_backward: PyTorch's backward, whose double backward gives the exact Hessian
    (gx,) = torch.autograd.grad((w * y).sum(), xr, create_graph=True)
    (Hdx,) = torch.autograd.grad(gx, xr, dx)
    H = hessian(lambda x: (w * f(x)).sum())(x).reshape(x.numel(), x.numel())
    assert rel_error(Hdx, (H @ dx.flatten()).reshape(x.shape)) < TOL


def test_trainable_parameters_keep_torch_node():
    ln = nn.LayerNorm(4, dtype=DT)
    x = torch.randn(2, 4, dtype=DT, requires_grad=True)
    with layer_norm_nodes(ln):
        y = ln(x)
    assert type(y.grad_fn).__name__ == "NativeLayerNormBackward0"
    ln.requires_grad_(False)
    with layer_norm_nodes(ln):
        y = ln(x)
    assert type(y.grad_fn).__name__ == CachedLayerNorm.__name__ + "Backward"


def test_input_without_graph_is_left_alone():
    ln = nn.LayerNorm(4, dtype=DT)
    x = torch.randn(2, 4, dtype=DT)
    with layer_norm_nodes(ln):
        y = ln(x)
    assert type(y.grad_fn).__name__ == "NativeLayerNormBackward0" and torch.equal(y, ln(x))
