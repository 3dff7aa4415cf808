"""Autograd function for the softmax attention core: fused forward, closed-form derivatives.

The forward calls :func:`torch.nn.functional.scaled_dot_product_attention`, so PyTorch picks
its fastest kernel (flash / memory-efficient on CPU and GPU). Those kernels have neither a
double backward nor a forward-mode rule. This function supplies both from the closed forms in
:mod:`backpack_attention.derivatives.core`: its ``backward`` is made of differentiable torch
ops (so double backward and ``torch.func.hessian`` work) and its ``jvp`` is the closed-form
forward-mode product (so ``torch.func.jvp``, ``linearize`` and curvlinops' GGN work). The
vmap rule is generated, so ``vmap`` over these works too.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from backpack_attention.derivatives.core import attention_matrix, core_jvp, core_vjp


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
        ctx.save_for_backward(Q, K, V)
        ctx.save_for_forward(Q, K, V)

    @staticmethod
    def backward(ctx, dO):
        Q, K, V = ctx.saved_tensors
        A = attention_matrix(Q, K, ctx.allowed)
        G_Q, G_K, G_V = core_vjp(Q, K, V, A, dO)
        return G_Q, G_K, G_V, None, None

    @staticmethod
    def jvp(ctx, dQ, dK, dV, _dallowed, _dcausal):
        Q, K, V = ctx.saved_tensors
        A = attention_matrix(Q, K, ctx.allowed)
        return core_jvp(Q, K, V, A, dQ, dK, dV)


def softmax_attention(
    Q: Tensor, K: Tensor, V: Tensor, allowed: Optional[Tensor], only_causal: bool = False
) -> Tensor:
    """Fused-forward softmax attention with closed-form first and second derivatives.

    Args:
        Q, K, V: ``[N, H, L, d]``.
        allowed: boolean mask broadcastable to ``[N, H, L, L]``, ``True`` = may attend, or ``None``.
        only_causal: ``allowed`` is exactly the causal mask, so the fused kernel may build it.
    """
    return SoftmaxAttentionCore.apply(Q, K, V, allowed, only_causal)
