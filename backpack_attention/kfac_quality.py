r"""How good is KFAC on an attention layer? Errors against the exact GGN, per block and head.

:func:`kfac_quality` builds, for one attention layer of a model, the exact GGN of the layer's
parameters (closed-form blocks, :func:`~backpack_attention.hessian_blocks`) and compares with it

* the attention-aware KFAC (``kfac_approx="attention"``), the generic KFAC-expand (what every
  ``nn.Linear``-based library computes) and the attention-aware EKFAC
  (:class:`~backpack_attention.AttentionKFACLinearOperator`,
  :class:`~backpack_attention.AttentionEKFACLinearOperator`);
* the best single Kronecker product of each block (Van Loan & Pitsianis, 1993): the floor of any
  one-Kronecker-product approximation of that block;

by the relative Frobenius error :math:`\lVert\mathbf K_b-\mathbf G_b\rVert_F/\lVert\mathbf G_b\rVert_F`
of each block :math:`b` (``W_Q, W_K, W_V, W_O`` per head and for all heads, and the whole layer,
where the block-diagonal structure of KFAC also drops the couplings between groups). It also
reports the angle between the damped KFAC- and exact-GGN-preconditioned gradients of the layer,
:math:`\angle\big((\mathbf K+\delta\mathbf I)^{-1}\mathbf g,(\mathbf G+\delta\mathbf I)^{-1}\mathbf g\big)`.
Every number is computed; the layer must be small enough for dense ``[P, P]`` matrices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from backpack_attention.blocks import _as_batches, hessian_blocks
from backpack_attention.derivatives.kfac import best_kronecker
from backpack_attention.derivatives.loss import batch_weight
from backpack_attention.module import as_attention
from backpack_attention.operators.kfac import AttentionEKFACLinearOperator, AttentionKFACLinearOperator

__all__ = ["kfac_quality", "KFACQuality"]

#: The approximations compared (column order of :meth:`KFACQuality.table`).
METHODS = ("attention", "expand", "ekfac", "best_kronecker")

#: The weight blocks reported, and the factor shapes of their best Kronecker product.
BLOCKS = ("W_Q", "W_K", "W_V", "W_O")


@dataclass
class KFACQuality:
    """Result of :func:`kfac_quality`.

    ``errors[(block, head)][method]``: relative Frobenius error (``head=None``: all heads; block
    ``"layer"``: the layer's whole GGN); ``angles[method]``: degrees between the method's and the
    exact GGN's damped preconditioned gradients; ``damping``: the damping used for the angles.
    """

    errors: Dict[Tuple[str, Optional[int]], Dict[str, float]] = field(default_factory=dict)
    angles: Dict[str, float] = field(default_factory=dict)
    damping: float = 0.0

    def rows(self) -> List[dict]:
        """One dict per block: ``block``, ``head`` and one error per method."""
        return [{"block": b, "head": h, **errs} for (b, h), errs in self.errors.items()]

    def table(self) -> str:
        """Markdown table of the errors and the angles."""
        lines = ["| block | head | " + " | ".join(METHODS) + " |", "|---|---|" + "---|" * len(METHODS)]
        for (b, h), errs in self.errors.items():
            cells = " | ".join("–" if m not in errs else f"{errs[m]:.3g}" for m in METHODS)
            lines.append(f"| {b} | {'all' if h is None else h} | {cells} |")
        lines.append("")
        lines.append(f"Angle to the exact-GGN-preconditioned gradient (damping {self.damping:.3g}): " + ", ".join(
            f"{m} {a:.1f}°" for m, a in self.angles.items()))
        return "\n".join(lines)


def _rel(a: Tensor, b: Tensor) -> float:
    nb = b.norm()
    return float("nan") if nb == 0 else float((a - b).norm() / nb)


def _angle(u: Tensor, v: Tensor) -> float:
    c = float(u @ v / (u.norm() * v.norm()))
    return math.degrees(math.acos(max(-1.0, min(1.0, c))))


def _gradient(model_func, loss_func, params, batches, num_data) -> Tensor:
    grads = [torch.zeros_like(p) for p in params]
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        for X, y in batches:
            with torch.enable_grad():
                loss = loss_func(model_func(X), y) * batch_weight(loss_func, X.shape[0], num_data)
                gs = torch.autograd.grad(loss, params, allow_unused=True)
            for a, g in zip(grads, gs):
                if g is not None:
                    a.add_(g.detach())
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
    return torch.cat([g.reshape(-1) for g in grads])


def kfac_quality(model_func: nn.Module, loss_func, module: nn.Module, data, *, fisher_type: str = "type-2",
                 damping: Optional[float] = None, separate_weight_and_bias: bool = False,
                 num_data: Optional[int] = None) -> KFACQuality:
    """Errors of KFAC on one attention layer against its exact GGN (module docstring).

    Args:
        model_func: the model, containing ``module``.
        loss_func: ``nn.MSELoss`` or ``nn.CrossEntropyLoss``.
        module: a :class:`~backpack_attention.MultiheadSelfAttention` (or converted adapter) called
            once per forward pass.
        data: an iterable of ``(X, y)`` batches, or one ``(X, y)``.
        fisher_type: the KFAC operators' ``fisher_type``.
        damping: damping of both preconditioners for the angles (default: ``1e-3`` times the
            exact GGN's mean eigenvalue).
        separate_weight_and_bias: the KFAC operators' option (default: joint blocks).
        num_data: number of data points (default: counted).

    Returns:
        :class:`KFACQuality` (``.table()`` for a markdown table).
    """
    m = as_attention(module)
    batches = _as_batches(data)
    N = sum(X.shape[0] for X, _ in batches) if num_data is None else num_data
    params = list(m.parameters())
    P = sum(p.numel() for p in params)
    blocks = hessian_blocks(model_func, loss_func, m, batches, num_data=N)
    G = blocks.matrix("outer")
    eye = torch.eye(P, dtype=G.dtype, device=G.device)
    kw = dict(fisher_type=fisher_type, separate_weight_and_bias=separate_weight_and_bias, num_data=N,
              check_deterministic=False)
    ops = {
        "attention": AttentionKFACLinearOperator(model_func, loss_func, params, batches, kfac_approx="attention", **kw),
        "expand": AttentionKFACLinearOperator(model_func, loss_func, params, batches, kfac_approx="expand", **kw),
        "ekfac": AttentionEKFACLinearOperator(model_func, loss_func, params, batches, kfac_approx="attention", **kw),
    }
    dense = {name: op @ eye for name, op in ops.items()}
    layout = m.layout
    out = KFACQuality()
    for name in BLOCKS:
        for h in list(range(layout.num_heads)) + [None]:
            idx = layout.param_index(name, h)
            ref = G[idx][:, idx]
            errs = {k: _rel(D[idx][:, idx], ref) for k, D in dense.items()}
            p = idx.numel() // layout.embed_dim
            p, q = (p, layout.embed_dim) if name != "W_O" else (layout.embed_dim, p)
            B, C = best_kronecker(ref, p, q)
            errs["best_kronecker"] = _rel(torch.kron(B, C), ref)
            out.errors[(name, h)] = errs
    out.errors[("layer", None)] = {k: _rel(D, G) for k, D in dense.items()}
    # angles between damped preconditioned gradients
    g = _gradient(model_func, loss_func, params, batches, N)
    delta = float(G.trace() / P) * 1e-3 if damping is None else float(damping)
    out.damping = delta
    exact = torch.linalg.solve(G + delta * eye, g)
    for name, op in ops.items():
        pg = op.inverse(delta) @ g
        out.angles[name] = _angle(pg, exact)
    return out
