"""The generalised Gauss-Newton operator (curvlinops' ``GGNLinearOperator``, fast on attention)."""

from __future__ import annotations

from backpack_attention.operators.base import AttentionCurvatureLinearOperator


class AttentionGGNLinearOperator(AttentionCurvatureLinearOperator):
    r"""Generalised Gauss-Newton :math:`\mathbf G = \sum_n \mathbf J_n^\top\boldsymbol\Lambda_n\mathbf J_n`
    restricted to ``params`` (any parameters of the model); the same matrix as curvlinops' ``GGNLinearOperator``.

    Args:
        model_func: the model (an ``nn.Module``), typically with
            :class:`~backpack_attention.MultiheadSelfAttention` layers (or after ``convert_attention``).
        loss_func: loss module with ``reduction`` ``"mean"`` or ``"sum"`` (any twice-differentiable
            loss of the model output and targets, e.g. ``nn.CrossEntropyLoss``, ``nn.MSELoss``).
        params: list of parameters of the model (attention layers and any other; any subset, any
            order; a ``dict`` name -> parameter is also accepted). Shapes define the operator's layout.
        data: iterable of ``(X, y)`` batches that can be iterated repeatedly (same batches, same
            order, each time; a generator is refused: pass ``list(...)``).
        progressbar: show a progress bar over batches.
        check_deterministic: run curvlinops-style determinism checks at construction.
        num_data: number of data points (``None``: one pass over ``data`` to count them).
        batch_size_fn: batch size of dict-like ``X`` (required then).
        max_cached_batches: how many batches keep their forward cache between products.
        column_chunk: columns of a matrix product processed together (vectorised; memory grows
            with it like curvlinops' vmapped matmat).

    Shape: ``[P, P]`` with ``P = sum(p.numel() for p in params)``.
    """

    def _batch_mv(self, state, v, batched):
        return state.ggn_mv(v, batched)
