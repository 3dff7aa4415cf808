r"""Layer-level first- and second-order products of a :class:`~backpack_attention.MultiheadSelfAttention`.

Notation (SPEC §5; torch layout). One layer maps ``X [N, L, E]`` to

.. math::
    \mathbf P = \mathbf X\mathbf W_{\text{in}}^\top + \mathbf b_{\text{in}}
    = [\mathbf Q, \mathbf K, \mathbf V],\qquad
    \mathbf O^h = \mathbf A^h\mathbf V^h,\ \mathbf A^h = \mathrm{softmax}(\mathbf Q^h\mathbf K^{h\top}/\sqrt{d_K}),\qquad
    \mathbf F = \mathbf M\mathbf W_O^\top + \mathbf b_O,

with ``W_in = in_proj_weight [3E, E]`` (rows ``W_Q, W_K, W_V``), ``b_in [3E]``,
``W_O = out_proj_weight [E, E]``, ``b_O [E]``, head outputs ``O [N, H, L, d_K]`` and their
concatenation ``M [N, L, E]`` (SPEC's :math:`\mathbf z_i`). The parameter-free core
``(Q, K, V) -> O`` is differentiated only through :mod:`backpack_attention.derivatives.core`
(closed forms; the fused kernel is never differentiated).

Products, all for one batch, with tangents in parameter shape (``None`` = zero):

* :func:`param_jvp`: :math:`\mathrm d\mathbf F = \mathbf J_\theta\,\mathrm d\theta` (parameter tangent -> output tangent).
* :func:`param_vjp`: :math:`\mathbf J_\theta^\top\mathbf G_F` (output cotangent -> parameter cotangents).
* :func:`functional_product`: the functional (second-order) term of SPEC §1.4/§4.3/§5.2 for a
  fixed output gradient :math:`\mathbf R = \partial\ell/\partial\mathbf F`,
  i.e. the directional derivative of the backward pass at fixed ``R``:
  :math:`(\mathbf R\cdot\partial^2\mathbf F/\partial\theta^2)\,\mathrm d\theta
  + (\mathbf R\cdot\partial^2\mathbf F/\partial\theta\,\partial\mathbf X)\,\mathrm d\mathbf X`
  (parameter side) and :math:`(\mathbf R\cdot\partial^2\mathbf F/\partial\mathbf X\,\partial\theta)\,\mathrm d\theta`
  (input side, needed when layers below are differentiated too).

Cost per product: one core JVP/VJP, i.e. :math:`O(NHL^2d_K + NLE^2)`; no autograd graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

from backpack_attention.derivatives.core import (
    SOFTMAX,
    attention_matrix,
    core_jvp,
    core_vjp,
    softmax_jvp,
)

#: Names of a layer's parameters, in the order of ``module.parameters()``.
PARAM_NAMES = ("in_proj_weight", "in_proj_bias", "out_proj_weight", "out_proj_bias")

ParamTangents = Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor]]


def _split(t: Tensor, H: int) -> Tensor:
    """``[N, L, E] -> [N, H, L, E/H]``."""
    N, L, E = t.shape
    return t.reshape(N, L, H, E // H).transpose(1, 2)


def _merge(t: Tensor) -> Tensor:
    """``[N, H, L, d] -> [N, L, H d]``."""
    N, H, L, d = t.shape
    return t.transpose(1, 2).reshape(N, L, H * d)


@dataclass
class LayerCache:
    r"""Forward quantities of one attention layer on one batch (all detached).

    Attributes:
        X: layer input ``[N, L, E]``.
        allowed: boolean mask broadcastable to ``[N, H, L, L]`` or ``None``.
        kind: ``"softmax"`` or ``"linear"``.
        W_in, b_in, W_out, b_out: parameters (``b_*`` ``None`` without bias).
        Q, K, V: ``[N, H, L, d_K]`` (biases included). A: ``[N, H, L, L]``.
        M: concatenated head outputs ``[N, L, E]``.
    """

    X: Tensor
    allowed: Optional[Tensor]
    kind: str
    W_in: Tensor
    b_in: Optional[Tensor]
    W_out: Tensor
    b_out: Optional[Tensor]
    Q: Tensor
    K: Tensor
    V: Tensor
    A: Tensor
    M: Tensor

    @property
    def num_heads(self) -> int:
        return self.Q.shape[1]

    @classmethod
    def from_module(cls, module, X: Tensor, key_padding_mask=None, attn_mask=None) -> "LayerCache":
        """Compute the cache of ``module`` (a :class:`MultiheadSelfAttention`) at input ``X``."""
        with torch.no_grad():
            X = X.detach()
            allowed = module.allowed_mask(X, key_padding_mask, attn_mask)
            Q, K, V = module.project_qkv(X)
            A = attention_matrix(Q, K, allowed, module.attention)
            M = _merge(A @ V)
            d = lambda p: None if p is None else p.detach()  # noqa: E731
            return cls(X, allowed, module.attention, d(module.in_proj_weight), d(module.in_proj_bias),
                       d(module.out_proj_weight), d(module.out_proj_bias), Q, K, V, A, M)

    def split_qkv(self, dP: Tensor):
        """``[N, L, 3E]`` -> three ``[N, H, L, d_K]`` tangents."""
        return tuple(_split(t, self.num_heads) for t in dP.chunk(3, dim=-1))


def input_projection_tangent(c: LayerCache, dW_in, db_in, dX=None) -> Optional[Tensor]:
    r""":math:`\mathrm d\mathbf P = \mathbf X\,\mathrm d\mathbf W_{\text{in}}^\top + \mathrm d\mathbf b_{\text{in}}
    + \mathrm d\mathbf X\,\mathbf W_{\text{in}}^\top`, ``[N, L, 3E]`` (``None`` if all are zero)."""
    dP = None
    if dW_in is not None:
        dP = c.X @ dW_in.T
    if db_in is not None:
        dP = db_in.expand(*c.X.shape[:2], -1) if dP is None else dP + db_in
    if dX is not None:
        dP = dX @ c.W_in.T if dP is None else dP + dX @ c.W_in.T
    return dP


def param_jvp(c: LayerCache, dW_in=None, db_in=None, dW_out=None, db_out=None) -> Tensor:
    r"""Output tangent :math:`\mathrm d\mathbf F = \mathbf J_\theta\,\mathrm d\theta`, ``[N, L, E]``.

    :math:`\mathrm d\mathbf F = \mathrm{merge}(\mathrm{core\_jvp}(\mathrm d\mathbf Q, \mathrm d\mathbf K,
    \mathrm d\mathbf V))\mathbf W_O^\top + \mathbf M\,\mathrm d\mathbf W_O^\top + \mathrm d\mathbf b_O`.
    Tangents have the parameters' shapes (``[3E, E], [3E], [E, E], [E]``).
    """
    dF = torch.zeros_like(c.X)
    dP = input_projection_tangent(c, dW_in, db_in)
    if dP is not None:
        dQ, dK, dV = c.split_qkv(dP)
        dO = core_jvp(c.Q, c.K, c.V, c.A, dQ, dK, dV, c.kind, c.allowed)
        dF = dF + _merge(dO) @ c.W_out.T
    if dW_out is not None:
        dF = dF + c.M @ dW_out.T
    if db_out is not None:
        dF = dF + db_out
    return dF


def param_vjp(c: LayerCache, G_F: Tensor, need: Tuple[bool, bool, bool, bool] = (True,) * 4) -> ParamTangents:
    r"""Parameter cotangents :math:`\mathbf J_\theta^\top\mathbf G_F` for ``G_F [N, L, E]``.

    :math:`\mathbf g_{W_O} = \sum_{n,i}\mathbf G_{F,ni}\mathbf M_{ni}^\top`,
    :math:`\mathbf g_{b_O} = \sum_{n,i}\mathbf G_{F,ni}`,
    :math:`(\mathbf G_Q,\mathbf G_K,\mathbf G_V) = \mathrm{core\_vjp}(\mathrm{split}(\mathbf G_F\mathbf W_O))`,
    :math:`\mathbf g_{W_{\text{in}}} = \sum\mathbf G_P^\top\mathbf X`,
    :math:`\mathbf g_{b_{\text{in}}} = \sum\mathbf G_P`. ``need`` selects which of the four
    (``in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias``) to return (others ``None``).
    """
    gWi = gbi = gWo = gbo = None
    if need[0] or need[1]:
        G_O = _split(G_F @ c.W_out, c.num_heads)
        G_P = torch.cat([_merge(g) for g in core_vjp(c.Q, c.K, c.V, c.A, G_O, c.kind, c.allowed)], dim=-1)
        if need[0]:
            gWi = torch.einsum("nlp,nle->pe", G_P, c.X)
        if need[1]:
            gbi = G_P.sum((0, 1))
    if need[2]:
        gWo = torch.einsum("nlo,nle->oe", G_F, c.M)
    if need[3]:
        gbo = G_F.sum((0, 1))
    return gWi, gbi, gWo, gbo


@dataclass
class BackwardCache:
    r"""Backward quantities of one layer for a fixed output gradient ``R [N, L, E]``.

    ``G_O = split(R W_O)``, ``G_A = G_O V^T``, ``rho = rowsum(A * G_A)`` (softmax), the core
    cotangents ``G_P = [G_Q, G_K, G_V]`` merged to ``[N, L, 3E]`` and split ``G_Q, G_K``.
    """

    R: Tensor
    G_O: Tensor
    G_A: Tensor
    rho: Optional[Tensor]
    G_T: Tensor
    G_P: Tensor

    @classmethod
    def from_gradient(cls, c: LayerCache, R: Tensor) -> "BackwardCache":
        R = R.detach()
        scale = 1.0 / math.sqrt(c.Q.shape[-1])
        G_O = _split(R @ c.W_out, c.num_heads)
        G_A = G_O @ c.V.transpose(-1, -2)
        rho = (c.A * G_A).sum(-1, keepdim=True) if c.kind == SOFTMAX else None
        G_T = softmax_jvp(c.A, G_A, c.kind, c.allowed) * scale
        G_V = c.A.transpose(-1, -2) @ G_O
        G_P = torch.cat([_merge(G_T @ c.K), _merge(G_T.transpose(-1, -2) @ c.Q), _merge(G_V)], dim=-1)
        return cls(R, G_O, G_A, rho, G_T, G_P)


def core_vjp_tangent(c: LayerCache, b: BackwardCache, dQ, dK, dV, dG_O, want_output: bool = False):
    r"""Directional derivative of :func:`~backpack_attention.derivatives.core.core_vjp`.

    Tangent of ``(G_Q, G_K, G_V)`` when ``Q, K, V`` move by ``dQ, dK, dV`` and the output
    cotangent by ``dG_O`` (all ``[N, H, L, d_K]``, ``None`` = 0). With
    :math:`\mathrm d\mathbf T = (\mathrm d\mathbf Q\mathbf K^\top + \mathbf Q\,\mathrm d\mathbf K^\top)/\sqrt{d_K}`,
    :math:`\mathrm d\mathbf A = \mathbf J[\mathrm d\mathbf T]`,
    :math:`\mathrm d\mathbf G_A = \mathrm d\mathbf G_O\mathbf V^\top + \mathbf G_O\,\mathrm d\mathbf V^\top`:

    * :math:`\mathrm d\mathbf G_V = \mathrm d\mathbf A^\top\mathbf G_O + \mathbf A^\top\mathrm d\mathbf G_O`
    * softmax: :math:`\mathrm d\mathbf G_T = s[\mathbf S - \mathrm d\mathbf A\odot\boldsymbol\rho
      - \mathbf A\odot\mathrm{rowsum}(\mathbf S)]` with
      :math:`\mathbf S = \mathrm d\mathbf A\odot\mathbf G_A + \mathbf A\odot\mathrm d\mathbf G_A`,
      :math:`s = 1/\sqrt{d_K}`; linear: :math:`s\,\mathrm d\mathbf G_A\odot\text{mask}`
    * :math:`\mathrm d\mathbf G_Q = \mathrm d\mathbf G_T\mathbf K + \mathbf G_T\,\mathrm d\mathbf K`,
      :math:`\mathrm d\mathbf G_K = \mathrm d\mathbf G_T^\top\mathbf Q + \mathbf G_T^\top\mathrm d\mathbf Q`.

    The :math:`L\times L` work is ~20 memory passes (products with two tangents are fused into one
    ``bmm`` by concatenating along the head dimension). With ``want_output`` also returns the core's
    output tangent :math:`\mathrm d\mathbf O = \mathrm d\mathbf A\mathbf V + \mathbf A\,\mathrm d\mathbf V`
    (sharing :math:`\mathrm d\mathbf A`; equals ``core_jvp``).

    Returns ``(dG_Q, dG_K, dG_V)`` (and ``dO``), each ``[N, H, L, d_K]``.
    """
    scale = 1.0 / math.sqrt(c.Q.shape[-1])
    zero = torch.zeros_like(c.Q)
    dQ = zero if dQ is None else dQ
    dK = zero if dK is None else dK
    dV = zero if dV is None else dV
    dG_O = zero if dG_O is None else dG_O
    cat = lambda a, b_: torch.cat([a, b_], dim=-1)  # noqa: E731
    dT = cat(dQ * scale, c.Q * scale) @ cat(c.K, dK).transpose(-1, -2)
    if c.kind == SOFTMAX:
        AdT = c.A * dT
        dA = torch.addcmul(AdT, c.A, AdT.sum(-1, keepdim=True), value=-1.0)
    else:
        dA = softmax_jvp(c.A, dT, c.kind, c.allowed)
    dG_A = cat(dG_O, b.G_O) @ cat(c.V, dV).transpose(-1, -2)
    dG_V = dA.transpose(-1, -2) @ b.G_O + c.A.transpose(-1, -2) @ dG_O
    if c.kind == SOFTMAX:
        S = torch.addcmul(dA * b.G_A, c.A, dG_A)
        dG_T = torch.addcmul(torch.addcmul(S, dA, b.rho, value=-1.0), c.A, S.sum(-1, keepdim=True), value=-1.0)
    else:
        dG_T = softmax_jvp(c.A, dG_A, c.kind, c.allowed)
    dG_Q = (dG_T @ c.K) * scale + b.G_T @ dK
    dG_K = (dG_T.transpose(-1, -2) @ c.Q) * scale + b.G_T.transpose(-1, -2) @ dQ
    if want_output:
        return dG_Q, dG_K, dG_V, dA @ c.V + c.A @ dV
    return dG_Q, dG_K, dG_V


def functional_product(
    c: LayerCache,
    b: BackwardCache,
    dW_in=None,
    db_in=None,
    dW_out=None,
    db_out=None,
    dX: Optional[Tensor] = None,
    need: Tuple[bool, bool, bool, bool] = (True,) * 4,
    need_input: bool = False,
):
    r"""Functional (second-order) term of the layer for the fixed output gradient ``b.R``.

    Directional derivative, at fixed :math:`\mathbf R`, of the backward pass
    :math:`(\theta, \mathbf X)\mapsto(\mathbf J_\theta^\top\mathbf R, \mathbf J_X^\top\mathbf R)` along
    :math:`(\mathrm d\theta, \mathrm d\mathbf X)`:

    * parameter side (returned as a 4-tuple in parameter shapes, entries selected by ``need``):
      :math:`\mathbf H_f^{\theta\theta}\mathrm d\theta + \mathbf H_f^{\theta X}\mathrm d\mathbf X`
      with :math:`\mathbf H_f = \mathbf R\cdot\partial^2\mathbf F`. The
      :math:`\theta\theta` part is SPEC §4.3/§5.2 (zero for ``(V, V)``, ``(W_O, W_O)`` and all ``b_O`` blocks);
    * input side (``need_input``, ``[N, L, E]``): :math:`\mathbf H_f^{X\theta}\mathrm d\theta`, which uses
      only the parameter tangents (``dX`` is ignored there: the ``(X, X)`` term belongs to the network).

    Terms: with :math:`\mathrm d\mathbf P` from :func:`input_projection_tangent` (including ``dX``),
    :math:`\mathrm d\mathbf g_{W_O} = \sum\mathbf R^\top\mathrm d\mathbf M`,
    :math:`\mathrm d\mathbf G_O = \mathrm{split}(\mathbf R\,\mathrm d\mathbf W_O)`, core tangents by
    :func:`core_vjp_tangent`, :math:`\mathrm d\mathbf g_{W_{\text{in}}} = \sum\mathrm d\mathbf G_P^\top\mathbf X
    + \mathbf G_P^\top\mathrm d\mathbf X`, :math:`\mathrm d\mathbf g_{b_{\text{in}}} = \sum\mathrm d\mathbf G_P`,
    input side :math:`\mathrm d\mathbf G_P^{(\theta)}\mathbf W_{\text{in}} + \mathbf G_P\,\mathrm d\mathbf W_{\text{in}}`.
    One :func:`core_vjp_tangent` call, two when both ``dX`` and ``need_input`` are given.

    Returns ``((dg_W_in, dg_b_in, dg_W_out, dg_b_out), dG_X or None)``.
    """
    H = c.num_heads
    dG_O = None if dW_out is None else _split(b.R @ dW_out, H)
    dP_th = input_projection_tangent(c, dW_in, db_in)
    dP_x = None if dX is None else dX @ c.W_in.T
    want_M = need[2]

    def tangents(dP, dGO, with_output):
        if dP is None and dGO is None:
            return None, None
        dQ, dK, dV = c.split_qkv(dP) if dP is not None else (None, None, None)
        out = core_vjp_tangent(c, b, dQ, dK, dV, dGO, want_output=with_output and dP is not None)
        dG_P = torch.cat([_merge(g) for g in out[:3]], dim=-1)
        return dG_P, (_merge(out[3]) if len(out) == 4 else None)

    def add(a, b_):
        return b_ if a is None else (a if b_ is None else a + b_)

    if need_input and dP_x is not None:  # the input side needs the parameter-only part separately
        dG_P_th, dM_th = tangents(dP_th, dG_O, want_M)
        dG_P_x, dM_x = tangents(dP_x, None, want_M)
        dG_P, dM = add(dG_P_th, dG_P_x), add(dM_th, dM_x)
    else:
        dG_P, dM = tangents(add(dP_th, dP_x), dG_O, want_M)
        dG_P_th = dG_P

    gWi = gbi = gWo = gbo = None
    if need[0]:
        gWi = torch.zeros_like(c.W_in)
        if dG_P is not None:
            gWi = gWi + torch.einsum("nlp,nle->pe", dG_P, c.X)
        if dX is not None:
            gWi = gWi + torch.einsum("nlp,nle->pe", b.G_P, dX)
    if need[1]:
        gbi = torch.zeros(c.W_in.shape[0], dtype=c.X.dtype, device=c.X.device)
        if dG_P is not None:
            gbi = gbi + dG_P.sum((0, 1))
    if need[2]:
        gWo = torch.zeros_like(c.W_out)
        if dM is not None:
            gWo = gWo + torch.einsum("nlo,nle->oe", b.R, dM)
    if need[3]:
        gbo = torch.zeros(c.W_out.shape[0], dtype=c.X.dtype, device=c.X.device)

    dG_X = None
    if need_input:
        dG_X = torch.zeros_like(c.X)
        if dG_P_th is not None:
            dG_X = dG_X + dG_P_th @ c.W_in
        if dW_in is not None:
            dG_X = dG_X + b.G_P @ dW_in
    return (gWi, gbi, gWo, gbo), dG_X
