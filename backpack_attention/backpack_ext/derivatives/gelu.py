"""BackPACK derivatives of ``nn.GELU``."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from backpack.core.derivatives.elementwise import ElementwiseDerivatives
from backpack.utils.subsampling import subsample
from torch import Tensor, nn


class GELUDerivatives(ElementwiseDerivatives):
    r"""Elementwise derivatives of ``nn.GELU``.

    ``approximate="none"``: :math:`f = x\Phi(x)`, :math:`f' = \Phi(x) + x\varphi(x)`,
    :math:`f'' = \varphi(x)(2 - x^2)`. ``approximate="tanh"``: derivatives by autograd of the
    elementwise function (exact).
    """

    def hessian_is_zero(self, module: nn.GELU) -> bool:
        return False

    @staticmethod
    def _autograd(module, x: Tensor, order: int) -> Tensor:
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            y = F.gelu(x, approximate=module.approximate)
            (d1,) = torch.autograd.grad(y.sum(), x, create_graph=order > 1)
            if order == 1:
                return d1.detach()
            (d2,) = torch.autograd.grad(d1.sum(), x)
            return d2.detach()

    def df(self, module, g_inp, g_out, subsampling=None):
        x = subsample(module.input0, subsampling=subsampling).detach()
        if module.approximate == "none":
            phi = torch.exp(-0.5 * x**2) / math.sqrt(2 * math.pi)
            Phi = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
            return Phi + x * phi
        return self._autograd(module, x, 1)

    def d2f(self, module, g_inp, g_out):
        x = module.input0.detach()
        if module.approximate == "none":
            phi = torch.exp(-0.5 * x**2) / math.sqrt(2 * math.pi)
            return phi * (2 - x**2)
        return self._autograd(module, x, 2)
