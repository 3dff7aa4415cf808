"""Attention modules of other libraries, converted by routing their SDPA call (docs/adapters.md).

HuggingFace ``transformers`` (GPT-2, BERT-style, ViT, ...), timm's ``Attention`` and hand-written
fused-qkv self-attention (nanoGPT) all compute their attention core with
``F.scaled_dot_product_attention``, or can be switched to. :func:`convert_other_attention` (called
by :func:`backpack_attention.convert_attention`) switches them to that path and, while such a
module's forward runs, answers its SDPA calls with the package's drop-in
(:func:`scaled_dot_product_attention`: torch's fused kernel forward, closed-form derivatives of
every order). Parameters, ``state_dict()`` keys, classes, call signatures and outputs stay as they
are; only the attention core changes, so every curvature method that differentiates the whole
model (the curvature operators, double backward, ``torch.func``) is exact and fast on it.

Neither transformers nor timm is imported by this package: modules are recognised by their
class's package, name and code.
"""

from __future__ import annotations

from typing import List, Tuple

from torch import nn

from backpack_attention.adapters import huggingface, nanogpt, timm
from backpack_attention.adapters._common import Candidate
from backpack_attention.adapters.patch import MARK, is_routed, route_sdpa, unroute_sdpa
from backpack_attention.adapters.sdpa import scaled_dot_product_attention

__all__ = [
    "Candidate",
    "convert_other_attention",
    "converted_modules",
    "find_other_attention",
    "is_routed",
    "scaled_dot_product_attention",
    "unroute_sdpa",
]

#: The library adapters, in the order they claim modules.
ADAPTERS = (huggingface, timm, nanogpt)

#: Kind recorded for ``nn.MultiheadAttention`` layers replaced by ``SelfAttentionAdapter``.
MHA_KIND = "torch.nn.MultiheadAttention"


def find_other_attention(model: nn.Module) -> List[Candidate]:
    """The attention modules of ``model`` the library adapters recognise and have not converted yet
    (each with the reasons it cannot be converted, if any). Changes nothing."""
    skip = {id(m) for m in model.modules() if is_routed(m) or isinstance(m, nn.MultiheadAttention)}
    found: List[Candidate] = []
    for adapter in ADAPTERS:
        new = adapter.candidates(model, skip)
        skip |= {id(c.module) for c in new}
        found += new
    return found


def convert_other_attention(model: nn.Module) -> List[Tuple[str, str]]:
    """Convert, in place, the HuggingFace, timm and hand-written SDPA attention of ``model``.

    All modules are checked first: if any cannot be converted exactly, a ``ValueError`` names every
    such module and why, and the model is left untouched. Modules converted before are left as
    they are (converting twice is harmless).

    Returns:
        ``[(name, kind)]`` of the modules converted by this call (``kind`` e.g.
        ``"transformers.GPT2Attention"``, ``"timm.Attention"``, ``"fused-qkv.CausalSelfAttention"``).
    """
    found = find_other_attention(model)
    refused = [f"{c.label}: {'; '.join(c.refusals)}" for c in found if c.refusals]
    if refused:
        raise ValueError("convert_attention: cannot convert exactly: " + " | ".join(refused))
    for c in found:
        if c.prepare is not None:
            c.prepare()
    for c in found:
        route_sdpa(c.module, c.kind, c.name, c.check)
    return [(c.name, c.kind) for c in found]


def converted_modules(model: nn.Module) -> List[Tuple[str, str]]:
    """``[(name, kind)]`` of every attention module of ``model`` that ``convert_attention`` converted.

    ``nn.MultiheadAttention`` layers replaced by a ``SelfAttentionAdapter`` have kind
    ``"torch.nn.MultiheadAttention"``; modules whose SDPA call is routed have their adapter's kind.
    Read from the modules themselves, so it also holds for a copy or a submodule of the model.
    """
    from backpack_attention.module import SelfAttentionAdapter  # module.py imports this package lazily

    out = []
    for n, m in model.named_modules():
        if isinstance(m, SelfAttentionAdapter):
            out.append((n, MHA_KIND))
        elif getattr(m, MARK, None) is not None:
            out.append((n, getattr(m, MARK)))
    return out
