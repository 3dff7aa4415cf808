"""Hand-written self-attention: a fused ``qkv`` Linear and a call of ``F.scaled_dot_product_attention``.

The pattern of nanoGPT's ``CausalSelfAttention`` (``c_attn = nn.Linear(E, 3E)``, split into
``q, k, v``, heads, ``F.scaled_dot_product_attention(q, k, v, is_causal=True)``, ``c_proj``) and of
many research code bases. Recognised structurally: a module of the user's code (not torch,
transformers, timm or this package) whose class's methods refer to ``scaled_dot_product_attention``
and which has a direct ``nn.Linear`` child with three times as many outputs as inputs (a fused
query/key/value projection: evidence of self-attention). Conversion routes its SDPA calls to the
package's drop-in (:mod:`backpack_attention.adapters.patch`); the rest of its forward is unchanged.
nanoGPT's ``flash`` switch is set to ``True`` (its other branch writes the same attention out).

Refused, naming the module: attention dropout > 0 in training mode (attributes ``dropout``,
``attn_dropout``, ``attn_drop``; also refused at a call); calls the drop-in refuses (more keys than
queries, additive biases).
"""

from __future__ import annotations

from typing import List

from torch import nn

from backpack_attention.adapters._common import Candidate, class_code_names, dropout_probability, dropout_refusal, from_package

#: Packages whose modules are never recognised here (they have their own adapters or none).
FOREIGN = ("torch", "transformers", "timm", "backpack_attention", "backpack", "curvlinops")


def has_fused_qkv(module: nn.Module) -> bool:
    """A direct ``nn.Linear`` child with ``out_features`` three times ``in_features``."""
    return any(isinstance(c, nn.Linear) and c.out_features == c.in_features * 3 for c in module.children())


def calls_sdpa(module: nn.Module) -> bool:
    """Whether the methods of ``type(module)`` refer to ``scaled_dot_product_attention``."""
    return "scaled_dot_product_attention" in class_code_names(type(module))


def candidates(model: nn.Module, skip: set) -> List[Candidate]:
    """Hand-written fused-qkv SDPA self-attention modules of ``model`` (ids in ``skip`` left out)."""
    out = []
    for n, m in model.named_modules():
        if id(m) in skip or any(from_package(m, p) for p in FOREIGN) or isinstance(m, nn.MultiheadAttention):
            continue
        if calls_sdpa(m) and has_fused_qkv(m):
            c = Candidate(n, m, f"fused-qkv.{type(m).__name__}",
                          dropout_refusal(m, dropout_probability(m, "dropout", "attn_dropout", "attn_drop")))
            if getattr(m, "flash", None) is False:  # nanoGPT without SDPA: switch it on
                c.prepare = (lambda m=m: setattr(m, "flash", True))
            out.append(c)
    return out
