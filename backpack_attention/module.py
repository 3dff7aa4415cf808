"""The attention module the package is built on, its drop-in for ``nn.MultiheadAttention``,
and the index map of its parameters.

:class:`MultiheadSelfAttention` owns its parameters directly (no child modules) and takes a
single input, so BackPACK can hook it and curvlinops can find its parameters. Its forward uses
PyTorch's fastest attention kernel; derivatives of every order come from closed forms
(:mod:`backpack_attention.derivatives`), never from differentiating that kernel.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from backpack_attention.derivatives.core import ATTENTION_KINDS, attention_matrix
from backpack_attention.derivatives.forward import attention_forward, project
from backpack_attention.derivatives.variants import get_variant
from backpack_attention.layout import BLOCK_NAMES, PARAM_NAMES, AttentionLayout  # noqa: F401 (re-exported)


def _bool_mask(mask, name: str):
    """torch's float masks (0 = keep, -inf = mask out), as nn.TransformerEncoderLayer passes them, to bool."""
    if mask is None or not isinstance(mask, Tensor) or mask.dtype == torch.bool:
        return mask
    msg = (f"{name} must be bool (True = masked) or float with entries 0 and -inf; "
           "additive attention biases are not supported")
    if not mask.is_floating_point() or not check_on_device(((mask == 0) | (mask == float("-inf"))).all(), msg):
        raise ValueError(msg)
    return mask == float("-inf")


def check_on_device(condition: Tensor, message: str) -> bool:
    """``bool(condition)`` for a one-element tensor on the CPU. On an accelerator, no host
    synchronisation: an asynchronous device assertion with ``message`` (it fails at a later kernel
    launch and, as any device-side assert, leaves the CUDA context unusable) and ``True``."""
    if condition.device.type == "cpu":
        return bool(condition)
    torch._assert_async(condition, message)
    return True


def call_arguments(args: tuple, kwargs: dict):
    """``(x, key_padding_mask, attn_mask)`` of a :meth:`MultiheadSelfAttention.forward` call, given
    positionally or by keyword (as a ``register_forward_hook(..., with_kwargs=True)`` hook sees it)."""
    names = ("x", "key_padding_mask", "attn_mask")
    return tuple(args[i] if len(args) > i else kwargs.get(n) for i, n in enumerate(names))


