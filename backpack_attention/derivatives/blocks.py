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
from itertools import product

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


def _jtlj_separable(f1: _Factor, f2: _Factor, Lam: Tensor) -> Tensor:
    r""":math:`\sum_{n,i}\mathbf J_1^{(i)\top}\boldsymbol\Lambda_i\mathbf J_2^{(i)}` for per-token ``Lam`` ``[N, L, E, E]``."""
    if f1.kind == "right" and f2.kind == "left":
        return _jtlj_separable(f2, f1, Lam.transpose(-1, -2)).T
    if f1.kind == "left" and f2.kind == "left":
        M = torch.einsum("nlec,nlef,nlfd->nlcd", f1.beta, Lam, f2.beta)
        out = torch.einsum("nla,nlb,nlcd->acbd", f1.alpha, f2.alpha, M)
    elif f1.kind == "right" and f2.kind == "right":
        M = torch.einsum("nlea,nlef,nlfb->nlab", f1.alpha, Lam, f2.alpha)
        out = torch.einsum("nlab,nlc,nld->acbd", M, f1.beta, f2.beta)
    else:  # left, right
        M = torch.einsum("nlec,nlef,nlfb->nlcb", f1.beta, Lam, f2.alpha)
        out = torch.einsum("nla,nlcb,nld->acbd", f1.alpha, M, f2.beta)
    return out.reshape(f1.size, f2.size)


