"""Autograd functions for the softmax attention core: fused forward, closed-form derivatives.

:class:`SoftmaxAttentionCore` (the module's everyday path) calls
:func:`torch.nn.functional.scaled_dot_product_attention`, so PyTorch picks its fastest kernel
(flash / memory-efficient on CPU and GPU). Those kernels have neither a double backward nor a
forward-mode rule. This function supplies both from the closed forms in
:mod:`backpack_attention.derivatives.core`: its ``backward`` is made of differentiable torch
ops (so double backward and ``torch.func.hessian`` work) and its ``jvp`` is the closed-form
forward-mode product (so ``torch.func.jvp``, ``linearize`` and curvlinops' GGN work). The
vmap rule is generated, so ``vmap`` over these works too. Neither stores the ``[N, H, L, L]``
attention matrix: backward and jvp recompute it chunk by chunk.

:class:`CachedSoftmaxCore` (inside :func:`cached_attention`, used by the curvature operators)
keeps the attention matrix of one forward pass and has closed-form first *and* second
derivatives from it (:class:`SoftmaxCoreBackward`): a cached forward graph can then be
differentiated many times (GGN and Hessian products) without recomputing or autograd-tracing
the attention core.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from backpack_attention.derivatives.core import attention_matrix, chunked, core_hvp, core_jvp, core_vjp


class SoftmaxAttentionCore(torch.autograd.Function):
    """``O = softmax(Q K^T / sqrt(d) + mask) V`` on ``[N, H, L, d]`` tensors."""

    generate_vmap_rule = True

    @staticmethod
    def forward(Q: Tensor, K: Tensor, V: Tensor, allowed: Optional[Tensor], only_causal: bool) -> Tensor:
        if only_causal:  # the mask is exactly causal: let the kernel generate it
            return F.scaled_dot_product_attention(Q, K, V, is_causal=True)
        return F.scaled_dot_product_attention(Q, K, V, attn_mask=allowed)

    @staticmethod
    def setup_context(ctx, inputs, output):
        Q, K, V, allowed, _ = inputs
        ctx.allowed = allowed
        ctx.save_for_backward(Q, K, V, output)
        ctx.save_for_forward(Q, K, V, output)

    @staticmethod
    def backward(ctx, dO):
        Q, K, V, O = ctx.saved_tensors
        G_Q, G_K, G_V = core_vjp(Q, K, V, None, dO, allowed=ctx.allowed, O=O)
        return G_Q, G_K, G_V, None, None

    @staticmethod
    def jvp(ctx, dQ, dK, dV, _dallowed, _dcausal):
        Q, K, V, O = ctx.saved_tensors
        return core_jvp(Q, K, V, None, dQ, dK, dV, allowed=ctx.allowed, O=O)


# ---------------------------------------------------------------------------------------------
# cached attention matrices: many products on one forward pass
# ---------------------------------------------------------------------------------------------
class _Mode:
    """Global switches read by :class:`CachedSoftmaxCore` (global, not thread-local: on GPUs the
    autograd engine runs backward passes on its own threads)."""

    cached = False
    constant_inputs = False


@contextmanager
def cached_attention():
    """Inside: :func:`softmax_attention` forms and keeps ``A`` (:class:`CachedSoftmaxCore`)."""
    old, _Mode.cached = _Mode.cached, True
    try:
        yield
    finally:
        _Mode.cached = old


@contextmanager
def linear_backward():
    """Inside: backward passes through :class:`CachedSoftmaxCore` record graphs that are linear
    in the cotangent only (``Q, K, V`` held constant). That is all a Jacobian-vector product by
    the double-VJP trick needs, and its second pass then costs a :func:`core_jvp` instead of a
    :func:`core_hvp`. Do not build Hessian graphs inside."""
    old, _Mode.constant_inputs = _Mode.constant_inputs, True
    try:
        yield
    finally:
        _Mode.constant_inputs = old


def linear_backward_active() -> bool:
    """Whether backward passes run inside :func:`linear_backward` (read by closed-form nodes)."""
    return _Mode.constant_inputs


class CachedSoftmaxCore(torch.autograd.Function):
    """``O = A V`` with a precomputed ``A = softmax(Q K^T / sqrt(d) + mask)`` (a constant input).

    Backward is :class:`SoftmaxCoreBackward` (closed form, itself differentiable in closed form).
    Only for graphs that are built once and differentiated many times.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(Q: Tensor, K: Tensor, V: Tensor, A: Tensor) -> Tensor:
        return A @ V

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs, output)

    @staticmethod
    def backward(ctx, dO):
        Q, K, V, A, O = ctx.saved_tensors
        if _Mode.constant_inputs:
            Q, K, V = Q.detach(), K.detach(), V.detach()
        return SoftmaxCoreBackward.apply(Q, K, V, A, O.detach(), dO) + (None,)


class SoftmaxCoreBackward(torch.autograd.Function):
    r"""``(Q, K, V, A, O, G_O) -> core_vjp(Q, K, V, A, G_O)`` with a closed-form backward.

    ``A`` and ``O = A V`` are constants of the cached forward pass (they speed up the products;
    the derivatives in ``Q, K, V`` are the closed forms, which account for their dependence).

    Backward, for cotangents ``(c_Q, c_K, c_V)`` of the outputs: the cotangent of ``G_O`` is
    :func:`core_jvp` of ``(c_Q, c_K, c_V)`` (the VJP is linear in ``G_O``) and those of
    ``Q, K, V`` are the second-order term :func:`core_hvp` (the Hessian of
    :math:`\langle\mathbf G_O, \mathbf O\rangle` is symmetric). Both come from one fused pass.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(Q, K, V, A, O, G_O):
        return core_vjp(Q, K, V, A, G_O, O=O)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, c_Q, c_K, c_V):
        Q, K, V, A, O, G_O = ctx.saved_tensors
        if not any(ctx.needs_input_grad[:3]):
            return None, None, None, None, None, core_jvp(Q, K, V, A, c_Q, c_K, c_V, O=O)
        dG_Q, dG_K, dG_V, dO = core_hvp(Q, K, V, A, G_O, c_Q, c_K, c_V, O=O)
        return dG_Q, dG_K, dG_V, None, None, dO


def softmax_attention(
    Q: Tensor, K: Tensor, V: Tensor, allowed: Optional[Tensor], only_causal: bool = False
) -> Tensor:
    """Fused-forward softmax attention with closed-form first and second derivatives.

    Args:
        Q, K, V: ``[N, H, L, d]``.
        allowed: boolean mask broadcastable to ``[N, H, L, L]``, ``True`` = may attend, or ``None``.
        only_causal: ``allowed`` is exactly the causal mask, so the fused kernel may build it.

    Inside :func:`cached_attention` the attention matrix is formed and kept instead
    (:class:`CachedSoftmaxCore`).
    """
    if _Mode.cached:
        with torch.no_grad():
            (A,) = chunked(lambda Q, K, allowed: (attention_matrix(Q, K, allowed),), Q, K, allowed, L=Q.shape[-2])
        return CachedSoftmaxCore.apply(Q, K, V, A)
    return SoftmaxAttentionCore.apply(Q, K, V, allowed, only_causal)
