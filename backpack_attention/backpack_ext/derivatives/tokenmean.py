"""BackPACK derivatives of :class:`~backpack_attention.backpack_ext.encoder.TokenMean` (mean pooling
over the tokens of ``[N, L, E]``)."""

from __future__ import annotations

from backpack.core.derivatives.basederivatives import BaseDerivatives


class TokenMeanDerivatives(BaseDerivatives):
    """Derivatives of :class:`TokenMean` (linear: the Hessian is zero)."""

    @staticmethod
    def _axis(module) -> int:
        d = module.dim % module.input0.dim()
        if d == 0:
            raise ValueError(f"TokenMean(dim={module.dim}) averages the batch axis of a "
                             f"{module.input0.dim()}-D input; BackPACK needs per-sample outputs")
        return d

    def _jac_t_mat_prod(self, module, g_inp, g_out, mat, subsampling=None):
        d = self._axis(module) + 1  # mat has the extra leading V axis
        n = module.input0.shape[d - 1]
        out = (mat / n).unsqueeze(d)
        return out.expand(*out.shape[:d], n, *out.shape[d + 1:]).contiguous()

    def hessian_is_zero(self, module) -> bool:
        return True
