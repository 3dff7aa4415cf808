r"""Closed-form derivatives of the parameter-free attention core.

The core maps per-head queries, keys and values to the head outputs,

.. math::
    \mathbf T = \mathbf Q\mathbf K^\top / \sqrt{d_K},\qquad
    \mathbf A = \mathrm{softmax}_{\text{row}}(\mathbf T + \text{mask})
    \ (\text{or } \mathbf A = \mathbf T\odot\text{mask} \text{ for linear attention}),\qquad
    \mathbf O = \mathbf A\mathbf V .

Every function works on tensors with arbitrary leading dimensions ``[..., L, d]`` (typically
``[N, H, L, d]`` or ``[V, N, H, L, d]``) and is written in plain, twice-differentiable torch
ops. This is the single home of the attention core's derivatives: the module's autograd
function, the BackPACK extensions and the curvature operators all call these.

Masks are boolean ``allowed`` tensors broadcastable to ``[..., L, L]`` (``True`` = query ``i``
may attend to key ``j``), or ``None``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

SOFTMAX = "softmax"
LINEAR = "linear"
ATTENTION_KINDS = (SOFTMAX, LINEAR)


def scores(Q: Tensor, K: Tensor) -> Tensor:
    r"""Scaled scores :math:`\mathbf T = \mathbf Q\mathbf K^\top/\sqrt{d_K}`, ``[..., L, L]``."""
    return Q @ K.transpose(-1, -2) / math.sqrt(Q.shape[-1])


def probabilities(T: Tensor, allowed: Optional[Tensor], kind: str = SOFTMAX) -> Tensor:
    r"""Attention matrix :math:`\mathbf A` from scores ``T`` ``[..., L, L]``.

    Softmax: row-wise softmax over allowed keys (masked entries are exactly 0).
    Linear: the masked raw scores :math:`\mathbf T\odot\text{mask}`.
    """
    if kind == LINEAR:
        return T if allowed is None else T * allowed
    if allowed is None:
        return torch.softmax(T, dim=-1)
    return torch.softmax(T.masked_fill(~allowed, float("-inf")), dim=-1)


def attention_matrix(Q: Tensor, K: Tensor, allowed: Optional[Tensor], kind: str = SOFTMAX) -> Tensor:
    """``A = probabilities(scores(Q, K))``, ``[..., L, L]``."""
    return probabilities(scores(Q, K), allowed, kind)


def softmax_jvp(A: Tensor, dT: Tensor, kind: str = SOFTMAX, allowed: Optional[Tensor] = None) -> Tensor:
    r"""Apply :math:`\mathbf J_i = \mathrm{diag}(\mathbf a_i) - \mathbf a_i\mathbf a_i^\top` row-wise.

    For linear attention :math:`\mathbf J_i` is the mask. ``dT``: ``[..., L, L]``. The
    Jacobian is symmetric, so this is also the VJP.
    """
    if kind == LINEAR:
        return dT if allowed is None else dT * allowed
    AdT = A * dT
    return AdT - A * AdT.sum(-1, keepdim=True)


def core_forward(Q: Tensor, K: Tensor, V: Tensor, allowed: Optional[Tensor], kind: str = SOFTMAX):
    """Reference (math) forward. Returns ``(O, A)`` with ``O = A V`` ``[..., L, d_v]``."""
    A = attention_matrix(Q, K, allowed, kind)
    return A @ V, A


def core_jvp(Q, K, V, A, dQ, dK, dV, kind: str = SOFTMAX, allowed=None) -> Tensor:
    r"""Forward-mode product :math:`\mathrm d\mathbf O` of the core for tangents of Q, K, V.

    :math:`\mathrm d\mathbf T = (\mathrm d\mathbf Q\mathbf K^\top + \mathbf Q\,\mathrm d\mathbf K^\top)/\sqrt{d_K}`,
    :math:`\mathrm d\mathbf A = \mathbf J\,\mathrm d\mathbf T`,
    :math:`\mathrm d\mathbf O = \mathrm d\mathbf A\,\mathbf V + \mathbf A\,\mathrm d\mathbf V`.
    Any tangent may be ``None`` (zero).
    """
    dO = None
    if dQ is not None or dK is not None:
        scale = 1.0 / math.sqrt(Q.shape[-1])
        dT = 0
        if dQ is not None:
            dT = dQ @ K.transpose(-1, -2)
        if dK is not None:
            dT = dT + Q @ dK.transpose(-1, -2)
        dO = softmax_jvp(A, dT * scale, kind, allowed) @ V
    if dV is not None:
        dO = A @ dV if dO is None else dO + A @ dV
    if dO is None:
        dO = torch.zeros_like(A @ V)
    return dO


def core_vjp(Q, K, V, A, dO, kind: str = SOFTMAX, allowed=None):
    r"""Reverse-mode product of the core: ``(G_Q, G_K, G_V)`` for an output cotangent ``dO``.

    :math:`\mathbf G_A = \mathbf G_O\mathbf V^\top`, :math:`\mathbf G_V = \mathbf A^\top\mathbf G_O`,
    :math:`\mathbf G_T = \mathbf J\,\mathbf G_A`, :math:`\mathbf G_Q = \mathbf G_T\mathbf K/\sqrt{d_K}`,
    :math:`\mathbf G_K = \mathbf G_T^\top\mathbf Q/\sqrt{d_K}`.
    ``dO`` may carry extra leading dimensions (e.g. ``[C, N, H, L, d_v]``); they broadcast.
    """
    scale = 1.0 / math.sqrt(Q.shape[-1])
    G_A = dO @ V.transpose(-1, -2)
    G_V = A.transpose(-1, -2) @ dO
    G_T = softmax_jvp(A, G_A, kind, allowed) * scale
    return G_T @ K, G_T.transpose(-1, -2) @ Q, G_V
