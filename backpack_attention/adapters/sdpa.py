"""A drop-in for :func:`torch.nn.functional.scaled_dot_product_attention` with exact curvature.

:func:`scaled_dot_product_attention` has torch's signature and semantics and runs on the package's
softmax attention core (:func:`backpack_attention.derivatives.function.softmax_attention`): torch's
fused kernel in the forward pass, closed-form first and second derivatives and forward-mode
products, and, inside the curvature operators' cached forward pass, the cached attention matrix.
Converted third-party attention modules (:mod:`backpack_attention.adapters`) have their SDPA calls
routed here.

What it accepts, exactly as torch computes it (float64 agreement with torch's math kernel, values
and derivatives of every order):

* ``query [..., H, L, E]``, ``key [..., H_kv, L, E]``, ``value [..., H_kv, L, E_v]`` (3-D or 4-D,
  leading dimensions broadcast); the same number of queries and keys (self-attention);
* ``attn_mask``: ``None``; boolean (``True`` = the query may attend to the key: torch's SDPA
  convention, the opposite of ``nn.MultiheadAttention``'s ``key_padding_mask``); or floating point
  with entries that are ``0`` (attend) or "masked" (``-inf``, or any value ``<= finfo.min / 2``, as
  HuggingFace builds additive masks from ``finfo.min``), broadcastable to ``[..., L, L]``;
* ``is_causal`` (top-left causal mask, as torch), ``scale`` (folded into the query), ``enable_gqa``
  (key/value heads repeated, as torch does);
* query rows in which every key is masked (e.g. left padding with a causal mask): their output is
  0 and so are all their derivatives, as torch's math kernel (its "safe softmax") gives for boolean
  and ``-inf`` masks.

What it refuses, with a ``ValueError`` naming the caller:

* ``dropout_p > 0`` (random attention has no curvature; call ``model.eval()``);
* float masks with other entries (additive biases such as ALiBi or T5's relative positions) or
  that require grad;
* a query row masked entirely by *finite* values (e.g. ``finfo.min``): torch's forward then gives
  a uniform average of the values only through rounding, and its autograd derivatives do not
  belong to that function, so no exact curvature exists; use a boolean or ``-inf`` mask;
* a query length different from the key length (cross-attention, a KV cache holding past keys).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from backpack_attention.derivatives.function import softmax_attention

#: torch's own function, captured at import (routing replaces nothing; see ``patch.py``).
TORCH_SDPA = torch.nn.functional.scaled_dot_product_attention


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
) -> Tensor:
    """:func:`torch.nn.functional.scaled_dot_product_attention` with exact curvature (module docstring)."""
    return attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, caller="scaled_dot_product_attention")


def _masked_value(dtype: torch.dtype) -> float:
    """Float mask entries at or below this count as masked (``finfo.min / 2``; ``-inf`` included)."""
    return torch.finfo(dtype).min / 2


def allowed_from_mask(attn_mask: Tensor, caller: str):
    """``(allowed, finite_masked)`` from an SDPA ``attn_mask``: the boolean mask (``True`` = attend)
    and, for float masks, where entries are masked by a finite value (``None`` for bool masks)."""
    if attn_mask.dtype == torch.bool:
        return attn_mask, None
    if not attn_mask.is_floating_point():
        raise TypeError(f"{caller}: attn_mask must be bool or floating point, got {attn_mask.dtype}")
    if attn_mask.requires_grad:
        raise ValueError(
            f"{caller}: attn_mask requires grad (a learned attention bias); only fixed masks "
            "(entries 0 or masked) are supported"
        )
    masked = attn_mask <= _masked_value(attn_mask.dtype)
    allowed = ~masked
    if bool(((attn_mask != 0) & allowed).any()):  # also catches NaN
        raise ValueError(
            f"{caller}: attn_mask is an additive attention bias (entries other than 0 and masked "
            f"values <= finfo.min/2 or -inf); only masks are supported, not biases (ALiBi, relative positions)"
        )
    return allowed, masked & (attn_mask != float("-inf"))


def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
              enable_gqa=False, *, caller: str = "scaled_dot_product_attention") -> Tensor:
    """:func:`scaled_dot_product_attention`; ``caller`` names the module in error messages."""
    if dropout_p:
        raise ValueError(
            f"{caller}: attention dropout (dropout_p={dropout_p}) makes the function random and its "
            "curvature undefined; call model.eval() (or set the attention dropout to 0)"
        )
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor) or t.dim() not in (3, 4):
            raise ValueError(f"{caller}: {name} must be a 3-D or 4-D tensor, got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    if not (query.dim() == key.dim() == value.dim()):
        raise ValueError(f"{caller}: query, key and value must have the same number of dimensions")
    L, S = query.shape[-2], key.shape[-2]
    if L != S:
        raise ValueError(
            f"{caller}: {L} queries but {S} keys; only self-attention (as many queries as keys) is "
            "supported, not cross-attention or a KV cache holding past keys (pass use_cache=False)"
        )
    if is_causal and attn_mask is not None:
        raise RuntimeError(f"{caller}: explicit attn_mask should not be set when is_causal=True (as torch)")
    squeeze = query.dim() == 3
    if squeeze:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        Hq, Hk = query.shape[-3], key.shape[-3]
        if Hq % Hk or value.shape[-3] != Hk:
            raise ValueError(f"{caller}: enable_gqa needs query heads ({Hq}) divisible by key/value heads ({Hk})")
        key, value = key.repeat_interleave(Hq // Hk, -3), value.repeat_interleave(Hq // Hk, -3)
    batch = torch.broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2])
    query, key, value = (t if t.shape[:-2] == batch else t.expand(*batch, *t.shape[-2:]) for t in (query, key, value))
    d = query.shape[-1]
    if scale is not None and scale != 1 / math.sqrt(d):  # our core scales by 1/sqrt(d)
        query = query * (scale * math.sqrt(d))

    allowed, only_causal, keep = None, False, None
    if is_causal:
        allowed = torch.ones(L, S, dtype=torch.bool, device=query.device).tril()
        only_causal = True
    elif attn_mask is not None:
        allowed, finite = allowed_from_mask(attn_mask, caller)
        if squeeze and allowed.dim() == 3:
            allowed = allowed.unsqueeze(1)
            finite = None if finite is None else finite.unsqueeze(1)
        if not 2 <= allowed.dim() <= 4 or allowed.shape[-1] != S or allowed.shape[-2] not in (1, L):
            raise ValueError(f"{caller}: attn_mask of shape {tuple(allowed.shape)} does not broadcast to [..., {L}, {S}]")
        full = ~allowed.any(-1, keepdim=True)  # query rows that attend to nothing
        if bool(full.any()):
            if finite is not None and bool((full & finite.any(-1, keepdim=True)).any()):
                raise ValueError(
                    f"{caller}: attn_mask masks every key of some query row with finite values (e.g. "
                    "finfo.min); torch then returns a uniform average through rounding, whose derivatives "
                    "are not exact; use a boolean mask or -inf for masked entries"
                )
            allowed = allowed | full  # finite core; those rows are zeroed below (torch's safe softmax)
            keep = (~full).to(query.dtype)
    out = softmax_attention(query, key, value, allowed, only_causal)
    if keep is not None:
        out = out * keep
    return out.squeeze(1) if squeeze else out
