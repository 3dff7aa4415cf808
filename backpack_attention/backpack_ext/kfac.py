r"""Kronecker-factored module extensions (KFAC, KFLR) with weight sharing over the sequence.

BackPACK's ``HBPLinear`` accepts 2-D inputs only. For a layer applied to ``[N, *R, D]``
inputs (``R`` shared positions, e.g. the sequence) the two standard generalisations
(Eschenhagen et al., 2023; curvlinops' ``KFACType``) are

* ``"expand"``: positions are extra samples, ``A = sum_{n,r} x x^T / (N |R|)``,
  ``G = sum_{v,n,r} s s^T``;
* ``"reduce"``: ``A = sum_n xbar xbar^T / N`` with ``xbar`` the mean over positions,
  ``G = sum_{v,n} sbar sbar^T`` with ``sbar`` the *sum* over positions,

where ``s`` are the rows of the backpropagated square-root factor (exact for KFLR, Monte-Carlo
for KFAC). For 2-D inputs both equal BackPACK's KFAC/KFLR. Results are lists of Kronecker
factors whose Kronecker product approximates the GGN block of the row-major flattened
parameter (BackPACK's convention): ``[G, A]`` for ``weight [out, in]``, ``[G]`` for a bias.

Attention (:class:`HBPMHSA`) treats its in-projection (rows ``g_qkv = J_core^T ...``) and
out-projection as two such linear layers. LayerNorm's ``weight``/``bias`` get their exact
(KFLR) or sampled (KFAC) dense GGN block ``[G]``; Embedding gets ``[A, G]`` (its weight is
stored ``[num_embeddings, dim]``, i.e. transposed relative to a Linear).
"""

from __future__ import annotations

from typing import List

import torch
from backpack.core.derivatives.permute import PermuteDerivatives
from backpack.extensions.secondorder.hbp.hbp_options import BackpropStrategy
from backpack.extensions.secondorder.hbp.hbpbase import HBPBaseModule
from backpack.extensions.secondorder.hbp.linear import HBPLinear
from torch import Tensor

from backpack_attention.backpack_ext.base import ClearsAttentionCache
from backpack_attention.derivatives.kfac import (  # noqa: F401
    KFAC_APPROXIMATIONS,
    OPERATOR_KFAC_APPROXIMATIONS,
    AttentionKFACTerms,
    gradient_factor,
    input_factor,
)
from backpack_attention.backpack_ext.derivatives import (
    EmbeddingDerivatives,
    GELUDerivatives,
    LayerNormDerivatives,
    MHSADerivatives,
)

def requested_approx(ext) -> str:
    """The ``kfac_approx`` of extension ``ext`` as given (default ``"expand"``)."""
    return check_kfac_approx(getattr(ext, "kfac_approx", "expand"))


#: The ``kfac_approx`` values of the BackPACK extensions KFAC and KFLR.
BACKPACK_KFAC_APPROXIMATIONS = ("attention",) + KFAC_APPROXIMATIONS


def check_kfac_approx(approx: str) -> str:
    """``approx`` if the BackPACK extensions support it, else ``ValueError``."""
    if approx not in BACKPACK_KFAC_APPROXIMATIONS:
        hint = (" ('attention-reduce' is available in AttentionKFACLinearOperator only)"
                if approx == "attention-reduce" else "")
        raise ValueError(f"kfac_approx must be one of {BACKPACK_KFAC_APPROXIMATIONS}, got {approx!r}{hint}")
    return approx


def kfac_approx_of(ext) -> str:
    """The weight-sharing approximation for layers that are not attention: ``"expand"`` or
    ``"reduce"`` (``"attention"`` means expand for them, as in ``AttentionKFACLinearOperator``)."""
    approx = requested_approx(ext)
    return "expand" if approx == "attention" else approx


def require_sqrt_strategy(ext, module) -> None:
    """Raise ``NotImplementedError`` for KFRA (batch-average backpropagation)."""
    if not BackpropStrategy.is_sqrt(ext.get_backprop_strategy()):
        raise NotImplementedError(
            f"BackPACK extension {type(ext).__name__} (batch-averaged Hessian backpropagation) is "
            f"not supported for module {type(module).__name__}; use KFAC or KFLR"
        )