class MultiheadSelfAttention(nn.Module):
    r"""Multi-head self-attention, numerically identical to ``nn.MultiheadAttention(batch_first=True)``.

    .. math::
        \mathbf F = \sum_h \mathrm{softmax}\big(\tilde{\mathbf X}\tilde{\mathbf W}_Q^h
        \tilde{\mathbf W}_K^{h\top}\tilde{\mathbf X}^\top/\sqrt{d_K} + \text{mask}\big)
        \tilde{\mathbf X}\tilde{\mathbf W}_V^h\mathbf W_O^h + \mathbf 1\mathbf b_O^\top

    Args:
        embed_dim: model width ``E``.
        num_heads: number of heads ``H``; must divide ``E`` (head width ``d_K = E / H``).
        bias: whether the in- and out-projections have biases.
        causal: mask future keys (query ``i`` sees keys ``j <= i``).
        attention: ``"softmax"`` or ``"linear"`` (the paper's softmax-free variant: masked raw
            scores scaled by ``1/sqrt(d_K)``).

    Parameters (direct attributes, torch layout): ``in_proj_weight [3E, E]``,
    ``in_proj_bias [3E]``, ``out_proj_weight [E, E]``, ``out_proj_bias [E]``.

    Shapes: ``x [N, L, E] -> [N, L, E]``; ``key_padding_mask`` bool ``[N, L]`` (``True`` =
    ignore that key); ``attn_mask`` bool ``[L, L]`` (``True`` = query may not attend to key,
    torch semantics) or a float ``[L, L]`` mask of ``0`` and ``-inf``.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        bias: bool = True,
        causal: bool = False,
        attention: str = "softmax",
        device=None,
        dtype=None,
    ):
        super().__init__()
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating-point torch.dtype (e.g. torch.float64) or None, got {dtype!r}")
        #: The parameter layout (heads, the 3E row split, flat positions); raises for bad sizes.
        self.layout = AttentionLayout(embed_dim, num_heads, bool(bias))
        if attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {attention!r}")
        #: The attention variant (probabilities, their derivatives, the core forward).
        self.variant = get_variant(attention)
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.bias = bool(bias)
        self.causal = bool(causal)
        self.attention = attention
        kw = {"device": device, "dtype": dtype}
        shapes = self.layout.param_shapes()
        for name in PARAM_NAMES:
            setattr(self, name, nn.Parameter(torch.empty(shapes[name], **kw)) if name in shapes else None)
        self.reset_parameters()

    def reset_parameters(self):
        """Initialise as ``nn.MultiheadAttention`` does."""
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.kaiming_uniform_(self.out_proj_weight, a=math.sqrt(5))
        if self.bias:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj_bias)

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, bias={self.bias}, "
            f"causal={self.causal}, attention={self.attention!r}"
        )

    # ---- input handling -------------------------------------------------------------------
    def check_input(self, x: Tensor, key_padding_mask=None, attn_mask=None) -> None:
        """Raise a clear error for malformed inputs, before any computation."""
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor [N, L, E], got {type(x).__name__}")
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(
                f"x must have shape [N, L, E={self.embed_dim}] (batch first), got {list(x.shape)}"
            )
        if not x.is_floating_point():
            raise TypeError(f"x must be floating point, got {x.dtype}")
        if x.dtype != self.in_proj_weight.dtype or x.device != self.in_proj_weight.device:
            raise TypeError(
                f"x ({x.dtype}, {x.device}) must match the module's parameters "
                f"({self.in_proj_weight.dtype}, {self.in_proj_weight.device})"
            )
        N, L, _ = x.shape
        if L == 0:
            raise ValueError("x has sequence length L=0: attention needs at least one token per sequence")
        if key_padding_mask is not None:
            if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
                raise TypeError(
                    "key_padding_mask must be a bool tensor [N, L] (True = ignore that key), got "
                    + (str(key_padding_mask.dtype) if isinstance(key_padding_mask, Tensor) else type(key_padding_mask).__name__)
                )
            if tuple(key_padding_mask.shape) != (N, L):
                raise ValueError(
                    f"key_padding_mask must have shape [N, L] = {[N, L]}, got {list(key_padding_mask.shape)}"
                )
        if attn_mask is not None:
            if not isinstance(attn_mask, Tensor) or tuple(attn_mask.shape) != (L, L):
                raise ValueError(
                    f"attn_mask must be a tensor of shape [L, L] = {[L, L]}, got "
                    + (str(list(attn_mask.shape)) if isinstance(attn_mask, Tensor) else type(attn_mask).__name__)
                )
            _bool_mask(attn_mask, "attn_mask")  # raises for float masks other than 0 / -inf

    def allowed_mask(self, x: Tensor, key_padding_mask=None, attn_mask=None) -> Optional[Tensor]:
        """Boolean mask ``[N or 1, 1, L, L]`` of allowed (query, key) pairs, or ``None`` if all are.

        Raises ``ValueError`` if some query may attend to no key at all (on an accelerator: an
        asynchronous device assertion, so that the forward pass never waits for the device).
        """
        L = x.shape[1]
        allowed = None
        if self.causal:
            allowed = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
        if attn_mask is not None:
            extra = ~_bool_mask(attn_mask, "attn_mask")
            allowed = extra if allowed is None else allowed & extra
        if allowed is not None:
            allowed = allowed[None, None]
        if key_padding_mask is not None:
            keys = (~key_padding_mask)[:, None, None, :]
            allowed = keys if allowed is None else allowed & keys
        if allowed is not None:
            allowed = allowed.expand(-1, -1, L, L)
            msg = ("the masks leave some query with no key to attend to (a fully masked row); "
                   "unmask at least one key per query")
            if not check_on_device(allowed.any(-1).all(), msg):
                raise ValueError(msg)
        return allowed

    # ---- forward ----------------------------------------------------------------------------
    def project_qkv(self, x: Tensor):
        """Queries, keys and values ``[N, H, L, d_K]`` (biases included)."""
        return project(x, self.layout, self.in_proj_weight, self.in_proj_bias)

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None, attn_mask: Optional[Tensor] = None):
        self.check_input(x, key_padding_mask, attn_mask)
        allowed = self.allowed_mask(x, key_padding_mask, attn_mask)
        only_causal = self.causal and key_padding_mask is None and attn_mask is None
        return attention_forward(self, x, allowed, only_causal=only_causal)

    def attention_weights(self, x: Tensor, key_padding_mask=None, attn_mask=None) -> Tensor:
        """Attention matrices ``A`` ``[N, H, L, L]`` (math path, differentiable)."""
        self.check_input(x, key_padding_mask, attn_mask)
        allowed = self.allowed_mask(x, key_padding_mask, attn_mask)
        Q, K, _ = self.project_qkv(x)
        return attention_matrix(Q, K, allowed, self.variant)

    # ---- conversion -------------------------------------------------------------------------
    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention, *, causal: bool = False, name: str = "mha",
                   share: bool = False):
        """Copy an ``nn.MultiheadAttention`` (self-attention, no dropout, no ``bias_k``/``bias_v``).

        With ``share=True`` the new module uses ``mha``'s parameter objects themselves (the layouts
        agree), so optimizers and weight tying built on them keep working.
        """
        check_convertible(mha, name)
        p = mha.in_proj_weight
        new = cls(mha.embed_dim, mha.num_heads, bias=mha.in_proj_bias is not None, causal=causal,
                  device=p.device, dtype=p.dtype)
        if share:
            new.in_proj_weight, new.out_proj_weight = mha.in_proj_weight, mha.out_proj.weight
            if new.bias:
                new.in_proj_bias, new.out_proj_bias = mha.in_proj_bias, mha.out_proj.bias
            return new.train(mha.training)
        with torch.no_grad():
            new.in_proj_weight.copy_(mha.in_proj_weight)
            new.out_proj_weight.copy_(mha.out_proj.weight)
            if new.bias:
                new.in_proj_bias.copy_(mha.in_proj_bias)
                new.out_proj_bias.copy_(mha.out_proj.bias)
        new.train(mha.training)
        return new

    def to_torch(self, batch_first: bool = True) -> nn.MultiheadAttention:
        """An ``nn.MultiheadAttention`` with the same weights (call it with ``is_causal``/masks yourself)."""
        if self.attention != "softmax":
            raise ValueError("to_torch: nn.MultiheadAttention has no linear attention")
        p = self.in_proj_weight
        mha = nn.MultiheadAttention(self.embed_dim, self.num_heads, bias=self.bias,
                                    batch_first=batch_first, device=p.device, dtype=p.dtype)
        with torch.no_grad():
            mha.in_proj_weight.copy_(self.in_proj_weight)
            mha.out_proj.weight.copy_(self.out_proj_weight)
            if self.bias:
                mha.in_proj_bias.copy_(self.in_proj_bias)
                mha.out_proj.bias.copy_(self.out_proj_bias)
        mha.train(self.training)
        return mha


def check_convertible(mha: nn.Module, name: str = "mha") -> None:
    """Raise a ``ValueError`` naming ``name`` if ``mha`` cannot become a :class:`MultiheadSelfAttention`."""
    if not isinstance(mha, nn.MultiheadAttention):
        raise TypeError(f"{name}: expected nn.MultiheadAttention, got {type(mha).__name__}")
    if not mha._qkv_same_embed_dim:
        raise ValueError(
            f"{name}: kdim={mha.kdim}, vdim={mha.vdim} differ from embed_dim={mha.embed_dim}; "
            "only self-attention with kdim == vdim == embed_dim can be converted"
        )
    if mha.dropout > 0:
        raise ValueError(
            f"{name}: attention dropout={mha.dropout} > 0 makes curvature random; "
            "set dropout=0.0 (only dropout=0 is accepted)"
        )
    if mha.bias_k is not None or mha.bias_v is not None:
        raise ValueError(f"{name}: add_bias_kv=True is not supported (use add_bias_kv=False)")
    if mha.add_zero_attn:
        raise ValueError(f"{name}: add_zero_attn=True is not supported (use add_zero_attn=False)")


class SelfAttentionAdapter(nn.Module):
    """Drop-in for an ``nn.MultiheadAttention`` used as self-attention.

    Same call signature and outputs as ``nn.MultiheadAttention``; the work is done by the
    child :attr:`attention` (a :class:`MultiheadSelfAttention`, which BackPACK hooks and whose
    parameters curvature operators take). ``batch_first=False`` inputs ``[L, N, E]`` are
    transposed to batch-first and back. Calling it with ``key``/``value`` different from
    ``query`` (cross-attention) raises ``ValueError``.
    """

    def __init__(self, attention: MultiheadSelfAttention, batch_first: bool = True, name: str = "attention"):
        super().__init__()
        self.attention = attention
        self.batch_first = batch_first
        self.embed_dim = attention.embed_dim
        self.num_heads = attention.num_heads
        self.name = name
        # Read by nn.TransformerEncoder(Layer) to decide on torch's fused fast path, which
        # would bypass this module (and BackPACK's hooks). False keeps the fast path off.
        self._qkv_same_embed_dim = False
        # BackPACK hooks only the inner MultiheadSelfAttention (one hooked module per step): marked
        # as already extended, the adapter itself is skipped by any backpack.extend, also a stock one
        # run before ba.extend (laplace-torch re-extends models with it).
        self._backpack_extend = True
        # Checkpoints keep nn.MultiheadAttention's keys (in_proj_weight, out_proj.weight, ...).
        self._register_state_dict_hook(SelfAttentionAdapter._to_torch_keys)
        self._register_load_state_dict_pre_hook(SelfAttentionAdapter._from_torch_keys, with_module=True)

    @property
    def in_proj_weight(self):
        return self.attention.in_proj_weight

    @property
    def in_proj_bias(self):
        return self.attention.in_proj_bias

    #: ``state_dict`` keys of the child (left) and of ``nn.MultiheadAttention`` (right).
    _TORCH_KEYS = {"attention.in_proj_weight": "in_proj_weight", "attention.in_proj_bias": "in_proj_bias",
                   "attention.out_proj_weight": "out_proj.weight", "attention.out_proj_bias": "out_proj.bias"}

    @staticmethod
    def _to_torch_keys(module, state_dict, prefix, local_metadata):
        """``state_dict`` hook: save under ``nn.MultiheadAttention``'s keys (checkpoints stay compatible)."""
        for ours, theirs in SelfAttentionAdapter._TORCH_KEYS.items():
            if prefix + ours in state_dict:
                state_dict[prefix + theirs] = state_dict.pop(prefix + ours)
        return state_dict

    @staticmethod
    def _from_torch_keys(module, state_dict, prefix, *args):
        """``load_state_dict`` pre-hook: accept ``nn.MultiheadAttention``'s keys (and ours)."""
        for ours, theirs in SelfAttentionAdapter._TORCH_KEYS.items():
            if prefix + theirs in state_dict and prefix + ours not in state_dict:
                state_dict[prefix + ours] = state_dict.pop(prefix + theirs)

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention, name: str = "mha", share: bool = False) -> "SelfAttentionAdapter":
        attention = MultiheadSelfAttention.from_torch(mha, name=name, share=share)
        adapter = cls(attention, batch_first=mha.batch_first, name=name)
        return adapter.train(mha.training)

    def to_torch(self) -> nn.MultiheadAttention:
        return self.attention.to_torch(batch_first=self.batch_first)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if key is not query or value is not query:
            raise ValueError(
                f"{self.name}: called as cross-attention (key/value are not the query tensor); "
                "backpack_attention supports self-attention only: call it as attn(x, x, x)"
            )
        if is_causal and attn_mask is None:
            raise ValueError(f"{self.name}: is_causal=True needs attn_mask, as in nn.MultiheadAttention")
        x = query if self.batch_first else query.transpose(0, 1)
        key_padding_mask = _bool_mask(key_padding_mask, "key_padding_mask")
        attn_mask = _bool_mask(attn_mask, "attn_mask")
        out = self.attention(x, key_padding_mask, attn_mask)
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        A = self.attention.attention_weights(x, key_padding_mask, attn_mask)
        return out, (A.mean(1) if average_attn_weights else A)


