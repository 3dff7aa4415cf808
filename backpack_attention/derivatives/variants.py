r"""Attention variants: the map from scores to attention weights, and its derivatives.

An attention variant is one small object. Everything else (the core's JVP, VJP and second-order
product in :mod:`~backpack_attention.derivatives.core`, the moments of the closed-form blocks in
:mod:`~backpack_attention.derivatives.factors`, the module's forward) is written once in terms of
these methods, so adding a variant is adding a class here (see docs/design.md, "Adding an
attention variant"). With :math:`\mathbf T = \mathbf Q\mathbf K^\top/\sqrt{d_K}` the scores and
``allowed`` a boolean mask broadcastable to ``[..., L, L]`` (``True`` = query ``i`` may attend to
key ``j``) or ``None``:

* :meth:`AttentionVariant.probabilities`: :math:`\mathbf A = \phi(\mathbf T)` row-wise;
* :meth:`AttentionVariant.jvp`: :math:`\mathrm d\mathbf A = \mathbf J\,\mathrm d\mathbf T` (the
  row-wise Jacobian :math:`\mathbf J_i = \partial\mathbf a_i/\partial\mathbf t_i`, symmetric for
  both variants here, so it is also the VJP);
* :meth:`AttentionVariant.second_order`: the derivative of :math:`\mathbf J^\top\mathbf G_A` along
  a tangent, for the Hessian products;
* :meth:`AttentionVariant.sigma` and :meth:`AttentionVariant.kappa_g`: the moments
  :math:`\boldsymbol\Sigma_i = \tilde{\mathbf X}^\top\mathbf J_i\tilde{\mathbf X}` and
  :math:`\boldsymbol\kappa_i[\mathbf g_i]` of docs/math.md (section 2);
* :meth:`AttentionVariant.forward`: the module's everyday forward ``O = A V`` (fastest kernel).
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import Tensor


class AttentionVariant:
    """Base class of an attention variant (see the module docstring). Subclasses set ``name``."""

    name: str = ""
    #: Whether the row sums of :math:`\mathbf J` can be read from the core output ``O = A V``
    #: (``rowsum(A * (G_O V^T)) = rowsum(G_O * O)``, the flash-attention backward trick).
    output_rowsum: bool = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def probabilities(self, T: Tensor, allowed: Optional[Tensor]) -> Tensor:
        raise NotImplementedError

    def jvp(self, A: Tensor, dT: Tensor, allowed: Optional[Tensor]) -> Tensor:
        raise NotImplementedError

    def second_order(self, A: Tensor, dA: Tensor, G_A: Tensor, dG_A: Tensor, rho: Optional[Tensor],
                     allowed: Optional[Tensor]) -> Tensor:
        r"""Tangent of :math:`\mathbf G_T = \mathbf J^\top\mathbf G_A` along ``dT`` (``dA = J dT``) and
        ``dG_A``: :math:`\mathbf J\,\mathrm d\mathbf G_A + (\partial_{\mathrm d\mathbf T}\mathbf J)\mathbf G_A`.

        ``rho`` is :math:`\mathrm{rowsum}(\mathbf A\odot\mathbf G_A)` ``[..., L, 1]`` where the
        variant needs it (else ``None``).
        """
        raise NotImplementedError

    def sigma(self, A: Tensor, X: Tensor, M1: Tensor, allowed: Optional[Tensor]) -> Tensor:
        r""":math:`\boldsymbol\Sigma_i = \tilde{\mathbf X}^\top\mathbf J_i\tilde{\mathbf X}`: ``A [N, H, L, L]``,
        ``X [N, L, d']``, ``M1 = A X [N, H, L, d']`` -> ``[N, H, L, d', d']``."""
        raise NotImplementedError

    def kappa_g(self, A: Tensor, X: Tensor, M1: Tensor, g: Tensor) -> Tensor:
        r""":math:`\boldsymbol\kappa_i[\mathbf g_i]` ``[N, H, L, d', d']`` for ``g [N, H, L, d']``
        (the second derivative of the attention rows contracted with ``g``)."""
        raise NotImplementedError

    def forward(self, Q: Tensor, K: Tensor, V: Tensor, allowed: Optional[Tensor], only_causal: bool = False) -> Tensor:
        """The module's forward ``O = A V`` ``[..., L, d_v]`` (differentiable to every order)."""
        from backpack_attention.derivatives.core import scores

        return self.probabilities(scores(Q, K), allowed) @ V


class Softmax(AttentionVariant):
    r"""Softmax attention: :math:`\mathbf a_i = \mathrm{softmax}(\mathbf t_i)` over allowed keys,
    :math:`\mathbf J_i = \mathrm{diag}(\mathbf a_i) - \mathbf a_i\mathbf a_i^\top`."""

    name = "softmax"
    output_rowsum = True

    def probabilities(self, T, allowed):
        if allowed is None:
            return torch.softmax(T, dim=-1)
        return torch.softmax(T.masked_fill(~allowed, float("-inf")), dim=-1)

    def jvp(self, A, dT, allowed):
        AdT = A * dT
        return AdT - A * AdT.sum(-1, keepdim=True)

    def second_order(self, A, dA, G_A, dG_A, rho, allowed):
        # S = dA * G_A + A * dG_A;  d(J^T G_A) = S - dA * rho - A * rowsum(S)
        S = torch.addcmul(dA * G_A, A, dG_A)
        return torch.addcmul(torch.addcmul(S, dA, rho, value=-1.0), A, S.sum(-1, keepdim=True), value=-1.0)

    def sigma(self, A, X, M1, allowed):
        AX = A[..., None] * X[:, None, None, :, :]  # [N, H, L(i), L(k), d']
        return AX.transpose(-1, -2) @ X[:, None, None] - M1[..., :, None] * M1[..., None, :]

    def kappa_g(self, A, X, M1, g):
        Xc = X[:, None, None, :, :] - M1[:, :, :, None, :]  # [N, H, L(i), L(k), d']: x_k - mu_i
        weight = A * torch.einsum("nhika,nhia->nhik", Xc, g)
        return (weight[..., None] * Xc).transpose(-1, -2) @ Xc  # sum_k w_ik (x_k - mu_i)(x_k - mu_i)^T

    def forward(self, Q, K, V, allowed, only_causal=False):
        from backpack_attention.derivatives.function import softmax_attention

        return softmax_attention(Q, K, V, allowed, only_causal)


class Linear(AttentionVariant):
    r"""The paper's softmax-free ("linear") attention: :math:`\mathbf A = \mathbf T\odot\text{mask}`,
    :math:`\mathbf J_i` the mask (no second derivative)."""

    name = "linear"

    def probabilities(self, T, allowed):
        return T if allowed is None else T * allowed

    def jvp(self, A, dT, allowed):
        return dT if allowed is None else dT * allowed

    def second_order(self, A, dA, G_A, dG_A, rho, allowed):
        return self.jvp(A, dG_A, allowed)

    def sigma(self, A, X, M1, allowed):
        mask = torch.ones_like(A) if allowed is None else allowed.to(A.dtype).expand_as(A)
        return torch.einsum("nhik,nka,nkb->nhiab", mask, X, X)

    def kappa_g(self, A, X, M1, g):
        N, H, L, d = M1.shape
        return M1.new_zeros(N, H, L, d, d)


#: The registered variants by name (what ``MultiheadSelfAttention(attention=...)`` accepts).
VARIANTS: Dict[str, AttentionVariant] = {v.name: v for v in (Softmax(), Linear())}


def get_variant(kind) -> AttentionVariant:
    """The variant for a name in :data:`VARIANTS` (or a variant object, returned as is)."""
    if isinstance(kind, AttentionVariant):
        return kind
    try:
        return VARIANTS[kind]
    except (KeyError, TypeError):
        raise ValueError(f"attention must be one of {tuple(VARIANTS)}, got {kind!r}") from None
