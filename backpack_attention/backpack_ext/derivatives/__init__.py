"""BackPACK derivatives classes, one per module (BackPACK's ``core/derivatives`` idea).

* :class:`MHSADerivatives`: :class:`~backpack_attention.MultiheadSelfAttention` (``attention.py``).
* :class:`LayerNormDerivatives`: ``nn.LayerNorm`` (``layernorm.py``).
* :class:`GELUDerivatives`: ``nn.GELU`` (``gelu.py``).
* :class:`SequenceMSELossDerivatives`: ``nn.MSELoss`` on ``[N, *, C]`` outputs (``mse.py``).
* :class:`EmbeddingDerivatives`: BackPACK's, fixed for ``float64`` (``embedding.py``).
* :class:`TokenMeanDerivatives`: mean pooling over tokens, ``TokenMean`` (``tokenmean.py``).
* :class:`IgnoreIndexCrossEntropyLossDerivatives`: ``nn.CrossEntropyLoss`` with ``ignore_index``
  (``crossentropy.py``).

Shape conventions are BackPACK's: a backpropagated matrix ``mat`` is ``[V, N, *out]`` where ``V``
is a free axis (loss-Hessian square-root columns or Monte-Carlo samples).
"""

from backpack_attention.backpack_ext.derivatives.attention import (
    CORE_CHUNK_NUMEL,
    MHSADerivatives,
    allowed_mask,
    attention_masks,
    clear_module_cache,
)
from backpack_attention.backpack_ext.derivatives.crossentropy import IgnoreIndexCrossEntropyLossDerivatives
from backpack_attention.backpack_ext.derivatives.embedding import EmbeddingDerivatives
from backpack_attention.backpack_ext.derivatives.gelu import GELUDerivatives
from backpack_attention.backpack_ext.derivatives.layernorm import LayerNormDerivatives
from backpack_attention.backpack_ext.derivatives.mse import SequenceMSELossDerivatives
from backpack_attention.backpack_ext.derivatives.tokenmean import TokenMeanDerivatives

__all__ = [
    "CORE_CHUNK_NUMEL",
    "EmbeddingDerivatives",
    "GELUDerivatives",
    "IgnoreIndexCrossEntropyLossDerivatives",
    "LayerNormDerivatives",
    "MHSADerivatives",
    "SequenceMSELossDerivatives",
    "TokenMeanDerivatives",
    "allowed_mask",
    "attention_masks",
    "clear_module_cache",
]
