r"""Closed-form LayerNorm nodes for a cached forward graph (the curvature operators' fast path).

Pre-LN transformers put a LayerNorm between every attention layer and the rest of the network.
When a cached graph is differentiated by the double-VJP trick (a Jacobian-vector product as the
derivative of a recorded backward pass in its cotangent), autograd differentiates LayerNorm's
backward kernel with its generic double-backward formula, which costs several times a LayerNorm
backward. The JVP itself is a few elementwise operations. With
:math:`\hat{\mathbf x} = (\mathbf x - \mu)\,r` (``r`` the reciprocal standard deviation, means over
the normalised dimensions) and weight :math:`\boldsymbol\gamma`:

.. math::
    \mathbf J\,\mathrm d\mathbf x = \boldsymbol\gamma\odot r\,\big(\mathrm d\mathbf x - \overline{\mathrm d\mathbf x}
    - \hat{\mathbf x}\,\overline{\hat{\mathbf x}\odot\mathrm d\mathbf x}\big),\qquad
    \mathbf J^\top\mathbf g = r\,\big(\mathbf g' - \overline{\mathbf g'}
    - \hat{\mathbf x}\,\overline{\hat{\mathbf x}\odot\mathbf g'}\big),\ \mathbf g' = \boldsymbol\gamma\odot\mathbf g .

:func:`layer_norm_nodes` swaps every ``nn.LayerNorm`` output of a forward pass for a
:class:`CachedLayerNorm` node (same values). Its backward is the closed form
:class:`LayerNormTransposedJacobian` inside
:func:`~backpack_attention.derivatives.function.linear_backward` (its own backward is the JVP) and
PyTorch's LayerNorm backward otherwise (whose exact double backward then gives Hessians).
LayerNorm parameters are constants of these nodes: use them only where those parameters are not
differentiated.
"""

from __future__ import annotations

from typing import List, Sequence

import torch
from torch import Tensor, nn

from backpack_attention.derivatives.function import linear_backward_active


def normalized_dims(normalized_shape: Sequence[int]):
    """The trailing dimensions a LayerNorm of ``normalized_shape`` normalises over."""
    return tuple(range(-len(normalized_shape), 0))


def normalize(x: Tensor, dims, eps: float):
    r"""``(x_hat, r)``: :math:`\hat{\mathbf x} = (\mathbf x - \mu) r`, :math:`r = (\mathrm{var} + \epsilon)^{-1/2}`
    (biased variance) over ``dims``; ``r`` keeps the reduced dimensions as size 1."""
    xc = x - x.mean(dims, keepdim=True)
    rstd = ((xc * xc).mean(dims, keepdim=True) + eps).rsqrt()
    return xc * rstd, rstd


def center(t: Tensor, x_hat: Tensor, rstd: Tensor, dims) -> Tensor:
    """``r (t - mean(t) - x_hat mean(x_hat t))`` over ``dims``: the symmetric middle factor ``P`` of
    LayerNorm's Jacobian ``J = diag(gamma) P`` (``J^T g = P (gamma * g)``). The one implementation,
    used by the operators' nodes and the BackPACK derivatives."""
    return rstd * (t - t.mean(dims, keepdim=True) - x_hat * (x_hat * t).mean(dims, keepdim=True))


def layer_norm_explicit(x: Tensor, normalized_shape, weight, bias, eps: float) -> Tensor:
    """LayerNorm written in elementary ops. ``torch.func``'s forward-over-reverse through
    ``F.layer_norm`` (``jacfwd(jacrev(...))``, hence ``torch.func.hessian``) is wrong in torch 2.13
    and 2.14; through these ops it is right. Use it where ``torch.func`` takes second derivatives."""
    y, _ = normalize(x, normalized_dims(normalized_shape), eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y




class LayerNormTransposedJacobian(torch.autograd.Function):
    """``g -> J^T g`` of a LayerNorm at a fixed input (linear in ``g``); backward: ``c -> J c``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(g, x_hat, rstd, weight, dims):
        return center(g if weight is None else g * weight, x_hat, rstd, dims)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, x_hat, rstd, weight, dims = inputs
        ctx.dims = dims
        ctx.save_for_backward(x_hat, rstd, weight)

    @staticmethod
    def backward(ctx, c):
        x_hat, rstd, weight = ctx.saved_tensors
        Jc = center(c, x_hat, rstd, ctx.dims)
        return (Jc if weight is None else Jc * weight), None, None, None, None


class CachedLayerNorm(torch.autograd.Function):
    """``y = LayerNorm(x)`` with constant weight and bias; see the module docstring for its backward."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, normalized_shape, weight, bias, eps):
        return torch.native_layer_norm(x, normalized_shape, weight, bias, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, normalized_shape, weight, bias, _ = inputs
        _, mean, rstd = output
        ctx.normalized_shape = normalized_shape
        ctx.mark_non_differentiable(mean, rstd)
        ctx.save_for_backward(x, mean, rstd, weight, bias)

    @staticmethod
    def backward(ctx, dy, _dmean, _drstd):
        x, mean, rstd, weight, bias = ctx.saved_tensors
        shape = ctx.normalized_shape
        if linear_backward_active():
            # mean / rstd are stored with the normalised dimensions reduced to size 1
            x_hat = (x.detach() - mean) * rstd
            dx = LayerNormTransposedJacobian.apply(dy, x_hat, rstd, weight, normalized_dims(shape))
        else:
            dx = torch.ops.aten.native_layer_norm_backward(
                dy, x, shape, mean, rstd, weight, bias, [True, False, False])[0]
        return dx, None, None, None, None


class OutputNodes:
    """Context: forward hooks on the modules of ``model`` that :meth:`selects`, replacing the output
    of each call whose input carries a graph by :meth:`node` (a closed-form node with the same
    values). Subclasses define the two methods; hooks are removed on exit."""

    def __init__(self, model: nn.Module):
        self.modules: List[nn.Module] = [m for m in model.modules() if self.selects(m)]
        self.handles = []

    def __enter__(self):
        self.handles = [m.register_forward_hook(self._hook) for m in self.modules]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def _hook(self, module: nn.Module, args, output):
        x = args[0] if args else None
        if not isinstance(x, Tensor) or not x.requires_grad:
            return output
        return self.node(module, x, output)

    @staticmethod
    def selects(module: nn.Module) -> bool:
        raise NotImplementedError

    @staticmethod
    def node(module: nn.Module, x: Tensor, output):
        raise NotImplementedError


class layer_norm_nodes(OutputNodes):
    """Context: the ``nn.LayerNorm`` modules of ``model`` output :class:`CachedLayerNorm` nodes.

    Only layers whose input carries a graph and whose parameters do not require grad are swapped;
    outputs are unchanged.
    """

    @staticmethod
    def selects(module: nn.Module) -> bool:
        return isinstance(module, nn.LayerNorm)

    @staticmethod
    def node(module: nn.LayerNorm, x: Tensor, output):
        if any(p is not None and p.requires_grad for p in (module.weight, module.bias)):
            return output  # its parameters are differentiated: keep torch's node (exact double backward)
        d = lambda p: None if p is None else p.detach()  # noqa: E731
        return CachedLayerNorm.apply(x, tuple(module.normalized_shape), d(module.weight), d(module.bias), module.eps)[0]
