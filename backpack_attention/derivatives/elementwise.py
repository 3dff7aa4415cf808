r"""Closed-form nodes for activations that models write as chains of elementwise ops.

HuggingFace's ``NewGELUActivation`` (GPT-2's ``gelu_new``) computes the tanh-GELU
:math:`f(x) = \tfrac12 x\,(1 + \tanh u)`, :math:`u = c\,(x + a x^3)`, :math:`c = \sqrt{2/\pi}`,
:math:`a = 0.044715`, from about ten torch ops. A Hessian-vector product differentiates that chain
twice, and autograd's double backward through it runs a few dozen elementwise kernels over the
MLP's ``[N, L, 4E]`` activations. The cached graph of the curvature operators instead gets one node
(:class:`CachedActivation`) whose backward is :math:`g \mapsto f'(x)\,g` and whose double
backward is :math:`(h, g) \mapsto (f'(x)\,h,\ f''(x)\,g\,h)`, with

.. math::
    f'(x) = \tfrac12(1 + t) + \tfrac12 x\,(1 - t^2)\,u', \qquad
    f''(x) = (1 - t^2)\,\big[u' + \tfrac12 x\,(u'' - 2 t\,u'^2)\big],

:math:`t = \tanh u`, :math:`u' = c\,(1 + 3 a x^2)`, :math:`u'' = 6 a c\,x`. Forward values are the
module's own (bitwise). :func:`activation_nodes` swaps the nodes in during a forward pass, as
:func:`~backpack_attention.derivatives.layernorm.layer_norm_nodes` does for LayerNorm. Modules
are recognised by class name (no import of transformers); PyTorch's ``nn.GELU`` already has a
fused double backward and is left alone.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from backpack_attention.derivatives.layernorm import OutputNodes

_C = math.sqrt(2.0 / math.pi)
_A = 0.044715

#: Class names of modules computing the tanh-GELU above with elementwise torch ops.
TANH_GELU_MODULES = ("NewGELUActivation",)


def tanh_gelu_derivatives(x: Tensor):
    """``(f'(x), f''(x))`` of the tanh-GELU (module docstring)."""
    return _tanh_gelu(x)[1:]


def _tanh_gelu(x: Tensor):
    """``(f(x), f'(x), f''(x))`` of the tanh-GELU."""
    t = torch.tanh(_C * (x + _A * x ** 3))
    s = 1 - t * t
    du = _C * (1 + 3 * _A * x * x)
    d2u = 6 * _A * _C * x
    f = 0.5 * x * (1 + t)
    d1 = 0.5 * (1 + t) + 0.5 * x * s * du
    d2 = s * (du + 0.5 * x * (d2u - 2 * t * du * du))
    return f, d1, d2


class _ActivationBackward(torch.autograd.Function):
    """``(g, x) -> f'(x) g`` with the closed-form backward ``(f'(x) h, f''(x) g h)`` (``d1``, ``d2``:
    :math:`f'(x)`, :math:`f''(x)`, precomputed; ``x`` is an input only to carry the graph)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(g, x, d1, d2):
        return g * d1

    @staticmethod
    def setup_context(ctx, inputs, output):
        g, _, d1, d2 = inputs
        ctx.save_for_backward(g, d1, d2)

    @staticmethod
    def backward(ctx, h):
        g, d1, d2 = ctx.saved_tensors
        dg = h * d1 if ctx.needs_input_grad[0] else None
        dx = h * g * d2 if ctx.needs_input_grad[1] else None
        return dg, dx, None, None


class CachedActivation(torch.autograd.Function):
    """``y = f(x)`` (``y``: the value the module computed) with closed-form first and second
    derivatives (``d1``, ``d2``: :math:`f'(x)`, :math:`f''(x)`)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, y, d1, d2):
        return y.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, _, d1, d2 = inputs
        ctx.save_for_backward(x, d1, d2)

    @staticmethod
    def backward(ctx, g):
        x, d1, d2 = ctx.saved_tensors
        return _ActivationBackward.apply(g, x, d1, d2), None, None, None


def _attach(x: Tensor, y: Tensor) -> Tensor:
    """``y`` as a :class:`CachedActivation` node, if ``y`` is the tanh-GELU of ``x`` (to rounding);
    else ``y`` itself (autograd's own graph: a module that only shares the class name is never
    given these derivatives). The check runs once per cached forward pass, not per product."""
    f, d1, d2 = _tanh_gelu(x.detach())
    eps = torch.finfo(f.dtype).eps
    if y.shape != f.shape or not torch.allclose(y.detach(), f, rtol=1e3 * eps, atol=1e3 * eps):
        return y
    return CachedActivation.apply(x, y.detach(), d1, d2)


class activation_nodes(OutputNodes):
    """Context: the tanh-GELU modules of ``model`` (:data:`TANH_GELU_MODULES`) output
    :class:`CachedActivation` nodes (only where the input carries a graph); outputs are unchanged."""

    @staticmethod
    def selects(module: nn.Module) -> bool:
        return type(module).__name__ in TANH_GELU_MODULES

    @staticmethod
    def node(module: nn.Module, x: Tensor, output):
        return _attach(x, output) if isinstance(output, Tensor) else output