class HessianBlocks(Mapping):
    """Read-only, lazy mapping ``((name1, head1), (name2, head2)) -> Block`` of one attention layer.

    ``name`` in ``W_Q, W_K, W_V, b_Q, b_K, b_V, W_O, b_O``; ``head`` an int, or ``None`` for all
    heads (``b_O`` always ``None``). Iteration, ``len``, ``keys``, ``values`` and ``items`` cover the
    per-head keys (``b_O`` with ``None``); ``[]``, ``get`` and ``in`` also take ``None`` (all heads)
    for any block. Blocks are computed on first access and cached per group pair; ``in`` only
    checks the key. :meth:`matrix` assembles the whole layer Hessian in parameter order (small
    layers only). Built from an :class:`AttentionFactors` snapshot: later changes to the model
    do not change it.
    """

    def __init__(self, factors: AttentionFactors):
        self.factors = factors
        self.module = factors.module
        self.layout = factors.layout
        f = factors
        self.H, self.dk = f.num_heads, f.head_dim
        self.E = f.loss.r.shape[-1]
        self._cache = {}
        self._head_terms = {}

    def _terms(self, h: int):
        """Per-head ``(C, B, rho, g)``, computed on first use (only the heads a block needs)."""
        if h not in self._head_terms:
            f, s = self.factors, 1.0 / math.sqrt(self.dk)
            w, mo, r = f.weights, f.moments, f.loss.r
            C = torch.einsum("ae,niab->nieb", w.U[h], mo.Sigma[:, h]) * s  # U^T Sigma_i / sqrt(d_K)
            B = C @ w.W_K[h]  # U^T Sigma_i W_K / sqrt(d_K)
            rho = torch.einsum("ce,nle->nlc", w.W_O[h], r)  # head-output gradient
            g = torch.einsum("ae,nle->nla", w.U[h], r)
            self._head_terms[h] = (C, B, rho, g)
        return self._head_terms[h]

    # ---- group algebra ------------------------------------------------------------------------
    def _factor(self, group) -> _Factor:
        kind, h = group
        f, N, L = self.factors, *self.factors.loss.r.shape[:2]
        E = self.E
        eye = torch.eye(E, dtype=f.loss.r.dtype, device=f.loss.r.device)
        if kind == "Q":
            return _Factor("left", f.data.X, self._terms(h)[1])
        if kind == "K":
            return _Factor("right", self._terms(h)[0], f.moments.q[:, h])
        if kind == "V":
            return _Factor("left", f.moments.M1[:, h], f.weights.W_O[h].T.expand(N, L, E, self.dk))
        if kind == "O":
            return _Factor("left", f.moments.z[:, h], eye.expand(N, L, E, E))
        return _Factor("left", torch.ones_like(f.loss.r[..., :1]), eye.expand(N, L, E, E))

    def _outer(self, g1, g2, which: str = "Lambda") -> Tensor:
        r""":math:`\mathbf J_{g_1}^\top\boldsymbol\Lambda\mathbf J_{g_2}` for ``which`` in ``Lambda``, ``Lambda_exact``."""
        loss = self.factors.loss
        if loss.separable:
            return _jtlj_separable(self._factor(g1), self._factor(g2), getattr(loss, which))
        J1 = self._dense_jacobian(g1)
        LJ2 = self._lambda_jacobian(g2, which)
        return torch.einsum("nks,nkt->st", J1, LJ2)

    def _dense_jacobian(self, group) -> Tensor:
        """``[N, L E, size]`` Jacobian of the layer output w.r.t. one group (cached)."""
        key = ("J", group)
        if key not in self._cache:
            J = self._factor(group).dense()
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
            return self._layer_functional(g2, g1).T
        (k1, h), (k2, h2) = g1, g2
        f = self.factors
        size = self._factor(g1).size, self._factor(g2).size
        if h != h2 or "bO" in (k1, k2) or (k1, k2) in (("V", "V"), ("O", "O")):
            return f.loss.r.new_zeros(size)
        s, dk = 1.0 / math.sqrt(self.dk), self.dk
        X, w, mo = f.data.X, f.weights, f.moments
        Wk, Wv = w.W_K[h], w.W_V[h]
        P, Sig, q, r, rho = mo.kappa_g[:, h], mo.Sigma[:, h], mo.q[:, h], f.loss.r, self._terms(h)[2]
        if (k1, k2) == ("Q", "Q"):
            out = torch.einsum("nla,nlb,nlcd->acbd", X, X, torch.einsum("xc,nlxy,yd->nlcd", Wk, P, Wk)) / dk
        elif (k1, k2) == ("K", "K"):
            out = torch.einsum("nlab,nlc,nld->acbd", P, q, q) / dk
        elif (k1, k2) == ("Q", "K"):
            WkP = torch.einsum("xc,nlxb->nlcb", Wk, P)
            G = torch.einsum("nla,nlbc,nlc->ab", X, Sig, self._terms(h)[3])
            eye = torch.eye(dk, dtype=X.dtype, device=X.device)
            out = torch.einsum("nla,nlcb,nld->acbd", X, WkP, q) / dk + s * torch.einsum("ab,cd->acbd", G, eye)
        elif (k1, k2) == ("Q", "V"):
            out = s * torch.einsum("nlc,nlad,nlb->acbd", rho, Sig @ Wk, X)
            out = out.reshape(size[::-1]).T
        elif (k1, k2) == ("K", "V"):
            out = s * torch.einsum("nlab,nlc,nld->acbd", Sig, rho, q)
            out = out.reshape(size[::-1]).T
        elif (k1, k2) == ("Q", "O"):
            WkSWv = torch.einsum("xc,nlxy,yd->nlcd", Wk, Sig, Wv)
            out = s * torch.einsum("nlb,nlxc,nle->bxce", X, WkSWv, r)
        elif (k1, k2) == ("K", "O"):
            out = s * torch.einsum("nlx,nlbc,nle->bxce", q, Sig @ Wv, r)
        elif (k1, k2) == ("V", "O"):
            T = torch.einsum("nla,nle->ae", mo.M1[:, h], r)
            out = torch.einsum("ae,cd->acde", T, torch.eye(self.dk, dtype=X.dtype, device=X.device))
        else:  # pragma: no cover - all pairs handled above
            raise AssertionError((k1, k2))
        return out.reshape(size)

    def group_block(self, g1, g2) -> Block:
        """The block between two parameter groups, in paper layout (cached)."""
        key = (g1, g2)
        if key not in self._cache:
            outer = self._outer(g1, g2)
            functional = self._layer_functional(g1, g2)
            if self.factors.loss.Lambda_exact is not None:  # curvature of the network above
                functional = functional + (self._outer(g1, g2, "Lambda_exact") - outer)
            self._cache[key] = Block(outer, functional)
        return self._cache[key]

    # ---- torch layout -------------------------------------------------------------------------
    def block(self, rows: Tensor, cols: Tensor) -> Block:
        """The block for arbitrary parameter positions ``rows``, ``cols`` (see :func:`param_index`)."""
        loc_r, loc_c = self.layout.locate(rows), self.layout.locate(cols)
        ref = self.factors.loss.r
        parts = {p: ref.new_zeros(len(loc_r), len(loc_c)) for p in ("outer", "functional")}
        groups_r = sorted({g for g, _ in loc_r}, key=str)
        groups_c = sorted({g for g, _ in loc_c}, key=str)
        for g1, g2 in product(groups_r, groups_c):
            ri = [(i, l) for i, (g, l) in enumerate(loc_r) if g == g1]
            ci = [(j, l) for j, (g, l) in enumerate(loc_c) if g == g2]
            blk = self.group_block(g1, g2)
            ri_pos, ri_loc = torch.tensor([i for i, _ in ri]), torch.tensor([l for _, l in ri])
            ci_pos, ci_loc = torch.tensor([j for j, _ in ci]), torch.tensor([l for _, l in ci])
            for p in parts:
                parts[p][ri_pos[:, None], ci_pos[None, :]] = getattr(blk, p)[ri_loc[:, None], ci_loc[None, :]]
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
