"""Square-root GGN module extensions: DiagGGN{Exact,MC}, BatchDiagGGN{Exact,MC}, SqrtGGN{Exact,MC}.

All backpropagate a square-root factor ``S [V, N, *out] -> J^T S [V, N, *in]`` and build
parameter results from ``param_mjp(S, sum_batch=False) [V, N, *param]`` (BackPACK's bases).
Tokens interfere inside the Jacobian products, so results are exact (squares are taken
after summing over the sequence).
"""

from __future__ import annotations

import backpack.utils.linear as linear_utils
import torch
from backpack.core.derivatives.linear import LinearDerivatives
from backpack.core.derivatives.permute import PermuteDerivatives
from torch import Tensor
from backpack.extensions.secondorder.diag_ggn.diag_ggn_base import DiagGGNBaseModule
from backpack.extensions.secondorder.sqrt_ggn.base import SqrtGGNBaseModule

from backpack_attention.backpack_ext.base import ClearsAttentionCache
from backpack_attention.backpack_ext.derivatives import (
    EmbeddingDerivatives,
    GELUDerivatives,
    LayerNormDerivatives,
    MHSADerivatives,
)

MHSA_PARAMS = MHSADerivatives.PARAMS
LN_PARAMS = ["weight", "bias"]


#: Largest ``[n, V, O, I]`` chunk of per-sample weight Jacobian products formed at once.
DIAG_CHUNK_NUMEL = 2**24


def shared_weight_diagonal(S: Tensor, x: Tensor, sum_batch: bool) -> Tensor:
    r"""GGN diagonal of a weight applied at every position: ``[(N,) O, I]``.

    .. math:: \mathrm{diag}[o, i] = \sum_{v,n}\Big(\sum_l S_{vnlo} x_{nli}\Big)^2

    for ``S [V, N, *R, O]`` and inputs ``x [N, *R, I]`` (``R`` flattened to ``L``). Squares are
    taken after the sum over positions (tokens interact). For wide inputs (``I >= 3 L``) it uses
    the token Gram matrices ``K_{nolm} = sum_v S_{vnlo} S_{vnmo}`` (``V N O L^2`` instead of
    ``V N O I L`` operations); otherwise batched matrix products, chunked over samples.
    """
    S = S.flatten(2, -2)
    x = x.detach().flatten(1, -2)
    V, N, L, O = S.shape
    I = x.shape[-1]
    if 3 * L <= I:
        Sp = S.permute(1, 3, 2, 0)  # [N, O, L, V]
        K = Sp @ Sp.transpose(-1, -2)  # [N, O, L, L]
        out = torch.einsum("noli,nli->noi", K @ x.unsqueeze(1), x)
    else:
        chunk = max(1, DIAG_CHUNK_NUMEL // max(1, V * O * I))
        parts = []
        for n0 in range(0, N, chunk):
            Sn = S[:, n0:n0 + chunk].permute(1, 0, 3, 2)  # [n, V, O, L]
            JS = Sn @ x[n0:n0 + chunk].unsqueeze(1)  # [n, V, O, I]
            parts.append(JS.pow_(2).sum(1))
        out = torch.cat(parts)
    return out.sum(0) if sum_batch else out


class DiagGGNLinearShared(DiagGGNBaseModule):
    """``nn.Linear``: BackPACK's computation for 2-D inputs, :func:`shared_weight_diagonal` else."""

    def __init__(self, sum_batch: bool = True):
        self.sum_batch = sum_batch
        super().__init__(LinearDerivatives(), params=["bias", "weight"])

    def bias(self, ext, module, g_inp, g_out, backproped):
        return linear_utils.extract_bias_diagonal(module, backproped, sum_batch=self.sum_batch)

    def weight(self, ext, module, g_inp, g_out, backproped):
        if module.input0.dim() == 2:
            return linear_utils.extract_weight_diagonal(module, backproped, sum_batch=self.sum_batch)
        return shared_weight_diagonal(backproped, module.input0, self.sum_batch)


class DiagGGNMHSA(ClearsAttentionCache, DiagGGNBaseModule):
    """GGN diagonal of attention parameters (``sum_batch=False``: per sample)."""

    def __init__(self, sum_batch: bool = True):
        self.sum_batch = sum_batch
        super().__init__(MHSADerivatives(), params=MHSA_PARAMS, sum_batch=sum_batch)

    def in_proj_weight(self, ext, module, g_inp, g_out, backproped):
        G_qkv = self.derivatives.qkv_cotangent(module, backproped)
        return shared_weight_diagonal(G_qkv, module.input0, self.sum_batch)

    def out_proj_weight(self, ext, module, g_inp, g_out, backproped):
        Z = self.derivatives.forward_quantities(module).Z
        return shared_weight_diagonal(backproped, Z, self.sum_batch)


class DiagGGNLayerNorm(DiagGGNBaseModule):
    def __init__(self, sum_batch: bool = True):
        super().__init__(LayerNormDerivatives(), params=LN_PARAMS, sum_batch=sum_batch)


class DiagGGNGELU(DiagGGNBaseModule):
    def __init__(self):
        super().__init__(GELUDerivatives())


class SqrtGGNMHSA(ClearsAttentionCache, SqrtGGNBaseModule):
    """GGN square-root factor ``[V, N, *param]`` of attention parameters."""

    def __init__(self):
        super().__init__(MHSADerivatives(), params=MHSA_PARAMS)


class SqrtGGNLayerNorm(SqrtGGNBaseModule):
    def __init__(self):
        super().__init__(LayerNormDerivatives(), params=LN_PARAMS)


class SqrtGGNGELU(SqrtGGNBaseModule):
    def __init__(self):
        super().__init__(GELUDerivatives())


class SqrtGGNPermute(SqrtGGNBaseModule):
    def __init__(self):
        super().__init__(PermuteDerivatives())


class DiagGGNEmbedding(DiagGGNBaseModule):
    def __init__(self, sum_batch: bool = True):
        super().__init__(EmbeddingDerivatives(), params=["weight"], sum_batch=sum_batch)


class SqrtGGNEmbedding(SqrtGGNBaseModule):
    def __init__(self):
        super().__init__(EmbeddingDerivatives(), params=["weight"])
