r"""Loss-side terms: the output gradient :math:`\mathbf r` and curvature :math:`\boldsymbol\Lambda`.

Supported losses are ``nn.MSELoss`` and ``nn.CrossEntropyLoss`` (``reduction`` ``"mean"`` or
``"sum"``; cross-entropy with ``ignore_index`` and ``label_smoothing``, without class
``weight``). Their second derivatives with respect to the model output are applied in closed
form (:func:`loss_hessian_mp`).

Batches: with ``"mean"`` reduction, each batch's loss is weighted by its share of the mean's
denominator over all data (:func:`mean_denominator`): the number of counted targets for
cross-entropy (class weights summed when given, ``ignore_index`` targets not counted), the number
of entries for MSE, the batch size otherwise. So splitting the same data into batches never
changes the result. For equal-sized, fully counted batches this is curvlinops' ``batch_size /
num_data``; an explicit ``num_data`` selects that convention.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

SUPPORTED_LOSSES = (nn.MSELoss, nn.CrossEntropyLoss)


def check_loss(loss_func) -> None:
    """Raise a ``ValueError``/``NotImplementedError`` for losses the closed forms do not cover."""
    if not isinstance(loss_func, SUPPORTED_LOSSES):
        raise NotImplementedError(
            f"loss_func must be nn.MSELoss or nn.CrossEntropyLoss, got {type(loss_func).__name__}"
        )
    if loss_func.reduction not in ("mean", "sum"):
        raise ValueError(f"loss_func.reduction must be 'mean' or 'sum', got {loss_func.reduction!r}")
    if isinstance(loss_func, nn.CrossEntropyLoss) and loss_func.weight is not None:
        raise NotImplementedError("nn.CrossEntropyLoss with class weights is not supported (use weight=None)")


def batch_weight(loss_func, batch_size: float, num_data: float) -> float:
    """Weight of one batch in the empirical risk: ``batch_size / num_data`` for mean reduction, else 1.

    ``batch_size`` and ``num_data`` may be :func:`mean_denominator` s of the batch and of all data.
    """
    return batch_size / num_data if loss_func.reduction == "mean" else 1.0


def mean_denominator(loss_func, batch_size: int, y) -> float:
    """What ``loss_func`` with ``reduction="mean"`` divides one batch's summed loss by.

    Cross-entropy with class-index targets: the number of targets that are not ``ignore_index``
    (their class weights summed, with ``weight``); with class-probability targets: the number of
    positions. MSE: the number of entries. Any other loss: ``batch_size``.
    """
    if isinstance(loss_func, nn.CrossEntropyLoss) and isinstance(y, Tensor):
        if not y.is_floating_point():
            valid = y != loss_func.ignore_index
            if loss_func.weight is None:
                return float(valid.sum())
            return float(loss_func.weight[y[valid]].sum())
        return float(y.numel() // y.shape[1]) if y.dim() > 1 else float(y.shape[0])
    if isinstance(loss_func, nn.MSELoss) and isinstance(y, Tensor):
        return float(y.numel())
    return float(batch_size)


def _ce_parts(loss_func: nn.CrossEntropyLoss, output: Tensor, y: Tensor):
    """Probabilities ``p`` (classes on dim 1), valid-position mask and the mean normaliser."""
    p = torch.softmax(output, dim=1)
    if y.dtype in (torch.long, torch.int, torch.int32, torch.int64):
        valid = (y != loss_func.ignore_index).unsqueeze(1).to(output.dtype)
        norm = valid.sum() if loss_func.reduction == "mean" else torch.ones((), dtype=output.dtype)
    else:  # class probabilities as targets
        valid = torch.ones_like(output[:, :1])
        norm = torch.tensor(float(output.numel() // output.shape[1]), dtype=output.dtype) if loss_func.reduction == "mean" else torch.ones((), dtype=output.dtype)
    return p, valid, norm


def loss_hessian_mp(loss_func, output: Tensor, y: Tensor, M: Tensor) -> Tensor:
    r"""Apply :math:`\nabla^2_{\text{output}}\ell` to ``M`` ``[V, *output.shape]`` (closed form).

    MSE: :math:`2M/\text{numel}` (mean) or :math:`2M` (sum). Cross-entropy, per position:
    :math:`(\mathrm{diag}\,\mathbf p - \mathbf p\mathbf p^\top)\mathbf m`, zero at ignored
    positions, divided by the number of counted positions (mean). Label smoothing leaves the
    Hessian unchanged.
    """
    if isinstance(loss_func, nn.MSELoss):
        return M * (2.0 / output.numel() if loss_func.reduction == "mean" else 2.0)
    p, valid, norm = _ce_parts(loss_func, output, y)
    pM = p * M
    return (pM - p * pM.sum(dim=2, keepdim=True)) * valid / norm
