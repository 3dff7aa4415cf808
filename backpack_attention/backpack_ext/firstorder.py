"""First-order module extensions (BatchGrad, BatchL2Grad, SumGradSquared, Variance).

They reuse BackPACK's base classes with the derivatives of :mod:`.derivatives`: per-sample
parameter gradients are ``param_mjp(g_out[0], sum_batch=False)``.
"""

from __future__ import annotations

from backpack.extensions.firstorder.batch_grad.batch_grad_base import BatchGradBase
from backpack.extensions.firstorder.batch_l2_grad.batch_l2_base import BatchL2Base
from backpack.extensions.firstorder.gradient.base import GradBaseModule
from backpack.extensions.firstorder.sum_grad_squared.sgs_base import SGSBase
from backpack.extensions.firstorder.variance.variance_base import VarianceBaseModule

from backpack_attention.backpack_ext.base import ClearsAttentionCache
from backpack_attention.backpack_ext.derivatives import (
    EmbeddingDerivatives,
    LayerNormDerivatives,
    MHSADerivatives,
)

MHSA_PARAMS = MHSADerivatives.PARAMS
LN_PARAMS = ["weight", "bias"]


class BatchGradMHSA(ClearsAttentionCache, BatchGradBase):
    """Per-sample gradients ``[N, *param]`` of attention parameters (``grad_batch``)."""

    def __init__(self):
        super().__init__(derivatives=MHSADerivatives(), params=MHSA_PARAMS)


class BatchL2GradMHSA(ClearsAttentionCache, BatchL2Base):
    """Per-sample squared gradient norms ``[N]`` of attention parameters (``batch_l2``)."""

    def __init__(self):
        super().__init__(MHSA_PARAMS, MHSADerivatives())


class SGSMHSA(ClearsAttentionCache, SGSBase):
    """Sum of squared per-sample gradients of attention parameters (``sum_grad_squared``)."""

    def __init__(self):
        super().__init__(MHSADerivatives(), MHSA_PARAMS)


class VarianceMHSA(ClearsAttentionCache, VarianceBaseModule):
    """Gradient variance of attention parameters (``variance``)."""

    def __init__(self):
        super().__init__(
            MHSA_PARAMS,
            GradBaseModule(MHSADerivatives(), MHSA_PARAMS),
            SGSBase(MHSADerivatives(), MHSA_PARAMS),
        )


class BatchGradLayerNorm(BatchGradBase):
    def __init__(self):
        super().__init__(derivatives=LayerNormDerivatives(), params=LN_PARAMS)


class BatchL2GradLayerNorm(BatchL2Base):
    def __init__(self):
        super().__init__(LN_PARAMS, LayerNormDerivatives())


class SGSLayerNorm(SGSBase):
    def __init__(self):
        super().__init__(LayerNormDerivatives(), LN_PARAMS)


class VarianceLayerNorm(VarianceBaseModule):
    def __init__(self):
        super().__init__(
            LN_PARAMS,
            GradBaseModule(LayerNormDerivatives(), LN_PARAMS),
            SGSBase(LayerNormDerivatives(), LN_PARAMS),
        )


def embedding_extensions():
    """``{extension class name: module extension}`` for ``nn.Embedding`` (float64-safe)."""
    d, p = EmbeddingDerivatives(), ["weight"]
    return {
        "BatchGrad": BatchGradBase(derivatives=d, params=p),
        "BatchL2Grad": BatchL2Base(p, d),
        "SumGradSquared": SGSBase(d, p),
        "Variance": VarianceBaseModule(p, GradBaseModule(d, p), SGSBase(d, p)),
    }
