"""BackPACK extensions that also handle attention and the other layers of a transformer.

Each factory takes the arguments of the ``backpack.extensions`` class of the same name and
returns an instance with the module extensions of :mod:`backpack_attention.backpack_ext`
registered (results land in ``param.<savefield>`` exactly as in BackPACK)::

    with backpack(ba.extensions.DiagGGNExact(), ba.extensions.BatchGrad()):
        loss.backward()

Additions: ``KFAC(mc_samples=1, kfac_approx="expand")`` and ``KFLR(kfac_approx="expand")``
accept ``kfac_approx="reduce"``; KFLR, DiagHessian and BatchDiagHessian also work on
residual (branching) graphs. ``register(ext)`` adds the module extensions to an existing
BackPACK extension instance.
"""

from __future__ import annotations

from backpack import extensions as _bp

from backpack_attention.backpack_ext import registry as _registry
from backpack_attention.backpack_ext.registry import register

__all__ = [
    "BatchGrad", "BatchL2Grad", "SumGradSquared", "Variance",
    "DiagGGNExact", "DiagGGNMC", "BatchDiagGGNExact", "BatchDiagGGNMC",
    "SqrtGGNExact", "SqrtGGNMC", "KFAC", "KFLR", "KFRA",
    "DiagHessian", "BatchDiagHessian", "HMP", "GGNMP", "PCHMP", "register",
]


def BatchGrad(subsampling=None) -> _bp.BatchGrad:
    """Per-sample gradients (``grad_batch``)."""
    return register(_bp.BatchGrad(subsampling=subsampling))


def BatchL2Grad() -> _bp.BatchL2Grad:
    """Per-sample squared gradient norms (``batch_l2``)."""
    return register(_bp.BatchL2Grad())


def SumGradSquared() -> _bp.SumGradSquared:
    """Sum of squared per-sample gradients (``sum_grad_squared``)."""
    return register(_bp.SumGradSquared())


def Variance() -> _bp.Variance:
    """Gradient variance (``variance``)."""
    return register(_bp.Variance())


def DiagGGNExact() -> _bp.DiagGGNExact:
    """Exact GGN diagonal (``diag_ggn_exact``)."""
    return register(_bp.DiagGGNExact())


def DiagGGNMC(mc_samples: int = 1) -> _bp.DiagGGNMC:
    """Monte-Carlo GGN diagonal (``diag_ggn_mc``)."""
    return register(_bp.DiagGGNMC(mc_samples=mc_samples))


def BatchDiagGGNExact() -> _bp.BatchDiagGGNExact:
    """Per-sample exact GGN diagonals (``diag_ggn_exact_batch``)."""
    return register(_bp.BatchDiagGGNExact())


def BatchDiagGGNMC(mc_samples: int = 1) -> _bp.BatchDiagGGNMC:
    """Per-sample Monte-Carlo GGN diagonals (``diag_ggn_mc_batch``)."""
    return register(_bp.BatchDiagGGNMC(mc_samples=mc_samples))


def SqrtGGNExact(subsampling=None) -> _bp.SqrtGGNExact:
    """Exact GGN square-root factors ``[V, N, *param]`` (``sqrt_ggn_exact``)."""
    return register(_bp.SqrtGGNExact(subsampling=subsampling))


def SqrtGGNMC(mc_samples: int = 1, subsampling=None) -> _bp.SqrtGGNMC:
    """Monte-Carlo GGN square-root factors (``sqrt_ggn_mc``)."""
    return register(_bp.SqrtGGNMC(mc_samples=mc_samples, subsampling=subsampling))


def KFAC(mc_samples: int = 1, kfac_approx: str = "expand") -> _bp.KFAC:
    """Monte-Carlo Kronecker factors (``kfac``); ``kfac_approx`` for weight sharing."""
    return register(_registry.KFAC(mc_samples=mc_samples, kfac_approx=kfac_approx))


def KFLR(kfac_approx: str = "expand") -> _bp.KFLR:
    """Exact-loss-Hessian Kronecker factors (``kflr``); ``kfac_approx`` for weight sharing."""
    return register(_registry.KFLR(kfac_approx=kfac_approx))


def KFRA() -> _bp.KFRA:
    """BackPACK's KFRA (``kfra``); raises ``NotImplementedError`` on attention/LayerNorm/GELU."""
    return register(_bp.KFRA())


def DiagHessian() -> _bp.DiagHessian:
    """Exact Hessian diagonal (``diag_h``), residual connections allowed. Small models only."""
    return register(_registry.DiagHessian())


def BatchDiagHessian() -> _bp.BatchDiagHessian:
    """Per-sample exact Hessian diagonals (``diag_h_batch``). Small models only."""
    return register(_registry.BatchDiagHessian())


def HMP(savefield: str = "hmp") -> _bp.HMP:
    """BackPACK's Hessian-matrix products; raises ``NotImplementedError`` on attention."""
    return register(_bp.HMP(savefield=savefield))


def GGNMP(savefield: str = "ggnmp") -> _bp.GGNMP:
    """BackPACK's GGN-matrix products; raises ``NotImplementedError`` on attention."""
    return register(_bp.GGNMP(savefield=savefield))


def PCHMP(savefield: str = "pchmp", modify: str = "clip") -> _bp.PCHMP:
    """BackPACK's positive-curvature Hessian products; raises ``NotImplementedError`` on attention."""
    return register(_bp.PCHMP(modify=modify, savefield=savefield))
