r"""The parameter layout of a multi-head self-attention layer: the one place that knows it.

Torch keeps the parameters of ``nn.MultiheadAttention(batch_first=True)`` as

* ``in_proj_weight [3E, E]``: rows ``0:E`` are the queries, ``E:2E`` the keys, ``2E:3E`` the
  values; inside each, head ``h`` owns rows ``h d_K:(h+1) d_K``;
* ``in_proj_bias [3E]`` (same row order), ``out_proj_weight [E, E]`` (head ``h`` owns the columns
  ``h d_K:(h+1) d_K``) and ``out_proj_bias [E]``.

The math (docs/math.md, "Index map") uses per-head weights in the (input x output) layout with the
bias appended as a last row: :math:`\tilde{\mathbf W}_Q^h = [\mathbf W_Q^h; \mathbf b_Q^{h\top}]`
``[d', d_K]`` (``d' = E + 1`` with biases, else ``E``), so that
:math:`\tilde{\mathbf W}_Q^h[a, c] = ` ``in_proj_weight[h d_K + c, a]``, and
:math:`\mathbf W_O^h[c, e] = ` ``out_proj_weight[e, h d_K + c]``.

Everything that slices heads, splits the ``3E`` rows, maps flat parameter positions to blocks or
back, or views weights per head goes through :class:`AttentionLayout`. Nothing here imports the
module or the math: it is the bottom of the package. A new layout (grouped-query heads, separate
q/k/v projections, GPT-2's transposed ``Conv1D`` weight) is a change to this file plus the module
that uses it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

#: Names of the blocks of one layer, as :func:`AttentionLayout.param_index` takes them.
BLOCK_NAMES = ("W_Q", "W_K", "W_V", "b_Q", "b_K", "b_V", "W_O", "b_O")

#: The layer's parameters, in the order of ``module.parameters()`` (and of the flat layout).
PARAM_NAMES = ("in_proj_weight", "in_proj_bias", "out_proj_weight", "out_proj_bias")

#: Parameter groups of the math, per head: ``Q, K, V`` (augmented with the bias row), ``O``, and
#: ``bO`` (shared by all heads, head ``None``).
GROUPS = ("Q", "K", "V", "O", "bO")

_SLOT = {"Q": 0, "K": 1, "V": 2}


@dataclass(frozen=True)
class HeadWeights:
    r"""Per-head weights in the math's (input x output) layout, bias rows appended.

    ``W_Q, W_K`` ``[H, d', d_K]``, ``W_V`` ``[H, d', d_K]``, ``W_O`` ``[H, d_K, E]``, ``b_O`` ``[E]``
    or ``None``, and the OV circuit ``U = W_V W_O`` ``[H, d', E]``.
    """

    W_Q: Tensor
    W_K: Tensor
    W_V: Tensor
    W_O: Tensor
    b_O: Optional[Tensor]
    U: Tensor


@dataclass(frozen=True)
class AttentionLayout:
    """Shape facts of one layer: width ``E``, ``H`` heads of width ``d_K = E / H``, biases or not."""

    embed_dim: int
    num_heads: int
    bias: bool = True

    def __post_init__(self):
        for name in ("embed_dim", "num_heads"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.embed_dim % self.num_heads != 0:
            E = self.embed_dim
            raise ValueError(
                f"embed_dim ({E}) must be divisible by num_heads ({self.num_heads}); "
                f"valid num_heads are {[h for h in range(1, E + 1) if E % h == 0]}"
            )

    # ---- sizes ----------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        """``d_K = E / H``."""
        return self.embed_dim // self.num_heads

    @property
    def augmented_dim(self) -> int:
        """``d'``: ``E + 1`` with biases (the ones column), else ``E``."""
        return self.embed_dim + int(self.bias)

    def param_shapes(self) -> Dict[str, Tuple[int, ...]]:
        """``{name: shape}`` of the torch parameters, in flat order (biases absent without bias)."""
        E = self.embed_dim
        shapes = {"in_proj_weight": (3 * E, E), "in_proj_bias": (3 * E,),
                  "out_proj_weight": (E, E), "out_proj_bias": (E,)}
        return {n: s for n, s in shapes.items() if self.bias or not n.endswith("bias")}

    @property
    def num_params(self) -> int:
        """Length of the flat parameter vector."""
        return sum(torch.Size(s).numel() for s in self.param_shapes().values())

    def block_names(self) -> List[str]:
        """The blocks this layer has (no ``b_*`` without biases)."""
        return [n for n in BLOCK_NAMES if self.bias or not n.startswith("b_")]

    def block_shape(self, name: str) -> List[int]:
        """Shape of one head's block ``name`` in torch layout (``b_O``: all of it)."""
        self._check_name(name)
        E, d = self.embed_dim, self.head_dim
        return {"W_Q": [d, E], "W_K": [d, E], "W_V": [d, E], "b_Q": [d], "b_K": [d], "b_V": [d],
                "W_O": [E, d], "b_O": [E]}[name]

    def torch_location(self, name: str) -> str:
        """Where head ``h``'s block ``name`` sits in the torch parameters, as text."""
        self._check_name(name)
        E, d = self.embed_dim, self.head_dim
        if name == "W_O":
            return f"out_proj_weight[:, h*{d}:(h+1)*{d}]"
        if name == "b_O":
            return "out_proj_bias"
        off = _SLOT[name[-1]] * E
        rows = f"{off} + h*{d}:{off} + (h+1)*{d}" if off else f"h*{d}:(h+1)*{d}"
        return f"in_proj_weight[{rows}, :]" if name.startswith("W") else f"in_proj_bias[{rows}]"

    def group_size(self, group: str) -> int:
        """Entries of one head's parameter group in the math layout (``Q, K, V, O, bO``)."""
        E, d = self.embed_dim, self.head_dim
        return {"Q": self.augmented_dim * d, "K": self.augmented_dim * d, "V": self.augmented_dim * d,
                "O": d * E, "bO": E}[group]

    # ---- flat positions ---------------------------------------------------------------------
    def _check_name(self, name: str) -> None:
        if name not in BLOCK_NAMES:
            raise ValueError(f"name must be one of {BLOCK_NAMES}, got {name!r}")

    def param_index(self, name: str, head: Optional[int] = None) -> torch.LongTensor:
        """Positions of block ``name`` (one head or all) in the flat parameter vector.

        The flat vector is ``torch.cat([p.reshape(-1) for p in module.parameters()])`` in the order
        of :data:`PARAM_NAMES`. Positions come in torch (row-major) order of the block's entries.

        Raises:
            ValueError: unknown ``name``, a bias block without biases, a bad ``head``, or a head for
                ``b_O`` (shared by all heads).
        """
        self._check_name(name)
        E, H, d = self.embed_dim, self.num_heads, self.head_dim
        if name.startswith("b_") and not self.bias:
            raise ValueError(f"{name}: the module was built with bias=False, so it has no bias blocks")
        if head is not None and (not isinstance(head, int) or isinstance(head, bool) or not 0 <= head < H):
            raise ValueError(f"head must be None or an int in range({H}), got {head!r}")
        if name == "b_O" and head is not None:
            raise ValueError("b_O is shared by all heads: use head=None")
        heads = range(H) if head is None else [head]
        n_in_w, n_in_b = 3 * E * E, (3 * E if self.bias else 0)
        if name in ("W_Q", "W_K", "W_V", "b_Q", "b_K", "b_V"):
            rows = torch.cat([_SLOT[name[-1]] * E + h * d + torch.arange(d) for h in heads])
            if name.startswith("W"):
                return (rows[:, None] * E + torch.arange(E)[None, :]).reshape(-1)
            return n_in_w + rows
        if name == "W_O":
            cols = torch.cat([h * d + torch.arange(d) for h in heads])
            return n_in_w + n_in_b + (torch.arange(E)[:, None] * E + cols[None, :]).reshape(-1)
        return n_in_w + n_in_b + E * E + torch.arange(E)

    def locate(self, positions: Tensor) -> List[Tuple[Tuple[str, Optional[int]], int]]:
        """Inverse of :meth:`param_index`: each flat position as ``((group, head), local index)``.

        ``group`` in :data:`GROUPS`; the local index is row-major in the math layout of the group
        (``Q, K, V``: ``[d', d_K]`` with the bias as row ``d' - 1``; ``O``: ``[d_K, E]``; ``bO``: ``[E]``).
        """
        E, d, dprime = self.embed_dim, self.head_dim, self.augmented_dim
        n_w, n_b = 3 * E * E, (3 * E if self.bias else 0)
        out = []
        for p in positions.tolist():
            if not 0 <= p < self.num_params:
                raise IndexError(f"position {p} is outside the layer's {self.num_params} parameters")
            if p < n_w:
                row, a = divmod(p, E)
                s, rest = divmod(row, E)
                h, c = divmod(rest, d)
                out.append((("QKV"[s], h), a * d + c))
            elif p < n_w + n_b:
                s, rest = divmod(p - n_w, E)
                h, c = divmod(rest, d)
                out.append((("QKV"[s], h), (dprime - 1) * d + c))
            elif p < n_w + n_b + E * E:
                o, col = divmod(p - n_w - n_b, E)
                h, c = divmod(col, d)
                out.append((("O", h), c * E + o))
            else:
                out.append((("bO", None), p - n_w - n_b - E * E))
        return out

    # ---- heads ------------------------------------------------------------------------------
    def split_heads(self, t: Tensor) -> Tensor:
        """``[..., L, E] -> [..., H, L, d_K]``."""
        *lead, L, _ = t.shape
        return t.reshape(*lead, L, self.num_heads, self.head_dim).transpose(-2, -3)

    def merge_heads(self, t: Tensor) -> Tensor:
        """``[..., H, L, d_K] -> [..., L, E]`` (inverse of :meth:`split_heads`)."""
        *lead, H, L, d = t.shape
        return t.transpose(-2, -3).reshape(*lead, L, H * d)

    def split_qkv(self, qkv: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """In-projection output ``[..., L, 3E]`` -> ``(Q, K, V)``, each ``[..., H, L, d_K]``."""
        return tuple(self.split_heads(t) for t in qkv.chunk(3, dim=-1))

    def merge_qkv(self, Q: Tensor, K: Tensor, V: Tensor) -> Tensor:
        """``(Q, K, V)`` ``[..., H, L, d_K]`` -> ``[..., L, 3E]`` (inverse of :meth:`split_qkv`)."""
        return torch.cat([self.merge_heads(t) for t in (Q, K, V)], dim=-1)

    def head_weights(self, in_proj_weight: Tensor, in_proj_bias: Optional[Tensor],
                     out_proj_weight: Tensor, out_proj_bias: Optional[Tensor]) -> HeadWeights:
        """Per-head weights in the math layout: detached copies (a snapshot; later parameter updates
        do not change them)."""
        E, H, d = self.embed_dim, self.num_heads, self.head_dim
        W = in_proj_weight.detach().view(3, H, d, E).transpose(-1, -2)  # [3, H, E, d]
        if self.bias:
            W = torch.cat([W, in_proj_bias.detach().view(3, H, 1, d)], dim=2)  # [3, H, E+1, d]
        else:
            W = W.clone()
        W_O = out_proj_weight.detach().T.reshape(H, d, E).clone()
        b_O = out_proj_bias.detach().clone() if self.bias else None
        return HeadWeights(W[0], W[1], W[2], W_O, b_O, W[2] @ W_O)


def augment(x: Tensor, has_bias: bool) -> Tensor:
    """``[..., E] -> [..., E+1]`` (the ones column of the biases) when ``has_bias``."""
    return torch.cat([x, torch.ones_like(x[..., :1])], dim=-1) if has_bias else x
