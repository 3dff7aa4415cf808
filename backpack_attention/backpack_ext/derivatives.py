r"""BackPACK derivatives classes for the layers a small transformer needs.

* :class:`MHSADerivatives`: :class:`~backpack_attention.MultiheadSelfAttention`, decomposed as

  .. math::
      \mathbf x \xrightarrow{\text{in-proj (linear)}} (\mathbf Q,\mathbf K,\mathbf V)
      \xrightarrow{\text{core (no parameters)}} \mathbf Z
      \xrightarrow{\text{out-proj (linear)}} \mathbf y .

  The in- and out-projections are "linear layers with weight sharing over the sequence";
  the core's transposed Jacobian is :func:`backpack_attention.derivatives.core.core_vjp`
  (closed form, never the fused kernel's autograd).
* :class:`LayerNormDerivatives`: ``nn.LayerNorm`` (any ``normalized_shape``, affine or not).
* :class:`GELUDerivatives`: ``nn.GELU`` (``approximate="none"`` and ``"tanh"``).
* :class:`SequenceMSELossDerivatives`: ``nn.MSELoss`` on ``[N, *, C]`` outputs.
* :class:`EmbeddingDerivatives`: BackPACK's, fixed for ``float64``.

Shape conventions are BackPACK's: a backpropagated matrix ``mat`` is ``[V, N, *out]`` where
``V`` is a free axis (loss-Hessian square-root columns or Monte-Carlo samples).
"""

from __future__ import annotations

import math
from math import sqrt
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from backpack.core.derivatives.basederivatives import BaseParameterDerivatives
from backpack.core.derivatives.elementwise import ElementwiseDerivatives
from backpack.core.derivatives.embedding import EmbeddingDerivatives as _BPEmbeddingDerivatives
from backpack.core.derivatives.mseloss import MSELossDerivatives
from backpack.utils.subsampling import subsample
from torch import Tensor, nn

from backpack_attention.derivatives.core import attention_matrix, core_jvp, core_vjp
from backpack_attention.module import PARAM_NAMES, MultiheadSelfAttention

#: Largest number of ``float`` entries of the ``[V, N, H, L, L]`` core intermediates
#: materialised at once; the free axis ``V`` is processed in chunks below this size.
CORE_CHUNK_NUMEL = 2**25