class HBPLinearShared(HBPLinear):
    """``nn.Linear`` on ``[N, *R, in]`` inputs (KFAC/KFLR ``expand`` or ``reduce``).

    Identical to BackPACK's ``HBPLinear`` for 2-D inputs (and for KFRA, which stays 2-D only).
    """

    def check_parameters(self, ext, module) -> None:
        if not BackpropStrategy.is_sqrt(ext.get_backprop_strategy()):
            super().check_parameters(ext, module)

    def _weight_for_sqrt(self, ext, module, backproped):
        if module.input0.dim() == 2:  # BackPACK's own computation, bit for bit
            return super()._weight_for_sqrt(ext, module, backproped)
        approx = kfac_approx_of(ext)
        return [gradient_factor(backproped, approx), input_factor(module.input0, approx)]

    def bias(self, ext, module, g_inp, g_out, backproped):
        if module.input0.dim() == 2 or not BackpropStrategy.is_sqrt(ext.get_backprop_strategy()):
            return super().bias(ext, module, g_inp, g_out, backproped)
        return [gradient_factor(backproped, kfac_approx_of(ext))]


def _group_name(group) -> str:
    g, h = group
    return g if h is None else f"{g}[{h}]"


class HBPMHSA(ClearsAttentionCache, HBPBaseModule):
    """KFAC/KFLR for attention: ``[G_in, A_in]``, ``[G_in]``, ``[G_out, A_out]``, ``[G_out]``.

    ``G_in [3E, 3E]`` comes from the core's transposed Jacobian applied to the factor
    (``g_qkv``), ``A_in [E, E]`` from the input ``x``; ``G_out``, ``A_out`` from the factor and the
    concatenated head outputs ``z``.

    With ``kfac_approx="attention"`` the factors are the attention-aware ones of
    :class:`~backpack_attention.AttentionKFACLinearOperator` (docs/kfac.md), one Kronecker product
    per group: ``in_proj_weight -> {"Q": [G, A], "K[h]": [G, A], "V[h]": [G, A]}`` (each the block
    ``kron(G, A)`` of that group's rows of ``in_proj_weight``, ``param_index`` order),
    ``in_proj_bias -> {"Q": [G b], ...}`` (``b`` the bias entry of the input factor; 0 for ``b_K``),
    ``out_proj_weight -> [G, A]``, ``out_proj_bias -> [G b]``: the operator's blocks with
    ``separate_weight_and_bias=True``, from BackPACK's square-root columns.
    """

    def __init__(self):
        super().__init__(derivatives=MHSADerivatives(), params=MHSADerivatives.PARAMS)

    def _attention_factors(self, module, backproped):
        """``{group: (out, in)}`` of the attention recipe (cached for the four parameters)."""
        cache = module.__dict__.setdefault("_bpa_cache", {})
        key = ("kfac_attention", id(backproped))
        hit = cache.get(key)
        if hit is not None and hit[0] is backproped:
            return hit[1]
        fwd = self.derivatives.forward_quantities(module)
        terms = AttentionKFACTerms(module, fwd.x, fwd.allowed, "attention", fq=fwd)
        factors = terms.factors(backproped)
        cache[key] = (backproped, factors)
        return factors

    def _attention_param(self, module, backproped, weight: bool, groups):
        E = module.embed_dim
        out = {}
        for g in groups:
            G, A = self._attention_factors(module, backproped)[g]
            out[_group_name(g)] = [G, A[:E, :E]] if weight else [G * A[E, E]]
        return out

    @staticmethod
    def _attention_factors_keys(module):
        return [("Q", None)] + [("K", h) for h in range(module.num_heads)] + [("V", h) for h in range(module.num_heads)]

    def in_proj_weight(self, ext, module, g_inp, g_out, backproped):
        require_sqrt_strategy(ext, module)
        if requested_approx(ext) == "attention":
            return self._attention_param(module, backproped, True, self._attention_factors_keys(module))
        approx = kfac_approx_of(ext)
        G_qkv = self.derivatives.qkv_cotangent(module, backproped)
        return [gradient_factor(G_qkv, approx), input_factor(module.input0, approx)]

    def in_proj_bias(self, ext, module, g_inp, g_out, backproped):
        require_sqrt_strategy(ext, module)
        if requested_approx(ext) == "attention":
            return self._attention_param(module, backproped, False, self._attention_factors_keys(module))
        return [gradient_factor(self.derivatives.qkv_cotangent(module, backproped), kfac_approx_of(ext))]

    def out_proj_weight(self, ext, module, g_inp, g_out, backproped) -> List[Tensor]:
        require_sqrt_strategy(ext, module)
        if requested_approx(ext) == "attention":
            return self._attention_param(module, backproped, True, [("O", None)])["O"]
        approx = kfac_approx_of(ext)
        Z = self.derivatives.forward_quantities(module).Z
        return [gradient_factor(backproped, approx), input_factor(Z, approx)]

    def out_proj_bias(self, ext, module, g_inp, g_out, backproped) -> List[Tensor]:
        require_sqrt_strategy(ext, module)
        if requested_approx(ext) == "attention":
            return self._attention_param(module, backproped, False, [("O", None)])["O"]
        return [gradient_factor(backproped, kfac_approx_of(ext))]

    def backpropagate(self, ext, module, g_inp, g_out, backproped):
        require_sqrt_strategy(ext, module)
        return super().backpropagate(ext, module, g_inp, g_out, backproped)


