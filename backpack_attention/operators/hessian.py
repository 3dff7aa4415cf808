"""The Hessian operator and its parts (curvlinops' ``HessianLinearOperator``, fast on attention)."""

from __future__ import annotations

from backpack_attention.operators.base import AttentionCurvatureLinearOperator

#: The parts of the Hessian: ``full = outer + functional``, ``outer`` = the GGN.
PARTS = ("full", "outer", "functional")


class AttentionHessianLinearOperator(AttentionCurvatureLinearOperator):
    r"""Hessian :math:`\nabla^2_\theta\mathcal L` restricted to ``params`` (any parameters of the model), or one of its parts.

    Args:
        part: ``"full"`` (the Hessian, = curvlinops' ``HessianLinearOperator``), ``"outer"`` (the
            outer-product part = the GGN) or ``"functional"`` (Hessian minus GGN; indefinite).
        Other arguments: as :class:`AttentionGGNLinearOperator`.
    """

    def __init__(self, model_func, loss_func, params, data, *, part: str = "full", **kwargs):
        if part not in PARTS:
            raise ValueError(f"part must be one of {PARTS}, got {part!r}")
        self.part = part
        super().__init__(model_func, loss_func, params, data, **kwargs)

    def _batch_mv(self, state, v, batched):
        if self.part == "outer":
            return state.ggn_mv(v, batched)
        if self.part == "functional":
            return state.functional_mv(v, batched)
        return state.hessian_mv(v, batched)
