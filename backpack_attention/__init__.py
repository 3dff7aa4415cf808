"""backpack_attention: multi-head self-attention as a first-class citizen of BackPACK and curvlinops."""

from backpack_attention.module import (
    MultiheadSelfAttention,
    SelfAttentionAdapter,
    convert_attention,
    param_index,
)

__version__ = "0.1.0"

__all__ = [
    "MultiheadSelfAttention",
    "SelfAttentionAdapter",
    "convert_attention",
    "param_index",
]
