r"""Per-token factors of one attention layer's Hessian: data, weights, moments, loss
(docs/math.md, sections 4 and 5).

For one attention layer inside any network, :func:`~backpack_attention.attention_factors` collects

* **data**: :math:`\tilde{\mathbf X} = [\mathbf X, \mathbf 1]` (the ones column only with biases);
* **weights** (per head, augmented with bias rows): :math:`\tilde{\mathbf W}_Q,\tilde{\mathbf W}_K,
  \tilde{\mathbf W}_V`, :math:`\mathbf W_O^h` and the OV circuit :math:`\mathbf U^h=\tilde{\mathbf W}_V^h\mathbf W_O^h`;
* **moments** (per head and sequence): :math:`\mathbf A`, :math:`\mathbf M_1` (rows :math:`\boldsymbol\mu_i`),
  :math:`\boldsymbol\Sigma_i=\tilde{\mathbf X}^\top\mathbf J_i\tilde{\mathbf X}` and
  :math:`\boldsymbol\kappa_i[\mathbf g_i]` with :math:`\mathbf g_i=\mathbf U^h\mathbf r_i`
  (:math:`\boldsymbol\kappa_i` itself is never formed);
* **loss**: :math:`\mathbf r_i=\partial\ell/\partial\mathbf F_i` and the output curvature
  :math:`\boldsymbol\Lambda` — per token (``[N, L, E, E]``) when the layer output is the model
  output under MSE, else dense per sequence (``[N, L, E, L, E]``, GGN-propagated through the network
  above), plus the exact output Hessian ``Lambda_exact`` for the full Hessian of a deep network.

Batches are concatenated along ``N`` with the loss terms weighted as curvlinops does.
The network above the layer must treat sequences independently (no batch-coupling layers).

This module is math only: the containers, the moments of one layer's forward pass and the loss
terms at its output. Running the model to collect them is
:func:`backpack_attention.blocks.attention_factors`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Optional

import torch
from torch import Tensor, nn
from torch.func import grad, jacrev, jvp, vmap

from backpack_attention.derivatives.forward import ForwardQuantities
from backpack_attention.derivatives.loss import loss_hessian_mp
from backpack_attention.layout import AttentionLayout, HeadWeights, augment  # noqa: F401 (augment re-exported)

#: Per-head weights in the math layout (an alias of :class:`~backpack_attention.layout.HeadWeights`).
WeightTerms = HeadWeights


@dataclass
class DataTerms:
    """``X``: :math:`\\tilde{\\mathbf X}` ``[N, L, d']`` (``d' = E + 1`` with biases, else ``E``)."""

    X: Tensor
    has_bias: bool

    @property
    def gram(self) -> Tensor:
        r""":math:`\sum_{n,i}\tilde{\mathbf x}_i\tilde{\mathbf x}_i^\top` ``[d', d']``."""
        return torch.einsum("nla,nlb->ab", self.X, self.X)


#: Largest intermediate (in tensor elements) that computing ``Sigma`` or ``kappa_g`` may allocate at
#: once; the moments are computed in chunks of query rows that stay below it.
CHUNK_ELEMENTS = 2**24


@dataclass
class MomentTerms:
    r"""Attention moments per sequence ``n``, head ``h`` and query token ``i``.

    Stored: ``A`` ``[N, H, L, L]``; ``M1`` ``[N, H, L, d']`` (:math:`\boldsymbol\mu_i`); ``q``
    ``[N, H, L, d_K]`` (unscaled queries) and ``z`` ``[N, H, L, d_h]`` (head outputs); and what the
    second moments are computed from: ``X`` ``[N, L, d']``, ``g`` ``[N, H, L, d']``
    (:math:`\mathbf g_i=\mathbf U^h\mathbf r_i`), ``allowed`` (``[N, 1, L, L]`` bool or ``None``) and
    the attention ``variant``.

    ``Sigma`` ``[N, H, L, d', d']`` (:math:`\tilde{\mathbf X}^\top\mathbf J_i\tilde{\mathbf X}`: the
    attention covariance for softmax, the masked Gram matrix for linear attention) and ``kappa_g``
    ``[N, H, L, d', d']`` (:math:`\boldsymbol\kappa_i[\mathbf g_i]`, zero for linear attention) are
    computed on first access (then kept): they take ``N H L d'^2`` elements each, far more than
    everything else at long sequences (8 GiB each in float32 at ``N=4, H=4, L=2048, E=256``).
    :meth:`sigma` and :meth:`kappa` give them for one head and a chunk of sequences and query rows;
    the closed-form blocks only use those, so they never hold all of them at once.
    """

    A: Tensor
    M1: Tensor
    q: Tensor
    z: Tensor
    X: Tensor
    g: Tensor
    allowed: Optional[Tensor]
    variant: object

    def _rows(self, h, n: slice, rows: slice):
        """``A``, ``M1``, ``g`` and ``allowed`` of sequences ``n``, head(s) ``h``, query ``rows``."""
        hs = slice(None) if h is None else slice(h, h + 1)
        allowed = None if self.allowed is None else self.allowed[n, :, rows]
        return self.A[n, hs, rows], self.M1[n, hs, rows], self.g[n, hs, rows], allowed

    def _chunked(self, compute, h, n: slice, rows: slice) -> Tensor:
        """``compute(A, X, M1, g, allowed)`` over sub-chunks of ``rows`` (each intermediate below
        :data:`CHUNK_ELEMENTS`), written into one ``[n, heads, rows, d', d']`` tensor."""
        A, M1, g, allowed = self._rows(h, n, rows)
        X = self.X[n]
        Nn, Hn, R, L = A.shape
        d = X.shape[-1]
        step = max(1, CHUNK_ELEMENTS // max(1, Nn * Hn * L * d))
        if step >= R:
            out = compute(A, X, M1, g, allowed)
        else:
            out = X.new_empty(Nn, Hn, R, d, d)
            for i in range(0, R, step):
                j = slice(i, i + step)
                out[:, :, j] = compute(A[:, :, j], X, M1[:, :, j], g[:, :, j],
                                       None if allowed is None else allowed[:, :, j])
        return out if h is None else out[:, 0]

    def sigma(self, h: Optional[int] = None, n: slice = slice(None), rows: slice = slice(None)) -> Tensor:
        r""":math:`\boldsymbol\Sigma_i` of head ``h`` (all heads if ``None``), sequences ``n`` and query
        ``rows``: ``[n, rows, d', d']`` (``[n, H, rows, d', d']`` for all heads)."""
        return self._chunked(lambda A, X, M1, g, al: self.variant.sigma(A, X, M1, al), h, n, rows)

    def kappa(self, h: Optional[int] = None, n: slice = slice(None), rows: slice = slice(None)) -> Tensor:
        r""":math:`\boldsymbol\kappa_i[\mathbf g_i]`, in the layout of :meth:`sigma`."""
        return self._chunked(lambda A, X, M1, g, al: self.variant.kappa_g(A, X, M1, g), h, n, rows)

    @cached_property
    def Sigma(self) -> Tensor:
        """``[N, H, L, d', d']``, all of them (computed on first access)."""
        return self.sigma()

    @cached_property
    def kappa_g(self) -> Tensor:
        """``[N, H, L, d', d']``, all of them (computed on first access)."""
        return self.kappa()


@dataclass
class LossTerms:
    r"""Loss-side terms at the layer output, batch weights included.

    ``r`` ``[N, L, E]``; ``Lambda``: ``[N, L, E, E]`` if ``separable`` else ``[N, L, E, L, E]``
    (GGN-propagated); ``Lambda_exact``: the exact output Hessian (same layout), or ``None`` when it
    equals ``Lambda`` (the layer output is the model output).
    """

    r: Tensor
    Lambda: Tensor
    separable: bool
    Lambda_exact: Optional[Tensor] = None


@dataclass
class AttentionFactors:
    """Everything the closed-form blocks are assembled from (see module docstring).

    A snapshot: every tensor is computed from, or copied out of, the model at the time of the call.
    ``module`` is the layer they belong to, ``layout`` its parameter layout and ``attention`` the
    name of its variant.
    """

    module: nn.Module
    data: DataTerms
    weights: HeadWeights
    moments: MomentTerms
    loss: LossTerms
    num_heads: int
    head_dim: int
    attention: str
    layout: AttentionLayout


# ---------------------------------------------------------------------------------------------
def layer_moments(layer, x: Tensor, allowed, r: Tensor, weights: HeadWeights) -> MomentTerms:
    r"""Moments of ``layer``'s forward pass on inputs ``x [N, L, E]`` with output gradient ``r [N, L, E]``.

    ``weights`` are the layer's per-head weights (for the OV circuit ``U`` in :math:`\mathbf g_i`).
    """
    fwd = ForwardQuantities(layer, x, allowed)
    X = augment(x.detach(), layer.layout.bias)
    M1 = fwd.A @ X[:, None]
    g = torch.einsum("hae,nle->nhla", weights.U, r)
    if allowed is not None:
        allowed = allowed.expand(x.shape[0], 1, *allowed.shape[-2:])
    return MomentTerms(fwd.A, M1, fwd.Q, fwd.O, X, g, allowed, layer.variant)


# ---------------------------------------------------------------------------------------------
def output_terms(model_out, loss_func, y, F0: Tensor, out0: Tensor, w: float):
    """``(r, Lambda, separable, Lambda_exact)`` for one batch, batch weight ``w`` included.

    ``model_out(F)`` is the model output with the layer output replaced by ``F`` (the network above
    the layer), ``F0 [N, L, E]`` the layer output and ``out0`` the model output at it; ``out0 is F0``
    means the layer output is the model output.
    """
    if out0 is F0 and isinstance(loss_func, nn.MSELoss):
        # The layer output is the model output: closed form, token-separable.
        r = w * torch.func.grad(lambda f: loss_func(f, y))(F0)
        N, L, E = F0.shape
        c = w * (2.0 / F0.numel() if loss_func.reduction == "mean" else 2.0)
        Lam = (c * torch.eye(E, dtype=F0.dtype, device=F0.device)).expand(N, L, E, E)  # one E x E in memory
        return r, Lam, True, None

    def loss_of(f):
        return loss_func(model_out(f), y)

    N, L, E = F0.shape
    basis = torch.eye(L * E, dtype=F0.dtype, device=F0.device).view(L * E, 1, L, E).expand(L * E, N, L, E)
    r = w * grad(loss_of)(F0)
    Jt = vmap(lambda t: jvp(model_out, (F0,), (t,))[1])(basis)  # [LE, *out.shape]
    HJt = loss_hessian_mp(loss_func, out0, y, Jt)
    Lam = torch.einsum("bnk,cnk->nbc", Jt.reshape(L * E, N, -1), HJt.reshape(L * E, N, -1))
    # jacrev, not grad: torch's forward-mode rule of mse_loss_backward fails on grad's unbatched
    # unit cotangent ("ZeroTensors are immutable", torch 2.15); jacrev's batched one is fine.
    Hex = vmap(lambda t: jvp(jacrev(loss_of), (F0,), (t,))[1])(basis)  # [LE, N, L, E]
    Lam_ex = Hex.reshape(L * E, N, L * E).transpose(0, 1)
    return r, w * Lam.reshape(N, L, E, L, E), False, w * Lam_ex.reshape(N, L, E, L, E)
