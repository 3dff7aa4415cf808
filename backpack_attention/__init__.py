"""backpack_attention: multi-head self-attention as a first-class citizen of BackPACK and curvlinops."""

from backpack_attention.blocks import attention_factors, hessian_blocks
from backpack_attention.derivatives.blocks import Block, HessianBlocks
from backpack_attention.derivatives.factors import AttentionFactors
from backpack_attention.layout import AttentionLayout
from backpack_attention.operators import AttentionGGNLinearOperator, AttentionHessianLinearOperator
from backpack_attention.spectra import attention_block_eigenvalues
from backpack_attention.operators import AttentionEKFACLinearOperator, AttentionKFACLinearOperator
from backpack_attention.kfac_quality import kfac_quality
from backpack_attention._compat import torch_math_attention
from backpack_attention.module import (
    MultiheadSelfAttention,
    SelfAttentionAdapter,
    convert_attention,
    param_index,
)

__version__ = "0.1.0"

__all__ = [
    "AttentionKFACLinearOperator",
    "AttentionEKFACLinearOperator",
    "kfac_quality",
    "AttentionGGNLinearOperator",
    "AttentionHessianLinearOperator",
    "attention_block_eigenvalues",
    "AttentionFactors",
    "AttentionLayout",
    "Block",
    "HessianBlocks",
    "attention_factors",
    "hessian_blocks",
    "MultiheadSelfAttention",
    "SelfAttentionAdapter",
    "convert_attention",
    "extend",
    "extensions",
    "param_index",
    "torch_math_attention",
]


def __getattr__(name):
    # BackPACK support is imported on first use (``ba.extend``, ``ba.extensions``), so importing
    # the package does not import BackPACK.
    if name == "extend":
        from backpack_attention.backpack_ext import extend

        return extend
    if name == "extensions":
        import importlib

        return importlib.import_module("backpack_attention.extensions")
    raise AttributeError(f"module 'backpack_attention' has no attribute {name!r}")