class _DenseBlock(HBPBaseModule):
    """Parameters whose (exact or sampled) GGN block is returned densely as ``[G]``.

    ``G = sum_{v,n} u u^T`` with ``u = J_theta^T s`` per sample (flattened parameter).
    """

    def _dense(self, ext, module, backproped, name) -> List[Tensor]:
        require_sqrt_strategy(ext, module)
        U = self.derivatives.param_mjp(name, module, None, None, backproped, sum_batch=False)
        U = U.reshape(-1, getattr(module, name).numel())
        return [U.T @ U]

    def backpropagate(self, ext, module, g_inp, g_out, backproped):
        require_sqrt_strategy(ext, module)
        return super().backpropagate(ext, module, g_inp, g_out, backproped)


class HBPLayerNorm(_DenseBlock):
    """``nn.LayerNorm``: dense GGN blocks ``[G_weight]`` and ``[G_bias]`` (``D x D``)."""

    def __init__(self):
        super().__init__(derivatives=LayerNormDerivatives(), params=["weight", "bias"])

    def weight(self, ext, module, g_inp, g_out, backproped):
        return self._dense(ext, module, backproped, "weight")

    def bias(self, ext, module, g_inp, g_out, backproped):
        return self._dense(ext, module, backproped, "bias")


class HBPEmbedding(HBPBaseModule):
    """``nn.Embedding`` (a Linear on one-hot inputs): ``weight [K, D] -> [A (K x K), G (D x D)]``.

    ``expand``: ``A = diag(token counts) / (N |R|)``; ``reduce``: from position-averaged one-hots.
    """

    def __init__(self):
        super().__init__(derivatives=EmbeddingDerivatives(), params=["weight"])

    def weight(self, ext, module, g_inp, g_out, backproped):
        require_sqrt_strategy(ext, module)
        approx = kfac_approx_of(ext)
        idx = module.input0
        K = module.num_embeddings
        w = module.weight
        if approx == "expand" or idx.dim() == 1:
            counts = torch.bincount(idx.reshape(-1), minlength=K).to(w.dtype)
            A = torch.diag(counts / idx.numel())
        else:
            onehot = torch.nn.functional.one_hot(idx, K).to(w.dtype)
            A = input_factor(onehot, approx)
        return [A, gradient_factor(backproped, approx)]


class HBPGELU(HBPBaseModule):
    def __init__(self):
        super().__init__(derivatives=GELUDerivatives())


class HBPPermute(HBPBaseModule):
    def __init__(self):
        super().__init__(derivatives=PermuteDerivatives())