# --------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------
# Multi-head self-attention
# --------------------------------------------------------------------------------------
class _Forward:
    """Recomputed forward quantities of one attention call (explicit math, no fused kernel).

    Attributes (``H`` heads of width ``d``): ``x [N, L, E]``, ``allowed`` (mask or ``None``),
    ``Q, K, V, A`` (``[N, H, L, d]``, ``A`` is ``[N, H, L, L]``) and the concatenated head
    outputs ``Z [N, L, E]`` (the out-projection's input).
    """

    def __init__(self, module: MultiheadSelfAttention, x: Tensor, allowed: Optional[Tensor]):
        self.x, self.allowed = x, allowed
        with torch.no_grad():
            self.Q, self.K, self.V = module.project_qkv(x)
            self.A = attention_matrix(self.Q, self.K, allowed, module.attention)
            N, L, E = x.shape
            self.Z = (self.A @ self.V).transpose(1, 2).reshape(N, L, E)


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
    def forward_quantities(self, module: MultiheadSelfAttention, subsampling: List[int] = None) -> _Forward:
        """Recompute (and cache on ``module``) Q, K, V, A and Z for the stored input."""
        key = None if subsampling is None else tuple(subsampling)
        cache = module.__dict__.setdefault("_bpa_cache", {})
        if cache.get("input") is not module.input0:
            cache.clear()
            cache["input"] = module.input0
        fwd = cache.get(("fwd", key))
        if fwd is None:
            x = subsample(module.input0, subsampling=subsampling)
            fwd = _Forward(module, x, allowed_mask(module, x, subsampling))
            cache[("fwd", key)] = fwd
        return fwd

    @staticmethod
    def clear_cache(module: nn.Module) -> None:
        """Drop the cached forward quantities and cotangents of ``module``."""
        module.__dict__.pop("_bpa_cache", None)

    def qkv_cotangent(self, module: MultiheadSelfAttention, mat: Tensor, subsampling: List[int] = None) -> Tensor:
        """``G_qkv [V, N, L, 3E]``: the core's transposed Jacobian applied to ``mat [V, N, L, E]``.

        ``G_z = mat W_out`` (head outputs), then per head ``core_vjp`` (SPEC §4.8). The free
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
        H, d = module.num_heads, module.head_dim
        chunk = max(1, CORE_CHUNK_NUMEL // max(1, N * H * L * L))
        out = []
        for m in mat.split(chunk, dim=0):
            G_z = torch.einsum("vnle,ef->vnlf", m, module.out_proj_weight.detach())
            G_z = G_z.reshape(m.shape[0], N, L, H, d).transpose(2, 3)  # [v, N, H, L, d]
            G_Q, G_K, G_V = core_vjp(fwd.Q, fwd.K, fwd.V, fwd.A, G_z, module.attention, fwd.allowed)
            out.append(torch.cat([g.transpose(2, 3).reshape(m.shape[0], N, L, E) for g in (G_Q, G_K, G_V)], dim=-1))
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
        V_, N, L, E = mat.shape
        H, d = module.num_heads, module.head_dim
        dqkv = torch.einsum("vnli,oi->vnlo", mat, module.in_proj_weight.detach())
        dQ, dK, dV = (t.reshape(V_, N, L, H, d).transpose(2, 3) for t in dqkv.chunk(3, dim=-1))
        dO = core_jvp(fwd.Q, fwd.K, fwd.V, fwd.A, dQ, dK, dV, module.attention, fwd.allowed)
        dZ = dO.transpose(2, 3).reshape(V_, N, L, E)
        return torch.einsum("vnle,fe->vnlf", dZ, module.out_proj_weight.detach())

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


def attention_math_forward(module: MultiheadSelfAttention, x: Tensor, allowed: Optional[Tensor],
                           in_proj_weight: Tensor = None, in_proj_bias: Tensor = None) -> Tensor:
    """Explicit (twice differentiable, ``torch.func``-friendly) forward ``[*, L, E] -> [*, L, E]``.

    Used for the residual (second-derivative) terms of the DiagHessian extensions. Optional
    replacement in-projection parameters make it a function of them.
    """
    W = module.in_proj_weight if in_proj_weight is None else in_proj_weight
    b = module.in_proj_bias if in_proj_bias is None else in_proj_bias
    *lead, L, E = x.shape
    H, d = module.num_heads, module.head_dim
    qkv = F.linear(x, W, b)
    Q, K, V = (t.reshape(*lead, L, H, d).transpose(-2, -3) for t in qkv.chunk(3, dim=-1))
    A = attention_matrix(Q, K, allowed, module.attention)
    Z = (A @ V).transpose(-2, -3).reshape(*lead, L, E)
    return F.linear(Z, module.out_proj_weight, module.out_proj_bias)


# --------------------------------------------------------------------------------------
# LayerNorm
# --------------------------------------------------------------------------------------
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
        return tuple(range(-len(module.normalized_shape), 0))

    def normalized(self, module: nn.LayerNorm, subsampling=None) -> Tuple[Tensor, Tensor]:
        """``(x_hat, 1/sigma)`` with shapes ``[N, *]`` and ``[N, *, 1...]``."""
        x = subsample(module.input0, subsampling=subsampling).detach()
        dims = self._dims(module)
        mu = x.mean(dims, keepdim=True)
        inv_sigma = (x.var(dims, unbiased=False, keepdim=True) + module.eps).rsqrt()
        return (x - mu) * inv_sigma, inv_sigma

    def _project(self, module, g: Tensor, subsampling=None) -> Tensor:
        """Apply ``P`` to ``g [V, N, *]`` (``P`` acts on the normalized features)."""
        x_hat, inv_sigma = self.normalized(module, subsampling)
        dims = self._dims(module)
        return inv_sigma * (g - g.mean(dims, keepdim=True) - x_hat * (g * x_hat).mean(dims, keepdim=True))

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


def layer_norm_forward(module: nn.LayerNorm, x: Tensor) -> Tensor:
    """Explicit, twice-differentiable ``nn.LayerNorm`` forward."""
    return F.layer_norm(x, module.normalized_shape, module.weight, module.bias, module.eps)


# --------------------------------------------------------------------------------------
# GELU
# --------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------
# MSE on sequences
# --------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------
# Embedding
# --------------------------------------------------------------------------------------
class EmbeddingDerivatives(_BPEmbeddingDerivatives):
    """BackPACK's ``nn.Embedding`` derivatives, with the weight Jacobian in the weight's dtype.

    BackPACK 1.7.1 builds the one-hot indicator in ``float32`` and fails for ``float64`` models.
    """

    def _weight_jac_t_mat_prod(self, module, g_inp, g_out, mat, sum_batch=True, subsampling=None):
        """``[V, N, *, D] -> [V, (N,) K, D]``: scatter ``mat`` into the rows of the used tokens."""
        self._check_parameters(module)
        idx = subsample(module.input0, subsampling=subsampling)
        onehot = F.one_hot(idx, module.num_embeddings).to(mat.dtype)
        return torch.einsum(f"n...s,vn...h->v{'' if sum_batch else 'n'}sh", onehot, mat)
