"""A small pre-LN transformer written so that BackPACK can run on it.

``Embedding -> [LayerNorm -> attention -> residual -> LayerNorm -> MLP(GELU) -> residual] x B
-> Linear``, returning token-level logits ``[N, C, L]`` (classes second, as
``nn.CrossEntropyLoss`` expects for sequences), or with ``readout="sequence"`` one prediction
per sequence ``[N, C]`` from the flattened last hidden states. Residual adds and the final permutation are
plain tensor ops: extend it with ``backpack_attention.backpack_ext.extend(model,
use_converter=True)``, which turns them into BackPACK's ``SumModule`` and ``Permute``.

``attention="ours"`` uses :class:`~backpack_attention.MultiheadSelfAttention`;
``attention="torch"`` uses ``nn.MultiheadAttention(batch_first=True)`` (what most user code
has; ``extend`` converts it), with a causal ``attn_mask`` buffer for a fixed ``seq_len``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from backpack_attention.module import MultiheadSelfAttention


class PreLNBlock(nn.Module):
    """``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``; ``x: [N, L, E]``."""

    def __init__(self, d_model: int, num_heads: int, d_mlp: int, *, causal: bool = True,
                 attention: str = "ours", seq_len: Optional[int] = None, dtype=None):
        super().__init__()
        if attention not in ("ours", "torch"):
            raise ValueError(f"attention must be 'ours' or 'torch', got {attention!r}")
        kw = {"dtype": dtype}
        self.attention = attention
        self.ln1 = nn.LayerNorm(d_model, **kw)
        if attention == "ours":
            self.attn = MultiheadSelfAttention(d_model, num_heads, causal=causal, **kw)
        else:
            self.attn = nn.MultiheadAttention(d_model, num_heads, batch_first=True, **kw)
            if causal and seq_len is None:
                raise ValueError("attention='torch' with causal=True needs seq_len (for the mask buffer)")
        mask = torch.ones(seq_len, seq_len, dtype=torch.bool).triu(1) if (causal and attention == "torch") else None
        self.register_buffer("causal_mask", mask)
        self.ln2 = nn.LayerNorm(d_model, **kw)
        self.mlp = nn.Sequential(nn.Linear(d_model, d_mlp, **kw), nn.GELU(), nn.Linear(d_mlp, d_model, **kw))

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        h = self.ln1(x)
        if self.attention == "ours":
            a = self.attn(h, key_padding_mask)
        else:
            a = self.attn(h, h, h, key_padding_mask=key_padding_mask, need_weights=False,
                          attn_mask=self.causal_mask)[0]
        x = x + a
        return x + self.mlp(self.ln2(x))


class PreLNTransformer(nn.Module):
    """Token-level language model: tokens ``X [N, L]`` -> logits ``[N, C, L]``.

    Args:
        vocab: number of token classes ``C`` (input and output vocabulary).
        d_model: width ``E``. num_heads: heads. num_layers: blocks. d_mlp: MLP width (``4 E``).
        causal: causal attention. attention: ``"ours"`` or ``"torch"`` (see module doc).
        seq_len: sequence length (needed for ``attention="torch"`` with ``causal=True`` and for
            ``readout="sequence"``).
        readout: ``"token"`` (logits ``[N, C, L]``) or ``"sequence"`` (``[N, C]``).
    """

    def __init__(self, vocab: int = 8, d_model: int = 16, num_heads: int = 2, num_layers: int = 2,
                 d_mlp: Optional[int] = None, *, causal: bool = True, attention: str = "ours",
                 seq_len: Optional[int] = None, readout: str = "token", dtype=None):
        super().__init__()
        if readout not in ("token", "sequence"):
            raise ValueError(f"readout must be 'token' or 'sequence', got {readout!r}")
        if readout == "sequence" and seq_len is None:
            raise ValueError("readout='sequence' needs seq_len")
        self.readout = readout
        d_mlp = 4 * d_model if d_mlp is None else d_mlp
        self.embed = nn.Embedding(vocab, d_model, dtype=dtype)
        self.blocks = nn.ModuleList(
            PreLNBlock(d_model, num_heads, d_mlp, causal=causal, attention=attention, seq_len=seq_len, dtype=dtype)
            for _ in range(num_layers)
        )
        width = d_model if readout == "token" else seq_len * d_model
        self.head = nn.Linear(width, vocab, dtype=dtype)

    def forward(self, X: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        h = self.embed(X)
        for block in self.blocks:
            h = block(h, key_padding_mask)
        if self.readout == "sequence":
            return self.head(h.flatten(1))
        return self.head(h).permute(0, 2, 1)

    def load_from_torch_attention(self, other: "PreLNTransformer") -> "PreLNTransformer":
        """Copy all weights from ``other`` (same sizes, ``attention="torch"``) into this model."""
        own = dict(self.named_parameters())
        with torch.no_grad():
            for name, p in other.named_parameters():
                target = name.replace("attn.out_proj.weight", "attn.out_proj_weight").replace(
                    "attn.out_proj.bias", "attn.out_proj_bias")
                own[target].copy_(p)
        return self
