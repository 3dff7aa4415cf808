r"""The one forward pipeline of an attention layer: project, core, merge.

.. math::
    \mathbf x \xrightarrow{\text{project}} (\mathbf Q, \mathbf K, \mathbf V)
    \xrightarrow{\text{core}} \mathbf O = \mathbf A\mathbf V
    \xrightarrow{\text{merge}} \mathbf y = \mathbf Z\mathbf W_{\text{out}}^\top + \mathbf b_{\text{out}},
    \qquad \mathbf Z = \text{the heads of } \mathbf O \text{ side by side.}

The module's forward, the BackPACK derivatives, the factors of the closed-form blocks and the
reference forward of the Hessian-diagonal extensions all call these functions. They work on any
*attention layer*: an object with ``layout`` (:class:`~backpack_attention.layout.AttentionLayout`),
``variant`` (:class:`~backpack_attention.derivatives.variants.AttentionVariant`) and the torch
parameters ``in_proj_weight``, ``in_proj_bias``, ``out_proj_weight``, ``out_proj_bias`` (biases may
be ``None``), as :class:`~backpack_attention.MultiheadSelfAttention` has.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from backpack_attention.derivatives.core import attention_matrix
from backpack_attention.layout import PARAM_NAMES, AttentionLayout


class AttentionParams(NamedTuple):
    """The four torch parameters of a layer (biases may be ``None``)."""

    in_proj_weight: Tensor
    in_proj_bias: Optional[Tensor]
    out_proj_weight: Tensor
    out_proj_bias: Optional[Tensor]

    @classmethod
    def of(cls, layer, detach: bool = False) -> "AttentionParams":
        """The parameters of ``layer`` (detached with ``detach``)."""
        ps = [getattr(layer, n) for n in PARAM_NAMES]
        return cls(*[None if p is None else (p.detach() if detach else p) for p in ps])


def project(x: Tensor, layout: AttentionLayout, in_proj_weight: Tensor, in_proj_bias: Optional[Tensor]):
    """Queries, keys and values ``[..., H, L, d_K]`` (biases included) of inputs ``x [..., L, E]``."""
    return layout.split_qkv(F.linear(x, in_proj_weight, in_proj_bias))


def merge(O: Tensor, layout: AttentionLayout, out_proj_weight: Tensor, out_proj_bias: Optional[Tensor]) -> Tensor:
    """Head outputs ``O [..., H, L, d_K]`` -> layer output ``[..., L, E]``."""
    return F.linear(layout.merge_heads(O), out_proj_weight, out_proj_bias)


def attention_forward(layer, x: Tensor, allowed: Optional[Tensor], *, only_causal: bool = False,
                      params: Optional[AttentionParams] = None, explicit: bool = False) -> Tensor:
    """``y = merge(core(project(x)))`` ``[..., L, E]`` for the attention layer ``layer``.

    Args:
        layer: an attention layer (see the module docstring).
        x: inputs ``[..., L, E]``.
        allowed: boolean mask broadcastable to ``[..., H, L, L]`` (``True`` = may attend) or ``None``.
        only_causal: ``allowed`` is exactly the causal mask (the fused kernel may build it).
        params: parameters to use instead of the layer's (e.g. to make it a function of them).
        explicit: run the core as plain torch ops (``A`` formed, twice differentiable by autograd and
            ``torch.func``) instead of the variant's everyday forward (fastest kernel, closed-form
            derivatives).
    """
    p = AttentionParams.of(layer) if params is None else params
    Q, K, V = project(x, layer.layout, p.in_proj_weight, p.in_proj_bias)
    if explicit:
        O = attention_matrix(Q, K, allowed, layer.variant) @ V
    else:
        O = layer.variant.forward(Q, K, V, allowed, only_causal)
    return merge(O, layer.layout, p.out_proj_weight, p.out_proj_bias)


class ForwardQuantities:
    """Intermediates of one forward pass (no graph): what the derivatives are built from.

    Attributes (``H`` heads of width ``d``): ``x [N, L, E]``, ``allowed`` (mask or ``None``),
    ``Q, K, V`` ``[N, H, L, d]`` (unscaled, biases included), ``A [N, H, L, L]``, the head outputs
    ``O = A V`` ``[N, H, L, d]`` and ``Z [N, L, E]`` (the heads side by side, the out-projection's input).
    """

    def __init__(self, layer, x: Tensor, allowed: Optional[Tensor]):
        self.x, self.allowed = x, allowed
        p = AttentionParams.of(layer, detach=True)
        with torch.no_grad():
            self.Q, self.K, self.V = project(x.detach(), layer.layout, p.in_proj_weight, p.in_proj_bias)
            self.A = attention_matrix(self.Q, self.K, allowed, layer.variant)
            self.O = self.A @ self.V
            self.Z = layer.layout.merge_heads(self.O)

    @property
    def qkv(self) -> Tuple[Tensor, Tensor, Tensor]:
        return self.Q, self.K, self.V
