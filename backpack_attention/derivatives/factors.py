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


@dataclass
class MomentTerms:
    r"""Attention moments per sequence ``n``, head ``h`` and query token ``i``.

    ``A`` ``[N, H, L, L]``; ``M1`` ``[N, H, L, d']`` (:math:`\boldsymbol\mu_i`); ``Sigma``
    ``[N, H, L, d', d']`` (:math:`\tilde{\mathbf X}^\top\mathbf J_i\tilde{\mathbf X}`: the attention
    covariance for softmax, the masked Gram matrix for linear attention); ``kappa_g``
    ``[N, H, L, d', d']`` (:math:`\boldsymbol\kappa_i[\mathbf g_i]`, zero for linear attention);
    ``q`` ``[N, H, L, d_K]`` (unscaled queries) and ``z`` ``[N, H, L, d_h]`` (head outputs).
    """

    A: Tensor
    M1: Tensor
    Sigma: Tensor
    kappa_g: Tensor
    q: Tensor
    z: Tensor


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
    A, variant = fwd.A, layer.variant
    M1 = A @ X[:, None]
    Sigma = variant.sigma(A, X, M1, allowed)
    g = torch.einsum("hae,nle->nhla", weights.U, r)
    return MomentTerms(A, M1, Sigma, variant.kappa_g(A, X, M1, g), fwd.Q, fwd.O)


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
        Lam = c * torch.eye(E, dtype=F0.dtype, device=F0.device).expand(N, L, E, E)
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
