r"""BackPACK derivatives of ``nn.LayerNorm`` (the Jacobian from :mod:`backpack_attention.derivatives.layernorm`)."""

from __future__ import annotations

from typing import Optional, Tuple

from backpack.core.derivatives.basederivatives import BaseParameterDerivatives
from backpack.utils.subsampling import subsample
from torch import Tensor, nn

from backpack_attention.derivatives.layernorm import center, normalize, normalized_dims


class LayerNormDerivatives(BaseParameterDerivatives):
    r"""Partial derivatives of ``nn.LayerNorm``.

    Over the ``D = prod(normalized_shape)`` trailing features of each position:
    :math:`\hat{\mathbf x} = (\mathbf x - \mu)/\sigma`, :math:`\sigma = \sqrt{\mathrm{var}+\epsilon}`
    (biased variance), :math:`\mathbf y = \boldsymbol\gamma\odot\hat{\mathbf x} + \boldsymbol\beta`.
    The input Jacobian is :math:`\mathrm{diag}(\boldsymbol\gamma)\mathbf P` with the symmetric
    :math:`\mathbf P = (\mathbf I - \mathbf 1\mathbf 1^\top/D - \hat{\mathbf x}\hat{\mathbf x}^\top/D)/\sigma`.
    The output is linear in ``weight`` (γ) and ``bias`` (β).
    """

    def hessian_is_zero(self, module: nn.LayerNorm) -> bool:
        return False

    def hessian_is_diagonal(self, module: nn.LayerNorm) -> bool:
        return False

    @staticmethod
    def _dims(module: nn.LayerNorm) -> Tuple[int, ...]:
        return normalized_dims(module.normalized_shape)

    def normalized(self, module: nn.LayerNorm, subsampling=None) -> Tuple[Tensor, Tensor]:
        """``(x_hat, 1/sigma)`` with shapes ``[N, *]`` and ``[N, *, 1...]``."""
        x = subsample(module.input0, subsampling=subsampling).detach()
        return normalize(x, self._dims(module), module.eps)

    def _project(self, module, g: Tensor, subsampling=None) -> Tensor:
        """Apply ``P`` to ``g [V, N, *]`` (``P`` acts on the normalized features)."""
        x_hat, inv_sigma = self.normalized(module, subsampling)
        return center(g, x_hat, inv_sigma, self._dims(module))

    def _gamma(self, module) -> Optional[Tensor]:
        return None if module.weight is None else module.weight.detach()

    def _jac_t_mat_prod(self, module, g_inp, g_out, mat, subsampling=None):
        gamma = self._gamma(module)
        return self._project(module, mat if gamma is None else mat * gamma, subsampling)

    def _jac_mat_prod(self, module, g_inp, g_out, mat):
        gamma = self._gamma(module)
        out = self._project(module, mat)
        return out if gamma is None else out * gamma

    def _sum_axes(self, module, mat, sum_batch) -> Tuple[int, ...]:
        # mat: [V, N, *extra, *normalized]
        n_extra = mat.dim() - 2 - len(module.normalized_shape)
        return ((1,) if sum_batch else ()) + tuple(range(2, 2 + n_extra))

    def _weight_jac_t_mat_prod(self, module, g_inp, g_out, mat, sum_batch=True, subsampling=None):
        """``[V, N, *, *D] -> [V, (N,) *D]``: ``sum mat ⊙ x_hat`` over positions."""
        x_hat, _ = self.normalized(module, subsampling)
        axes = self._sum_axes(module, mat, sum_batch)
        prod = mat * x_hat
        return prod.sum(axes) if axes else prod

    def _bias_jac_t_mat_prod(self, module, g_inp, g_out, mat, sum_batch=True, subsampling=None):
        """``[V, N, *, *D] -> [V, (N,) *D]``: ``sum mat`` over positions."""
        axes = self._sum_axes(module, mat, sum_batch)
        return mat.sum(axes) if axes else mat

    def ea_jac_t_mat_jac_prod(self, module, g_inp, g_out, mat):
        raise NotImplementedError("LayerNorm: the batch-averaged Jacobian sandwich (KFRA) is not implemented")
