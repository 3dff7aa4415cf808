"""BackPACK derivatives of ``nn.CrossEntropyLoss`` that honour ``ignore_index``.

BackPACK 1.7.1 refuses a non-default ``ignore_index`` and, with the default one (-100), gives
ignored positions the curvature of a counted target and divides by all positions: its
``DiagGGNExact``/``DiagHessian`` are then wrong (0.05-0.7 relative error). Here ignored positions
have zero curvature (their probabilities are masked before the square-root factors, the
Hessian sums and the Monte-Carlo samples are formed) and ``reduction="mean"`` divides by the
number of counted targets, exactly as the loss does. Class ``weight`` stays unsupported
(BackPACK's error).
"""

from __future__ import annotations

from typing import List, Optional

import torch
from backpack.core.derivatives.crossentropyloss import CrossEntropyLossDerivatives
from backpack.utils.subsampling import subsample
from torch import Tensor


class IgnoreIndexCrossEntropyLossDerivatives(CrossEntropyLossDerivatives):
    """Cross-entropy derivatives with ``ignore_index`` (any value) and counted-target normalisation."""

    def _check_2nd_order_parameters(self, module) -> None:
        if module.weight is not None:
            raise NotImplementedError(
                "CrossEntropyLoss with class weights is not supported by the second-order BackPACK "
                "extensions (use weight=None, or backpack_attention's curvature operators)"
            )

    @staticmethod
    def _valid(module, subsampling: Optional[List[int]] = None) -> Optional[Tensor]:
        """``[N, *]`` bool mask of counted targets (``None`` for class-probability targets)."""
        y = subsample(module.input1, subsampling=subsampling)
        if y.is_floating_point():
            return None
        return y != module.ignore_index

    def _counted(self, module) -> float:
        valid = self._valid(module)
        x = module.input0
        return float(x.numel() // x.shape[1]) if valid is None else float(valid.sum())

    def _get_probs(self, module, subsampling: List[int] = None) -> Tensor:
        self._normalization = self._counted(module)
        probs = torch.softmax(subsample(module.input0, subsampling=subsampling), dim=1)
        valid = self._valid(module, subsampling)
        return probs if valid is None else probs * valid.unsqueeze(1).to(probs.dtype)

    def _get_mean_normalization(self, input: Tensor) -> float:
        return self._normalization

    def _sqrt_hessian_sampled(self, module, g_inp, g_out, mc_samples: int = 1, subsampling=None) -> Tensor:
        self._normalization = self._counted(module)
        out = super()._sqrt_hessian_sampled(module, g_inp, g_out, mc_samples=mc_samples, subsampling=subsampling)
        valid = self._valid(module, subsampling)
        return out if valid is None else out * valid.unsqueeze(1).unsqueeze(0).to(out.dtype)
