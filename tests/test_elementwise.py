"""Closed-form activation nodes (derivatives/elementwise.py) against autograd, float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from backpack_attention.derivatives.elementwise import activation_nodes, tanh_gelu_derivatives

transformers = pytest.importorskip("transformers")
from transformers.activations import NewGELUActivation  # noqa: E402

DT = torch.float64


def test_tanh_gelu_derivatives_match_autograd():
    x = 3 * torch.randn(200, dtype=DT, generator=torch.Generator().manual_seed(0))
    f = NewGELUActivation()
    d1 = torch.func.vmap(torch.func.grad(f))(x)
    d2 = torch.func.vmap(torch.func.grad(torch.func.grad(f)))(x)
    a1, a2 = tanh_gelu_derivatives(x)
    torch.testing.assert_close(a1, d1, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(a2, d2, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("batched", [False, True])
def test_hooked_gradients_and_hessian_products_equal_autograd(batched):
    g = torch.Generator().manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 7, dtype=DT), NewGELUActivation(), nn.Linear(7, 3, dtype=DT))
    x = torch.randn(4, 6, 5, dtype=DT, generator=g)
    w = torch.randn(4, 6, 3, dtype=DT, generator=g)
    ps = list(model.parameters())
    V = [torch.randn(*((3,) if batched else ()), *p.shape, dtype=DT, generator=g) for p in ps]

    def products(hooked):
        if hooked:
            with activation_nodes(model):
                y = model(x)
            assert any(type(n).__name__ == "CachedActivationBackward" for n in _nodes(y.grad_fn))
        else:
            y = model(x)
        loss = (w * y).pow(2).sum() + (w * y).sum()
        grads = torch.autograd.grad(loss, ps, create_graph=True)
        return y, grads, torch.autograd.grad(grads, ps, V, is_grads_batched=batched)

    y1, g1, h1 = products(True)
    y0, g0, h0 = products(False)
    assert torch.equal(y1, y0)  # the module's own forward values
    for a, b in zip(g1 + h1, g0 + h0):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)


def test_inputs_without_graph_and_other_modules_are_left_alone():
    model = nn.Sequential(nn.GELU(approximate="tanh"), NewGELUActivation())
    with activation_nodes(model) as ctx:
        y = model(torch.randn(3, dtype=DT))
    assert y.grad_fn is None and [type(m).__name__ for m in ctx.modules] == ["NewGELUActivation"]


def _nodes(fn, seen=None):
    seen = set() if seen is None else seen
    if fn is None or fn in seen:
        return seen
    seen.add(fn)
    for nxt, _ in fn.next_functions:
        _nodes(nxt, seen)
    return seen


def test_a_module_that_only_shares_the_class_name_keeps_autograd():
    """Matching is by class name; a different function under that name gets no closed-form node."""

    class NewGELUActivation(nn.Module):  # not HF's: a different function
        def forward(self, x):
            return torch.tanh(x) * x

    model = nn.Sequential(nn.Linear(3, 3, dtype=DT), NewGELUActivation())
    x = torch.randn(2, 3, dtype=DT, generator=torch.Generator().manual_seed(2))
    ps = list(model.parameters())
    with activation_nodes(model):
        y = model(x)
    assert type(y.grad_fn).__name__ != "CachedActivationBackward"
    g = torch.autograd.grad(y.sum(), ps, create_graph=True)
    h = torch.autograd.grad(g, ps, [torch.ones_like(p) for p in ps])
    y0 = model(x)
    g0 = torch.autograd.grad(y0.sum(), ps, create_graph=True)
    h0 = torch.autograd.grad(g0, ps, [torch.ones_like(p) for p in ps])
    for a, b in zip(h, h0):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