def convert_attention(model: nn.Module, *, strict: bool = True) -> nn.Module:
    """Convert, in place, the attention of ``model`` so that its curvature is exact and fast.

    * Every ``nn.MultiheadAttention`` is replaced by a :class:`SelfAttentionAdapter`. The adapters
      use the model's own parameter objects, and ``state_dict()`` keeps ``nn.MultiheadAttention``'s
      keys. Modules that cannot be converted (``kdim``/``vdim`` != ``embed_dim``, dropout > 0,
      ``add_bias_kv``, ``add_zero_attn``) raise a ``ValueError`` naming them.
    * HuggingFace ``transformers`` attention (GPT-2, BERT-style, ViT, ...), timm's ``Attention`` and
      hand-written self-attention with a fused qkv ``nn.Linear`` calling
      ``F.scaled_dot_product_attention`` (nanoGPT) keep their class, parameters and ``state_dict()``
      keys: they are switched to their SDPA path, and their SDPA call is answered by the package's
      drop-in with closed-form derivatives (:mod:`backpack_attention.adapters`, docs/adapters.md).
      Cross-attention, rotary or grouped-query attention, attention dropout in training mode (and,
      at a call, head masks, KV caches with past keys, additive biases) are refused, naming the
      module.

    Everything is checked before anything changes: on an error the model is untouched. Outputs are
    unchanged. Converting twice is harmless. A top-level ``nn.MultiheadAttention`` is returned
    converted (it cannot be replaced in place). Returns the model; ``model._backpack_attention_converted``
    and :func:`backpack_attention.adapters.converted_modules` list what is converted, as
    ``(name, kind)`` pairs.

    Args:
        strict: raise a ``ValueError`` when ``model`` has no attention at all that the package can
            use (nothing converted, now or before, and no :class:`MultiheadSelfAttention` in it),
            naming the attention-like modules it found; ``False`` returns the model unchanged instead.
    """
    from backpack_attention.adapters import convert_other_attention, converted_modules  # imports this module

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, nn.MultiheadAttention):
        return SelfAttentionAdapter.from_torch(model, name="model", share=True)
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    for n, m in targets:
        check_convertible(m, n)
    convert_other_attention(model)  # checks all of its modules before changing any
    for n, m in targets:
        parent_name, _, child = n.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, SelfAttentionAdapter.from_torch(m, name=n, share=True))
    for m in model.modules():
        # nn.TransformerEncoder's nested-tensor fast path reads attention internals and bypasses
        # the layers' forward; keep it off for encoders whose attention was converted.
        if isinstance(m, nn.TransformerEncoder) and any(isinstance(s, SelfAttentionAdapter) for s in m.modules()):
            m.use_nested_tensor = False
    converted = converted_modules(model)
    if not converted and not any(isinstance(m, MultiheadSelfAttention) for m in model.modules()):
        if strict:
            others = [f"{n} ({type(m).__name__})" for n, m in model.named_modules()
                      if "attention" in type(m).__name__.lower()]
            raise ValueError(
                f"convert_attention: {type(model).__name__} has no nn.MultiheadAttention to convert and no other "
                "attention the adapters recognise"
                + (f"; its attention modules {others} are of a kind this version cannot convert" if others else "")
                + " (convertible: nn.MultiheadAttention used as self-attention; HuggingFace attention using the "
                "attention interface (GPT-2, BERT, ViT, ...); timm's Attention; a module with a fused qkv "
                "nn.Linear calling F.scaled_dot_product_attention; pass strict=False to allow a no-op)"
            )
        return model
    model._backpack_attention_converted = converted
    return model


