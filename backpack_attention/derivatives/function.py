"""Autograd functions for the softmax attention core: fused forward, closed-form derivatives.

:class:`SoftmaxAttentionCore` (the module's everyday path) calls
:func:`torch.nn.functional.scaled_dot_product_attention`, so PyTorch picks its fastest kernel
(flash / memory-efficient on CPU and GPU), and a plain first-order backward (the training step)
runs that kernel's own fused backward. Those kernels have neither a double backward nor a
forward-mode rule. This function supplies both from the closed forms in
:mod:`backpack_attention.derivatives.core`: under ``create_graph=True`` its ``backward`` is made
of differentiable torch ops (so double backward and ``torch.func.hessian`` work) and its ``jvp``
is the closed-form forward-mode product (so ``torch.func.jvp``, ``linearize`` and curvlinops'
GGN work). The vmap rule is generated, so ``vmap`` over these works too. Neither stores the
``[N, H, L, L]`` attention matrix: the closed forms recompute it chunk by chunk.

:class:`CachedSoftmaxCore` (inside :func:`cached_attention`, used by the curvature operators)
keeps the attention matrix of one forward pass and has closed-form first *and* second
derivatives from it (:class:`SoftmaxCoreBackward`): a cached forward graph can then be
differentiated many times (GGN and Hessian products) without recomputing or autograd-tracing
the attention core.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._C._functorch import is_functorch_wrapped_tensor

from backpack_attention.derivatives.core import attention_matrix, chunked, core_hvp, core_jvp, core_vjp


class _FusedGraph(threading.local):
    """Hand-over slot from :meth:`SoftmaxAttentionCore.forward` to ``setup_context`` (thread-local:
    autograd runs each thread's ``forward -> setup_context`` back to back)."""

    graph = None  # (q, k, v, out): torch's graph of the fused kernel, recorded by forward


_fused = _FusedGraph()

_is_compiling = getattr(torch.compiler, "is_compiling", lambda: False)


def _compact_mask(allowed: Optional[Tensor]) -> Optional[Tensor]:
    """``allowed`` with its broadcast (stride-0) dimensions narrowed to size 1: the same mask for
    SDPA, which broadcasts it, but the float mask SDPA converts it to (and its autograd node keeps
    for the backward) is then e.g. ``[N, 1, 1, L]`` for a key-padding mask, not ``[N, 1, L, L]``."""
    if allowed is None or is_functorch_wrapped_tensor(allowed):
        return allowed
    index = tuple(slice(0, 1) if st == 0 and n > 1 else slice(None) for st, n in zip(allowed.stride(), allowed.shape))
    return allowed[index]


def _record_fused_graph(*tensors: Tensor) -> bool:
    """Whether :meth:`SoftmaxAttentionCore.forward` records torch's graph of the fused kernel.

    Inside an autograd ``forward`` grad mode is always off, so this asks whether any input
    requires grad (in ``no_grad`` / ``inference_mode`` forwards of the module, none does), and
    records nothing under functorch transforms (their inputs reach ``forward`` unwrapped, without
    ``requires_grad``; under the generated vmap rule the transforms are active) or while
    ``torch.compile`` traces (which then keeps to the pure forward and closed-form backward).
    """
    return (
        any(t.requires_grad for t in tensors)
        and not torch.is_inference_mode_enabled()
        and not torch._C._are_functorch_transforms_active()
        and not _is_compiling()
    )


class SoftmaxAttentionCore(torch.autograd.Function):
    r"""``O = softmax(Q K^T / sqrt(d) + mask) V`` on ``[N, H, L, d]`` tensors.

    **Forward** is :func:`torch.nn.functional.scaled_dot_product_attention` (torch's fastest kernel
    for the device, dtype and mask; ``is_causal=True`` when ``only_causal``).

    **First-order backward** (the training step) is torch's own fused backward. When some of
    ``Q, K, V`` requires grad (and no functorch transform or ``torch.compile`` trace is active),
    ``forward`` runs the kernel under :func:`torch.enable_grad` on detached aliases ``q, k, v``
    (same storage, no copies) that require grad, and ``setup_context`` keeps that one-node graph
    ``(q, k, v, out)`` in ``ctx``. The kernel's autograd node saves what its backward needs:
    ``q, k, v, out`` (the storage this function saves anyway), the ``[N, H, L]`` log-sum-exp and,
    with a mask, SDPA's float copy of it (broadcast dimensions kept at size 1, so ``[N, 1, 1, L]``
    for key padding); never an ``[N, H, L, L]`` tensor. ``backward`` with grad mode off (an
    ordinary ``.backward()`` / ``autograd.grad`` without ``create_graph``) calls
    :func:`torch.autograd.grad` through that graph: the flash / memory-efficient backward that
    ``nn.MultiheadAttention`` also runs. The graph is used once and then dropped, so it never
    outlives the first plain backward pass (a further backward through a retained outer graph
    takes the closed form below; so does one under ``create_graph=True``, which leaves the graph
    for a later plain pass, e.g. the second backward of a Hessian-vector product, which
    differentiates through this node again).

    **Higher derivatives** come from the closed forms of :mod:`backpack_attention.derivatives.core`
    (the fused kernels have neither a double backward nor a forward-mode rule):

    * ``backward`` under ``create_graph=True`` (grad mode on inside backward) returns
      :func:`core_vjp`, made of differentiable torch ops, so double backward,
      ``torch.autograd.functional.hessian`` etc. work;
    * ``jvp`` is :func:`core_jvp` (``torch.func.jvp``, ``linearize``, ``forward_ad``, curvlinops' GGN);
    * under functorch transforms (``torch.func.grad`` / ``jacrev`` / ``hessian`` / ``vmap``,
      ``autograd.grad(..., is_grads_batched=True)``) and ``torch.compile`` no graph is recorded or
      used and ``backward`` is the closed form; the vmap rule is generated (under vmap ``forward``
      is a pure function of its inputs, as the generated rule needs).

    The closed forms recompute ``A`` chunk by chunk and never store the ``[N, H, L, L]`` attention
    matrix. In ``no_grad`` / ``inference_mode`` forwards nothing is recorded: one fused kernel
    call, as before.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(Q: Tensor, K: Tensor, V: Tensor, allowed: Optional[Tensor], only_causal: bool) -> Tensor:
        kw = dict(is_causal=True) if only_causal else dict(attn_mask=_compact_mask(allowed))
        if not _record_fused_graph(Q, K, V):  # a pure function of the inputs
            return F.scaled_dot_product_attention(Q, K, V, **kw)
        with torch.enable_grad():
            q, k, v = (t.detach().requires_grad_(t.requires_grad) for t in (Q, K, V))
            out = F.scaled_dot_product_attention(q, k, v, **kw)
        _fused.graph = (q, k, v, out)
        return out.detach()

    @staticmethod
    def setup_context(ctx, inputs, output):
        Q, K, V, allowed, _ = inputs
        ctx.allowed = allowed
        ctx.fused = None
        if not _is_compiling():
            ctx.fused, _fused.graph = _fused.graph, None
        ctx.save_for_backward(Q, K, V, output)
        ctx.save_for_forward(Q, K, V, output)

    @staticmethod
    def backward(ctx, dO):
        if ctx.fused is not None and not torch.is_grad_enabled() and not is_functorch_wrapped_tensor(dO):
            (q, k, v, out), ctx.fused = ctx.fused, None  # used once: its saved tensors are freed now
            wanted = [t for t, need in zip((q, k, v), ctx.needs_input_grad[:3]) if need and t.requires_grad]
            grads = iter(torch.autograd.grad(out, wanted, dO))
            G = [next(grads) if need and t.requires_grad else None for t, need in zip((q, k, v), ctx.needs_input_grad[:3])]
            return G[0], G[1], G[2], None, None
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
