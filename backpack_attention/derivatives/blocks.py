r"""Dense Hessian blocks of one attention layer, assembled in closed form from its factors.

Every block is a sum over query tokens of small Kronecker products (docs/math.md, 4.2, 4.3, 5.2),
computed as one contraction (a GEMM over the ``N L`` tokens), never by autodiff.

Parameter groups (per head ``h``, augmented with bias rows, paper layout ``(input, output)``):
``Q`` :math:`\tilde{\mathbf W}_Q^h` ``[d', d_K]``, ``K`` :math:`\tilde{\mathbf W}_K^h`, ``V``
:math:`\tilde{\mathbf W}_V^h` ``[d', d_h]``, ``O`` :math:`\mathbf W_O^h` ``[d_h, E]``, and ``bO``
:math:`\mathbf b_O` ``[E]``. Their Jacobian row blocks (docs/math.md, 5.2) are Kronecker products
:math:`\mathbf J^{(i)}[e,(a,c)]=\alpha_i[a]\,\beta_i[e,c]` ("left", Q/V/O/bO) or
:math:`\alpha_i[e,a]\,\beta_i[c]` ("right", K).

* ``outer`` :math:`=\mathbf J^\top\boldsymbol\Lambda\mathbf J` (the GGN);
* ``functional`` :math:`=` full :math:`-` outer: the layer's own second-derivative term
  :math:`\sum_i\mathbf r_i^\top\partial^2\mathbf F_i` (docs/math.md, 4.3, 5.2), plus, inside a deeper network,
  :math:`\mathbf J^\top(\boldsymbol\Lambda_{\text{exact}}-\boldsymbol\Lambda)\mathbf J` from the network above;
* ``full`` :math:`=` outer :math:`+` functional, the exact Hessian block.

Blocks are returned in torch layout: rows/cols in the order of
:func:`~backpack_attention.param_index`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from itertools import product
from typing import Tuple

import torch
from torch import Tensor

from backpack_attention.derivatives.factors import AttentionFactors

PARTS = ("outer", "functional", "full")


@dataclass
class Block:
    """One Hessian block: ``outer`` (GGN) + ``functional`` = ``full``; each ``[rows, cols]``."""

    outer: Tensor
    functional: Tensor

    @property
    def full(self) -> Tensor:
        return self.outer + self.functional

    def part(self, name: str) -> Tensor:
        if name not in PARTS:
            raise ValueError(f"part must be one of {PARTS}, got {name!r}")
        return getattr(self, name)


#: Working memory (bytes) of one chunk of tokens: the blocks are sums over tokens, computed chunk by
#: chunk so that per-token terms (``Sigma_i``, ``kappa_i[g_i]``, ``U^T Sigma_i``, Kronecker pairs) of
#: all tokens are never held at once.
CHUNK_BYTES = 2**28
#: Per-head per-token terms (``Sigma_i``, ``kappa_i[g_i]``, ``C_i``, ``B_i``, ...) of all heads and
#: tokens up to this size (bytes) are kept once computed, so that the blocks of many group pairs
#: (:meth:`HessianBlocks.matrix`) compute each head's second moments once; above it they are
#: recomputed for each block (memory stays bounded by a chunk).
TERMS_CACHE_BYTES = 2**30
#: Group blocks up to this size (bytes) are kept for later keys that need them; larger ones are
#: recomputed, so that a large block is held once (in the torch layout asked for), not twice.
CACHE_BYTES = 2**26


class _Chunk:
    """Tokens of sequences ``n`` and query rows ``rows`` (two slices)."""

    def __init__(self, n: slice, rows: slice):
        self.n, self.rows = n, rows

    def tok(self, t: Tensor) -> Tensor:
        """``[N, L, ...]`` -> ``[n, rows, ...]``."""
        return t[self.n, self.rows]

    def head(self, t: Tensor, h: int) -> Tensor:
        """``[N, H, L, ...]`` -> ``[n, rows, ...]`` of head ``h``."""
        return t[self.n, h, self.rows]


def token_chunks(N: int, L: int, per_token: int, budget: int):
    """Chunks of at most ``budget // per_token`` tokens: whole sequences if they fit, else rows of one."""
    rows = max(1, budget // max(1, per_token))
    if rows >= L:
        seqs = rows // L
        return [_Chunk(slice(i, i + seqs), slice(None)) for i in range(0, N, seqs)]
    return [_Chunk(slice(n, n + 1), slice(i, i + rows)) for n in range(N) for i in range(0, L, rows)]


class _HeadChunk:
    r"""Per-token terms of head ``h`` on one chunk, each computed on first use.

    ``Sigma``, ``kappa`` ``[n, l, d', d']``; ``C`` :math:`=\mathbf U^\top\boldsymbol\Sigma_i/\sqrt{d_K}`
    ``[n, l, E, d']``; ``B = C W_K`` ``[n, l, E, d_K]``; ``rho`` (head-output gradient) ``[n, l, d_h]``;
    ``g`` :math:`=\mathbf U\mathbf r_i` ``[n, l, d']``.
    """

    def __init__(self, factors: AttentionFactors, h: int, chunk: _Chunk):
        self.f, self.h, self.ch = factors, h, chunk
        self.s = 1.0 / math.sqrt(factors.head_dim)

    @cached_property
    def Sigma(self) -> Tensor:
        return self.f.moments.sigma(self.h, self.ch.n, self.ch.rows)

    @cached_property
    def kappa(self) -> Tensor:
        return self.f.moments.kappa(self.h, self.ch.n, self.ch.rows)

    @cached_property
    def C(self) -> Tensor:
        return torch.einsum("ae,niab->nieb", self.f.weights.U[self.h], self.Sigma) * self.s

    @cached_property
    def B(self) -> Tensor:
        return self.C @ self.f.weights.W_K[self.h]

    @cached_property
    def rho(self) -> Tensor:
        return torch.einsum("ce,nle->nlc", self.f.weights.W_O[self.h], self.ch.tok(self.f.loss.r))

    @cached_property
    def g(self) -> Tensor:
        return self.ch.head(self.f.moments.g, self.h)


class _Factor:
    """Per-token Jacobian factor of one group: ``kind`` "left" or "right", ``alpha``, ``beta``."""

    def __init__(self, kind: str, alpha: Tensor, beta: Tensor):
        self.kind, self.alpha, self.beta = kind, alpha, beta

    @property
    def size(self) -> int:
        a = self.alpha.shape[-1]
        return a * self.beta.shape[-1]

    def dense(self) -> Tensor:
        """``[N, L, E, size]``: the Jacobian rows of every token."""
        if self.kind == "left":
            J = torch.einsum("nla,nlec->nleac", self.alpha, self.beta)
        else:
            J = torch.einsum("nlea,nlc->nleac", self.alpha, self.beta)
        return J.reshape(*J.shape[:3], -1)


def _kron_sum(spec: str, P: Tensor, Q: Tensor) -> Tensor:
    """``einsum(spec, P, Q)`` for per-token ``P [n, l, x, y]`` and ``Q [n, l, u, v]`` summed over tokens.

    Always two operands, so that torch runs one GEMM over the ``n l`` tokens (``[x y, n l] @ [n l, u v]``)
    and its output, a permuted view of ``[x, y, u, v]``, is the only new block-sized tensor (with three
    operands the contraction order, and its per-token intermediates, would be torch's choice)."""
    return torch.einsum(spec, P, Q)


def _pair(x: Tensor, y: Tensor) -> Tensor:
    """Per-token outer product ``[n, l, a] x [n, l, b] -> [n, l, a, b]``."""
    return x[..., :, None] * y[..., None, :]


def _jtlj_separable(f1: _Factor, f2: _Factor, Lam: Tensor) -> Tensor:
    r""":math:`\sum_{n,i}\mathbf J_1^{(i)\top}\boldsymbol\Lambda_i\mathbf J_2^{(i)}` for per-token ``Lam`` ``[N, L, E, E]``
    (the tokens of one chunk), in the layout ``[a, c, b, d]`` of the two groups."""
    if f1.kind == "right" and f2.kind == "left":
        return _jtlj_separable(f2, f1, Lam.transpose(-1, -2)).permute(2, 3, 0, 1)
    if f1.kind == "left" and f2.kind == "left":
        M = torch.einsum("nlec,nlef->nlcf", f1.beta, Lam) @ f2.beta
        return _kron_sum("nlab,nlcd->acbd", _pair(f1.alpha, f2.alpha), M)
    if f1.kind == "right" and f2.kind == "right":
        M = torch.einsum("nlea,nlef->nlaf", f1.alpha, Lam) @ f2.alpha
        return _kron_sum("nlab,nlcd->acbd", M, _pair(f1.beta, f2.beta))
    M = torch.einsum("nlec,nlef->nlcf", f1.beta, Lam) @ f2.alpha  # left, right: [n, l, c, b]
    return _kron_sum("nlad,nlcb->acbd", _pair(f1.alpha, f2.beta), M)


def _accumulate(parts) -> Tensor:
    """The sum of an iterable of equally shaped tensors, holding at most two at a time."""
    total = None
    for t in parts:
        total = t if total is None else total.add_(t)
        del t  # else the loop variable keeps this one alive while the next is computed
    return total


def _take(T: Tensor, rows: Tensor, cols: Tensor, out: Tensor, at=None, step: int = 256):
    """``out = T2[rows, cols]``, or ``out[at[0], at[1]] = T2[rows, cols]``, for the 4-D group tensor
    ``T [a1, c1, a2, c2]`` read as ``T2 [a1 c1, a2 c2]`` (possibly a non-contiguous view), a few rows
    at a time so that no index or copy the size of the block is made."""
    c1, a2, c2 = T.shape[1:]
    cols_a, cols_c = cols // c2, cols % c2
    for i in range(0, len(rows), step):
        r = rows[i:i + step]
        chunk = T[r // c1, r % c1][:, cols_a, cols_c]  # [rows, len(cols)]
        if at is None:
            out[i:i + step] = chunk
        else:
            out[at[0][i:i + step, None], at[1][None, :]] = chunk


class HessianBlocks(Mapping):
    """Read-only, lazy mapping ``((name1, head1), (name2, head2)) -> Block`` of one attention layer.

    ``name`` in ``W_Q, W_K, W_V, b_Q, b_K, b_V, W_O, b_O``; ``head`` an int, or ``None`` for all
    heads (``b_O`` always ``None``). Iteration, ``len``, ``keys``, ``values`` and ``items`` cover the
    per-head keys (``b_O`` with ``None``); ``[]``, ``get`` and ``in`` also take ``None`` (all heads)
    for any block. Blocks are computed on first access; group blocks up to :data:`CACHE_BYTES` are
    kept for later keys; ``in`` only checks the key. :meth:`matrix` assembles the whole layer
    Hessian in parameter order (small layers only). Built from an :class:`AttentionFactors`
    snapshot: later changes to the model do not change it.

    Memory: every block is a sum over tokens, computed in chunks of tokens (:data:`CHUNK_BYTES`), so
    a block needs about twice its own size besides the factors, whatever the sequence length.
    """

    def __init__(self, factors: AttentionFactors):
        self.factors = factors
        self.module = factors.module
        self.layout = factors.layout
        f = factors
        self.H, self.dk = f.num_heads, f.head_dim
        N, L, self.E = f.loss.r.shape
        d = f.data.X.shape[-1]
        self._all = _Chunk(slice(None), slice(None))
        if f.loss.separable:
            # per-token terms of one head on one chunk (Sigma, kappa, C, B, pairs, M)
            per_token = 3 * d * d + 2 * self.E * d + self.E * self.E + 2 * self.dk * self.dk
            budget = CHUNK_BYTES // f.loss.r.element_size()
            self._chunks = token_chunks(N, L, per_token, budget)
            if len(self._chunks) == 1:
                self._chunks = [self._all]
        else:  # dense Lambda [N, L E, L E] couples the tokens of a sequence: one chunk (small L)
            self._chunks = [self._all]
        terms = self.H * N * L * (2 * d * d + self.E * (d + self.dk) + 2 * d + 2 * self.dk)
        self._keep_terms = terms * f.loss.r.element_size() <= TERMS_CACHE_BYTES
        self._cache = {}
        self._head_terms = {}
        self._current = (None, {})

    def _terms(self, h: int, chunk: _Chunk) -> _HeadChunk:
        """Per-head terms on ``chunk``: kept for every head and chunk when all of them fit
        :data:`TERMS_CACHE_BYTES` (and always for the whole-data chunk of the dense path), else only
        while the same chunk is asked for (both factors of a block)."""
        if self._keep_terms or chunk is self._all:
            if (h, chunk) not in self._head_terms:
                self._head_terms[h, chunk] = _HeadChunk(self.factors, h, chunk)
            return self._head_terms[h, chunk]
        if self._current[0] is not chunk:
            self._current = (chunk, {})
        terms = self._current[1]
        if h not in terms:
            terms[h] = _HeadChunk(self.factors, h, chunk)
        return terms[h]

    # ---- group algebra ------------------------------------------------------------------------
    def _group_dims(self, group) -> Tuple[int, int]:
        """``(rows, cols)`` of a group in the paper layout (its local index is ``row * cols + col``)."""
        d = self.factors.data.X.shape[-1]
        return {"Q": (d, self.dk), "K": (d, self.dk), "V": (d, self.dk), "O": (self.dk, self.E), "bO": (1, self.E)}[group[0]]

    def _factor(self, group, chunk: _Chunk) -> _Factor:
        kind, h = group
        f, E = self.factors, self.E
        r = chunk.tok(f.loss.r)
        n, l = r.shape[:2]
        eye = torch.eye(E, dtype=r.dtype, device=r.device)
        if kind == "Q":
            return _Factor("left", chunk.tok(f.data.X), self._terms(h, chunk).B)
        if kind == "K":
            return _Factor("right", self._terms(h, chunk).C, chunk.head(f.moments.q, h))
        if kind == "V":
            return _Factor("left", chunk.head(f.moments.M1, h), f.weights.W_O[h].T.expand(n, l, E, self.dk))
        if kind == "O":
            return _Factor("left", chunk.head(f.moments.z, h), eye.expand(n, l, E, E))
        return _Factor("left", torch.ones_like(r[..., :1]), eye.expand(n, l, E, E))

    def _outer(self, g1, g2, which: str = "Lambda") -> Tensor:
        r""":math:`\mathbf J_{g_1}^\top\boldsymbol\Lambda\mathbf J_{g_2}` for ``which`` in ``Lambda``, ``Lambda_exact``."""
        loss = self.factors.loss
        if loss.separable:
            Lam = getattr(loss, which)
            return _accumulate(
                _jtlj_separable(self._factor(g1, ch), self._factor(g2, ch), ch.tok(Lam)) for ch in self._chunks
            )
        J1 = self._dense_jacobian(g1)
        LJ2 = self._lambda_jacobian(g2, which)
        return torch.einsum("nks,nkt->st", J1, LJ2).reshape(*self._group_dims(g1), *self._group_dims(g2))

    def _dense_jacobian(self, group) -> Tensor:
        """``[N, L E, size]`` Jacobian of the layer output w.r.t. one group (cached)."""
        key = ("J", group)
        if key not in self._cache:
            J = self._factor(group, self._all).dense()
            self._cache[key] = J.reshape(J.shape[0], -1, J.shape[-1])
        return self._cache[key]

    def _lambda_jacobian(self, group, which: str) -> Tensor:
        r""":math:`\boldsymbol\Lambda_n\mathbf J_{g,n}` ``[N, L E, size]`` for dense ``Lambda`` (cached)."""
        key = (which, group)
        if key not in self._cache:
            Lam = getattr(self.factors.loss, which)
            N = Lam.shape[0]
            LE = Lam.shape[1] * Lam.shape[2]
            self._cache[key] = Lam.reshape(N, LE, LE) @ self._dense_jacobian(group)
        return self._cache[key]

    def _layer_functional(self, g1, g2) -> Tensor:
        r"""The layer's own term :math:`\sum_i\mathbf r_i^\top\partial^2\mathbf F_i/\partial g_1\partial g_2`."""
        order = {"Q": 0, "K": 1, "V": 2, "O": 3, "bO": 4}
        if order[g1[0]] > order[g2[0]]:
            return self._layer_functional(g2, g1).permute(2, 3, 0, 1)
        (k1, h), (k2, h2) = g1, g2
        if h != h2 or "bO" in (k1, k2) or (k1, k2) in (("V", "V"), ("O", "O")):
            return self.factors.loss.r.new_zeros(*self._group_dims(g1), *self._group_dims(g2))
        f = self.factors
        if (k1, k2) == ("V", "O"):  # sum_i mu_i r_i^T (x) I: one [d', E] sum, one block-sized tensor
            T = torch.einsum("nla,nle->ae", f.moments.M1[:, h], f.loss.r)
            return torch.einsum("ae,cd->acde", T, torch.eye(self.dk, dtype=T.dtype, device=T.device))
        out = _accumulate(self._layer_functional_chunk(k1, k2, h, ch) for ch in self._chunks)
        if (k1, k2) in (("Q", "V"), ("K", "V")):  # computed as (V, Q) / (V, K)
            return out.permute(2, 3, 0, 1)
        return out

    def _layer_functional_chunk(self, k1: str, k2: str, h: int, ch: _Chunk) -> Tensor:
        """One chunk's share of :meth:`_layer_functional` (``k1`` before ``k2``, same head ``h``)."""
        f, s, dk = self.factors, 1.0 / math.sqrt(self.dk), self.dk
        w, t = f.weights, self._terms(h, ch)
        Wk, Wv = w.W_K[h], w.W_V[h]
        X, q, r = ch.tok(f.data.X), ch.head(f.moments.q, h), ch.tok(f.loss.r)
        if (k1, k2) == ("Q", "Q"):
            WPW = torch.einsum("xc,nlxd->nlcd", Wk / dk, t.kappa @ Wk)
            return _kron_sum("nlab,nlcd->acbd", _pair(X, X), WPW)
        if (k1, k2) == ("K", "K"):
            return _kron_sum("nlab,nlcd->acbd", t.kappa, _pair(q / dk, q))
        if (k1, k2) == ("Q", "K"):
            WkP = torch.einsum("xc,nlxb->nlcb", Wk / dk, t.kappa)
            G = torch.einsum("nla,nlb->ab", X, (t.Sigma @ t.g[..., None])[..., 0])
            out = _kron_sum("nlad,nlcb->acbd", _pair(X, q), WkP)
            out.diagonal(dim1=1, dim2=3).add_(s * G[:, :, None])  # + s G (x) I, in place
            return out
        if (k1, k2) == ("Q", "V"):
            return _kron_sum("nlad,nlcb->acbd", t.Sigma @ (s * Wk), _pair(t.rho, X))
        if (k1, k2) == ("K", "V"):
            return _kron_sum("nlab,nlcd->acbd", s * t.Sigma, _pair(t.rho, q))
        if (k1, k2) == ("Q", "O"):
            WkSWv = torch.einsum("xc,nlxd->nlcd", s * Wk, t.Sigma @ Wv)
            return _kron_sum("nlbe,nlxc->bxce", _pair(X, r), WkSWv)
        if (k1, k2) == ("K", "O"):
            return _kron_sum("nlxe,nlbc->bxce", _pair(q, r), t.Sigma @ (s * Wv))
        raise AssertionError((k1, k2))  # pragma: no cover - all pairs handled above

    def group_part(self, g1, g2, part: str) -> Tensor:
        """``outer`` or ``functional`` between two parameter groups, paper layout ``[a1, c1, a2, c2]``
        (see :meth:`_group_dims`; possibly a non-contiguous view), kept if at most :data:`CACHE_BYTES`."""
        key = (g1, g2, part)
        if key in self._cache:
            return self._cache[key]
        if part == "outer":
            val = self._outer(g1, g2)
        else:
            val = self._layer_functional(g1, g2)
            if self.factors.loss.Lambda_exact is not None:  # curvature of the network above
                val = val + (self._outer(g1, g2, "Lambda_exact") - self.group_part(g1, g2, "outer"))
        if val.numel() * val.element_size() <= CACHE_BYTES:
            self._cache[key] = val
        return val

    def group_block(self, g1, g2) -> Block:
        """The block between two parameter groups, in paper layout ``[size1, size2]``."""
        size = math.prod(self._group_dims(g1)), math.prod(self._group_dims(g2))
        return Block(*(self.group_part(g1, g2, p).reshape(size) for p in ("outer", "functional")))

    # ---- torch layout -------------------------------------------------------------------------
    def block(self, rows: Tensor, cols: Tensor) -> Block:
        """The block for arbitrary parameter positions ``rows``, ``cols`` (see :func:`param_index`)."""
        loc_r, loc_c = self.layout.locate(rows), self.layout.locate(cols)
        groups_r = sorted({g for g, _ in loc_r}, key=str)
        groups_c = sorted({g for g, _ in loc_c}, key=str)
        index = {}
        for g1, g2 in product(groups_r, groups_c):
            ri = [(i, l) for i, (g, l) in enumerate(loc_r) if g == g1]
            ci = [(j, l) for j, (g, l) in enumerate(loc_c) if g == g2]
            index[g1, g2] = (torch.tensor([i for i, _ in ri]), torch.tensor([l for _, l in ri]),
                             torch.tensor([j for j, _ in ci]), torch.tensor([l for _, l in ci]))
        one = len(index) == 1
        parts = {}
        for p in ("outer", "functional"):  # one part at a time: a large block is never held twice
            ref = self.factors.loss.r
            parts[p] = ref.new_empty(len(loc_r), len(loc_c)) if one else ref.new_zeros(len(loc_r), len(loc_c))
            for (g1, g2), (ri_pos, ri_loc, ci_pos, ci_loc) in index.items():
                _take(self.group_part(g1, g2, p), ri_loc, ci_loc, parts[p], None if one else (ri_pos, ci_pos))
        return Block(parts["outer"], parts["functional"])

    def _positions(self, key):
        """``(rows, cols)`` positions of a key, or ``KeyError``."""
        try:
            (n1, h1), (n2, h2) = key
        except (TypeError, ValueError) as err:
            raise KeyError(f"key must be ((name1, head1), (name2, head2)), got {key!r}") from err
        try:
            return self.layout.param_index(n1, h1), self.layout.param_index(n2, h2)
        except ValueError as err:
            raise KeyError(str(err)) from err

    def __getitem__(self, key) -> Block:
        rows, cols = self._positions(key)
        return self.block(rows, cols)

    def __contains__(self, key) -> bool:
        try:
            self._positions(key)
        except KeyError:
            return False
        return True

    def _single_keys(self):
        return [(n, None) if n == "b_O" else (n, h)
                for n in self.layout.block_names() for h in range(self.H) if n != "b_O" or h == 0]

    def __iter__(self):
        single = self._single_keys()
        return ((a, b) for a in single for b in single)

    def __len__(self) -> int:
        return len(self._single_keys()) ** 2

    def matrix(self, part: str = "full") -> Tensor:
        """The whole layer's ``[P, P]`` Hessian part in the module's parameter order (small layers)."""
        idx = torch.arange(self.layout.num_params)
        return self.block(idx, idx).part(part)
