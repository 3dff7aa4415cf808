"""timm attention: recognise ``timm.layers.Attention`` (ViT, DeiT, ...), check it, switch it to SDPA.

``timm.layers.Attention`` (a fused ``qkv`` Linear; optional ``q_norm``/``k_norm``, ``norm`` and
gate) computes its core with ``F.scaled_dot_product_attention`` when ``fused_attn`` is set, and
with the same function written out otherwise. Conversion sets ``attn.fused_attn = True`` and routes
that call to the package's drop-in (:mod:`backpack_attention.adapters.patch`); the projections
and the query/key norms (identity or LayerNorm) stay timm's code, differentiated by autograd.
Subclasses that keep ``Attention.forward`` are converted as well.

Refused, naming the module: other timm attention classes (e.g. ``AttentionRope``: rotary
embeddings; ``AttentionPoolLatent``: cross-attention pooling), attention dropout > 0 in training
mode (also at a call).

timm is never imported here: classes are recognised by their module and name.
"""

from __future__ import annotations

from typing import List, Optional

from torch import nn

from backpack_attention.adapters._common import Candidate, class_code_names, dropout_probability, dropout_refusal, from_package

PACKAGE = "timm"
#: Where timm defines its ViT attention (timm >= 0.9 and older releases).
ATTENTION_HOMES = ("timm.layers.attention", "timm.models.vision_transformer")


def _timm_attention_class(module: nn.Module) -> Optional[type]:
    """timm's ``Attention`` class among the bases of ``type(module)``, or ``None``."""
    for c in type(module).__mro__:
        if c.__name__ == "Attention" and c.__module__ in ATTENTION_HOMES:
            return c
    return None


def _is_timm_attention_like(module: nn.Module) -> bool:
    """A timm module that computes attention itself (its class refers to SDPA or has ``fused_attn``)."""
    return from_package(module, PACKAGE) and "Attention" in type(module).__name__ and (
        hasattr(module, "fused_attn") or "scaled_dot_product_attention" in class_code_names(type(module)))


def candidates(model: nn.Module, skip: set) -> List[Candidate]:
    """timm attention modules of ``model`` (ids in ``skip`` left out), with refusals and the switch."""
    out = []
    for n, m in model.named_modules():
        if id(m) in skip:
            continue
        base = _timm_attention_class(m)
        if base is not None and type(m).forward is base.forward:
            c = Candidate(n, m, f"{PACKAGE}.{type(m).__name__}",
                          dropout_refusal(m, dropout_probability(m, "attn_drop")))
            c.prepare = (lambda m=m: setattr(m, "fused_attn", True))
            out.append(c)
        elif _is_timm_attention_like(m):
            name = type(m).__name__
            why = ("rotary position embeddings are not supported yet" if "Rope" in name
                   else "cross-attention pooling is not supported" if "Pool" in name
                   else f"timm's {name} is not supported (supported: timm.layers.Attention)")
            out.append(Candidate(n, m, f"{PACKAGE}.{name}", [why]))
    return out
