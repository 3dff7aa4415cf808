r"""BackPACK derivatives of :class:`~backpack_attention.MultiheadSelfAttention`.

The layer is the forward pipeline of :mod:`backpack_attention.derivatives.forward`,

.. math::
    \mathbf x \xrightarrow{\text{in-proj (linear)}} (\mathbf Q,\mathbf K,\mathbf V)
    \xrightarrow{\text{core (no parameters)}} \mathbf Z
    \xrightarrow{\text{out-proj (linear)}} \mathbf y .

The in- and out-projections are "linear layers with weight sharing over the sequence"; the core's
transposed Jacobian is :func:`backpack_attention.derivatives.core.core_vjp` (closed form, never the
fused kernel's autograd). Shapes are BackPACK's: ``mat`` is ``[V, N, *out]`` with a free axis ``V``.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from backpack.core.derivatives.basederivatives import BaseParameterDerivatives
from backpack.utils.subsampling import subsample
from torch import Tensor, nn

from backpack_attention.derivatives.core import core_jvp, core_vjp
from backpack_attention.derivatives.forward import ForwardQuantities
from backpack_attention.layout import PARAM_NAMES
from backpack_attention.module import MultiheadSelfAttention

#: Largest number of ``float`` entries of the ``[V, N, H, L, L]`` core intermediates
#: materialised at once; the free axis ``V`` is processed in chunks below this size.
CORE_CHUNK_NUMEL = 2**25


def attention_masks(module: MultiheadSelfAttention) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """``(key_padding_mask, attn_mask)`` of ``module``'s last forward pass.

    Keyword arguments are recorded by the hook :func:`backpack_attention.backpack_ext.extend`
    installs; positional ones are BackPACK's ``module.input1`` / ``module.input2``.
    """
    recorded = getattr(module, "_bpa_masks", None)
    if recorded is not None and recorded[0]() is getattr(module, "input0", None):
        return recorded[1], recorded[2]
    masks = [getattr(module, f"input{i}", None) for i in (1, 2)]
    return tuple(None if (m is None or m.numel() == 0) else m for m in masks)


def allowed_mask(module: MultiheadSelfAttention, x: Tensor, subsampling=None) -> Optional[Tensor]:
    """Boolean mask ``[N or 1, 1, L, L]`` of allowed (query, key) pairs for ``module``'s input ``x``.

    ``x`` is the (possibly subsampled) input; the padding mask is subsampled alike.
    """
    kpm, attn_mask = attention_masks(module)
    if kpm is not None:
        kpm = subsample(kpm, subsampling=subsampling)
    return module.allowed_mask(x, kpm, attn_mask)


class MHSADerivatives(BaseParameterDerivatives):
    r"""Partial derivatives of :class:`~backpack_attention.MultiheadSelfAttention`.

    Parameters (torch layout): ``in_proj_weight [3E, E]``, ``in_proj_bias [3E]``,
    ``out_proj_weight [E, E]``, ``out_proj_bias [E]``.

    Index conventions: ``v`` free axis, ``n`` batch, ``l`` sequence, ``i`` input feature
    (``E``), ``o`` in-projection output (``3E``: queries, keys, values, head-major inside each),
    ``e`` out-projection input/output feature (``E``).

    The core's transposed Jacobian maps a cotangent ``G_y [V, N, L, E]`` of the output to the
    cotangent ``G_qkv [V, N, L, 3E]`` of the in-projection output (:meth:`qkv_cotangent`). It is
    cached per (module call, ``mat``) because BackPACK applies the four parameter products and
    the input product to the same ``mat``.
    """

    PARAMS = list(PARAM_NAMES)

    # ---- structure --------------------------------------------------------------------
    def hessian_is_zero(self, module: MultiheadSelfAttention) -> bool:
        """Attention is not linear in its input (``False``)."""
        return False

    def hessian_is_diagonal(self, module: MultiheadSelfAttention) -> bool:
        """The input Hessian of attention is dense per sample (``False``)."""
        return False

    # ---- cached forward ---------------------------------------------------------------
    def forward_quantities(self, module: MultiheadSelfAttention, subsampling: List[int] = None) -> ForwardQuantities:
        """Recompute (and cache on ``module``) Q, K, V, A and Z for the stored input."""
        key = None if subsampling is None else tuple(subsampling)
        cache = module.__dict__.setdefault("_bpa_cache", {})
        if cache.get("input") is not module.input0:
            cache.clear()
            cache["input"] = module.input0
        fwd = cache.get(("fwd", key))
        if fwd is None:
            x = subsample(module.input0, subsampling=subsampling)
            fwd = ForwardQuantities(module, x, allowed_mask(module, x, subsampling))
            cache[("fwd", key)] = fwd
        return fwd

    @staticmethod
    def clear_cache(module: nn.Module) -> None:
        """Drop the cached forward quantities and cotangents of ``module``."""
        module.__dict__.pop("_bpa_cache", None)

    def qkv_cotangent(self, module: MultiheadSelfAttention, mat: Tensor, subsampling: List[int] = None) -> Tensor:
        """``G_qkv [V, N, L, 3E]``: the core's transposed Jacobian applied to ``mat [V, N, L, E]``.

        ``G_z = mat W_out`` (head outputs), then per head ``core_vjp`` (docs/math.md, 4.8). The free
        axis is chunked so that the ``[V, N, H, L, L]`` intermediates stay below
        :data:`CORE_CHUNK_NUMEL` entries.
        """
        fwd = self.forward_quantities(module, subsampling)
        cache = module.__dict__["_bpa_cache"]
        key = ("qkv", None if subsampling is None else tuple(subsampling), id(mat))
        hit = cache.get(key)
        if hit is not None and hit[0] is mat:  # the stored reference keeps id(mat) valid
            return hit[1]
        V_, N, L, E = mat.shape
        layout = module.layout
        chunk = max(1, CORE_CHUNK_NUMEL // max(1, N * layout.num_heads * L * L))
        out = []
        for m in mat.split(chunk, dim=0):
            G_z = layout.split_heads(torch.einsum("vnle,ef->vnlf", m, module.out_proj_weight.detach()))
            G_Q, G_K, G_V = core_vjp(fwd.Q, fwd.K, fwd.V, fwd.A, G_z, module.variant, fwd.allowed)
            out.append(layout.merge_qkv(G_Q, G_K, G_V))
        G_qkv = torch.cat(out, dim=0)
        cache[key] = (mat, G_qkv)
        return G_qkv

    # ---- input Jacobian -----------------------------------------------------------------
    def _jac_t_mat_prod(self, module, g_inp, g_out, mat: Tensor, subsampling: List[int] = None) -> Tensor:
        """``[V, N, L, E] -> [V, N, L, E]``: ``G_x = G_qkv W_in``."""
        G_qkv = self.qkv_cotangent(module, mat, subsampling)
        return torch.einsum("vnlo,oi->vnli", G_qkv, module.in_proj_weight.detach())

    def _jac_mat_prod(self, module, g_inp, g_out, mat: Tensor) -> Tensor:
        """``[V, N, L, E] -> [V, N, L, E]`` (forward mode, :func:`core_jvp`)."""
        fwd = self.forward_quantities(module)
        dQ, dK, dV = module.layout.split_qkv(torch.einsum("vnli,oi->vnlo", mat, module.in_proj_weight.detach()))
        dO = core_jvp(fwd.Q, fwd.K, fwd.V, fwd.A, dQ, dK, dV, module.variant, fwd.allowed)
        return torch.einsum("vnle,fe->vnlf", module.layout.merge_heads(dO), module.out_proj_weight.detach())

    def ea_jac_t_mat_jac_prod(self, module, g_inp, g_out, mat):
        raise NotImplementedError(
            f"{type(module).__name__}: the batch-averaged Jacobian sandwich (KFRA) is not "
            "implemented for attention; use KFAC or KFLR"
        )

    # ---- parameter Jacobians ------------------------------------------------------------
    @staticmethod
    def _eq(sum_batch: bool) -> str:
        return "" if sum_batch else "n"

    def _in_proj_weight_jac_t_mat_prod(self, module, g_inp, g_out, mat, sum_batch=True, subsampling=None):
        """``[V, N, L, E] -> [V, (N,) 3E, E]``: ``sum_l G_qkv[l] x[l]^T``."""
        G_qkv = self.qkv_cotangent(module, mat, subsampling)
        x = self.forward_quantities(module, subsampling).x
        return torch.einsum(f"vnlo,nli->v{self._eq(sum_batch)}oi", G_qkv, x)

    def _in_proj_bias_jac_t_mat_prod(self, module, g_inp, g_out, mat, sum_batch=True, subsampling=None):
        """``[V, N, L, E] -> [V, (N,) 3E]``: ``sum_l G_qkv[l]``."""
        G_qkv = self.qkv_cotangent(module, mat, subsampling)
        return G_qkv.sum((1, 2) if sum_batch else 2)

    def _out_proj_weight_jac_t_mat_prod(self, module, g_inp, g_out, mat, sum_batch=True, subsampling=None):
        """``[V, N, L, E] -> [V, (N,) E, E]``: ``sum_l mat[l] z[l]^T``."""
        Z = self.forward_quantities(module, subsampling).Z
        return torch.einsum(f"vnlo,nle->v{self._eq(sum_batch)}oe", mat, Z)

    def _out_proj_bias_jac_t_mat_prod(self, module, g_inp, g_out, mat, sum_batch=True, subsampling=None):
        """``[V, N, L, E] -> [V, (N,) E]``: ``sum_l mat[l]``."""
        return mat.sum((1, 2) if sum_batch else 2)


def clear_module_cache(module: nn.Module) -> None:
    """Drop the forward quantities and cotangents cached on ``module`` (any module; a no-op if none)."""
    MHSADerivatives.clear_cache(module)