def as_attention(module: nn.Module) -> MultiheadSelfAttention:
    """The :class:`MultiheadSelfAttention` behind ``module`` (itself, or an adapter's child)."""
    if isinstance(module, MultiheadSelfAttention):
        return module
    if isinstance(module, SelfAttentionAdapter):
        return module.attention
    if getattr(module, "_backpack_attention_kind", None) is not None:
        raise TypeError(
            f"{type(module).__name__} was converted by routing its attention core (HuggingFace, timm, "
            "nanoGPT-style modules): the curvature operators support it, but closed-form blocks, factors "
            "and BackPACK extensions need a backpack_attention.MultiheadSelfAttention layer"
        )
    raise TypeError(
        "expected a backpack_attention.MultiheadSelfAttention (or a converted nn.MultiheadAttention), "
        f"got {type(module).__name__}; use backpack_attention.convert_attention(model) first"
    )


def param_index(module: nn.Module, name: str, head: Optional[int] = None) -> torch.LongTensor:
    """Positions of block ``name`` (one head or all) in the concatenation of ``module``'s parameters.

    The concatenation is ``in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias``, each
    flattened row-major (biases absent when ``bias=False``), i.e. ``torch.cat([p.flatten() for p in
    module.parameters()])`` (docs/math.md, "Index map"): ``W_Q^h[a, c]`` is ``in_proj_weight[h*d_K + c, a]``;
    ``W_O`` of head ``h`` is the columns ``h*d_K:(h+1)*d_K`` of ``out_proj_weight``.

    Args:
        module: a :class:`MultiheadSelfAttention`, an adapter, or an ``nn.MultiheadAttention``.
        name: one of ``W_Q, W_K, W_V, b_Q, b_K, b_V, W_O, b_O``.
        head: ``None`` (all heads) or a head in ``range(num_heads)``; ``b_O`` has no head.

    Returns:
        ``LongTensor`` of positions, in torch (row-major) order of the block's entries.
    """
    if isinstance(module, nn.MultiheadAttention):
        check_convertible(module, "module")
        layout = AttentionLayout(module.embed_dim, module.num_heads, module.in_proj_bias is not None)
    else:
        layout = as_attention(module).layout
    return layout.param_index(name, head)
