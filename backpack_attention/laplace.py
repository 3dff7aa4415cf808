"""laplace-torch backends built on this package's operators (optional: needs ``laplace-torch``).

laplace-torch fits Laplace approximations from a curvature backend. Its curvlinops backends run
curvlinops' generic GGN/Hessian operators, which fail on attention with PyTorch's fused kernels
and are slow on it otherwise; its BackPACK backends build stock BackPACK extensions, which do not
know attention, LayerNorm or residual connections. These backends plug this package's operators
into laplace-torch's curvlinops interface::

    from laplace import Laplace
    from backpack_attention.laplace import AttentionGGN

    model = ba.convert_attention(model)        # nn.MultiheadAttention -> closed-form attention
    la = Laplace(model, "classification", subset_of_weights="all",
                 hessian_structure="full", backend=AttentionGGN)
    la.fit(train_loader)

* ``hessian_structure="full"``: the exact GGN (:class:`AttentionGGN`) or Hessian
  (:class:`AttentionHessian`) of all parameters, from :class:`~backpack_attention.AttentionGGNLinearOperator`
  / :class:`~backpack_attention.AttentionHessianLinearOperator` (no fused-kernel failure, LayerNorm
  rows right).
* ``"diag"``: laplace-torch's own exact GGN diagonal from per-sample Jacobians (``torch.func``), which
  runs through the converted attention's closed-form derivatives.
* ``"kron"``: not yet (KFAC of attention is a separate operator); refused with a clear error.
"""

from __future__ import annotations

try:
    from laplace.curvature.curvlinops import CurvlinopsGGN, CurvlinopsHessian
except ImportError as err:  # pragma: no cover - optional dependency
    raise ImportError(
        "backpack_attention.laplace needs laplace-torch: pip install 'backpack-attention[laplace]'"
    ) from err

from backpack_attention.operators import AttentionGGNLinearOperator, AttentionHessianLinearOperator

__all__ = ["AttentionGGN", "AttentionHessian"]


class _NoKron:
    def kron(self, x, y, N, **kwargs):
        raise NotImplementedError(
            f"{type(self).__name__}: hessian_structure='kron' is not supported by this backend yet; use "
            "hessian_structure='full' or 'diag'"
        )


class AttentionGGN(_NoKron, CurvlinopsGGN):
    """laplace-torch GGN backend on :class:`~backpack_attention.AttentionGGNLinearOperator`."""

    def __init__(self, *args, stochastic: bool = False, **kwargs):
        if stochastic:
            raise ValueError("AttentionGGN: stochastic=True (Monte-Carlo Fisher) is not supported; use the exact GGN")
        super().__init__(*args, stochastic=False, **kwargs)

    @property
    def _linop_context(self):
        return AttentionGGNLinearOperator


class AttentionHessian(_NoKron, CurvlinopsHessian):
    """laplace-torch Hessian backend on :class:`~backpack_attention.AttentionHessianLinearOperator`."""

    @property
    def _linop_context(self):
        return AttentionHessianLinearOperator
