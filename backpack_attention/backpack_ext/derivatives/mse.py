"""BackPACK derivatives of ``nn.MSELoss`` on ``[N, *, C]`` outputs (BackPACK's are 2-D only)."""

from __future__ import annotations

from math import sqrt

import torch
from backpack.core.derivatives.mseloss import MSELossDerivatives
from torch import Tensor, nn


class SequenceMSELossDerivatives(MSELossDerivatives):
    """``nn.MSELoss`` derivatives for inputs ``[N, *]`` of any rank >= 2 (BackPACK: 2-D only).

    The loss Hessian is ``2 I`` over all ``D = prod(shape[1:])`` outputs of a sample (divided
    by ``input.numel()`` for ``reduction="mean"``); its exact square root has ``V = D`` columns.
    """

    def _check_input_dims(self, module: nn.MSELoss):
        if module.input0.dim() < 2:
            raise ValueError(f"MSELoss: input must be [N, *] with at least 2 dims, got {list(module.input0.shape)}")

    def _sqrt_hessian(self, module, g_inp, g_out, subsampling=None):
        self._check_input_dims(module)
        x = module.input0
        N, feat = x.shape[0], x.shape[1:]
        D = feat.numel()
        N_active = N if subsampling is None else len(subsampling)
        scale = sqrt(2) / (sqrt(x.numel()) if module.reduction == "mean" else 1.0)
        eye = scale * torch.eye(D, device=x.device, dtype=x.dtype)
        return eye.unsqueeze(1).expand(-1, N_active, -1).reshape(D, N_active, *feat)

    def _sum_hessian(self, module, g_inp, g_out):
        self._check_input_dims(module)
        x = module.input0
        N, D = x.shape[0], x.shape[1:].numel()
        H = 2 * torch.eye(D, device=x.device, dtype=x.dtype)
        return H * N if module.reduction == "sum" else H / D

    def _compute_sampled_grads_manual(self, subsampled_input: Tensor, mc_samples: int) -> Tensor:
        dist = self._make_distribution(subsampled_input)
        samples = dist.sample(sample_shape=torch.Size([mc_samples]))
        return 2 * (samples - subsampled_input.unsqueeze(0))
