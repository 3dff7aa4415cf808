r"""Exact Hessian diagonals (DiagHessian, BatchDiagHessian) for transformers.

BackPACK backpropagates the output Hessian as signed square-root factors
``H_out = sum_f sign_f M_f M_f^T`` (``M_f [V_f, N, *out]``). A module maps every factor to
``J^T M_f`` and appends factors of its own *residual*
``R_n = sum_k g_out[n, k] ∇²_x f_k(x_n)``; a parameter's diagonal is
``sum_f sign_f diag((J_θ^T M_f)(J_θ^T M_f)^T) + diag(sum_k g_out[k] ∇²_θ f_k)``.

Additions over BackPACK 1.7.1:

* **Dense residuals** (attention, LayerNorm): ``R_n`` is a dense ``[D, D]`` matrix per sample
  (``D`` = features of one sample, e.g. ``L·E``), computed with ``torch.func`` on explicit
  math and split by an eigendecomposition into ± factors with ``V = D`` columns each.
  Attention's parameter residual (non-zero for the query/key rows of ``in_proj_weight`` and
  ``in_proj_bias``) is the diagonal of a dense per-sample parameter Hessian.
  **Cost is cubic in ``D`` and quadratic in the in-projection size: for small models only.**
* **Branching** (residual connections, ``SumModule``): every factor carries an id. Where a
  tensor feeds several branches, factors with the same id (born above the branch point) are
  *added* (that sums the Jacobians over paths), factors born inside one branch are appended.
  BackPACK's own DiagHessian has no accumulation rule and refuses branches.
"""

from __future__ import annotations

import itertools
from typing import List

import torch
from backpack.core.derivatives.permute import PermuteDerivatives
from backpack.core.derivatives.scale_module import ScaleModuleDerivatives
from backpack.core.derivatives.sum_module import SumModuleDerivatives
from backpack.extensions.module_extension import ModuleExtension
from backpack.extensions.secondorder.diag_hessian.diag_h_base import DiagHBaseModule
from torch import Tensor
from torch.func import hessian, vmap

from backpack_attention.backpack_ext.base import ClearsAttentionCache
from backpack_attention.backpack_ext.derivatives import (
    EmbeddingDerivatives,
    GELUDerivatives,
    LayerNormDerivatives,
    MHSADerivatives,
    allowed_mask,
)
from backpack_attention.derivatives.forward import AttentionParams, attention_forward
from backpack_attention.derivatives.layernorm import layer_norm_explicit

_ids = itertools.count()


def new_id() -> int:
    """A fresh factor id."""
    return next(_ids)


def merge_factors(existing: dict, other: dict) -> dict:
    """Accumulation rule at a branch point: add factors with equal ids, append the others."""
    mats, signs, ids = list(existing["matrices"]), list(existing["signs"]), list(existing["ids"])
    where = {i: k for k, i in enumerate(ids)}
    for M, s, i in zip(other["matrices"], other["signs"], other["ids"]):
        if i in where:
            mats[where[i]] = mats[where[i]] + M
        else:
            where[i] = len(mats)
            mats.append(M)
            signs.append(s)
            ids.append(i)
    return {"matrices": mats, "signs": signs, "ids": ids}


class Tagged(ClearsAttentionCache, ModuleExtension):
    """Wrap a DiagHessian module extension so that its factors carry ids.

    The wrapped extension's parameter methods are used unchanged; its ``backpropagate`` gets a
    copy of the incoming lists (BackPACK's base appends to them in place) and must return the
    transformed incoming factors first, then its new ones.
    """

    def __init__(self, inner: ModuleExtension):
        self.inner = inner
        super().__init__(params=inner._ModuleExtension__params)

    def __getattr__(self, name):
        inner = self.__dict__.get("inner")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)

    def check_hyperparameters_module_extension(self, ext, module, g_inp, g_out):
        self.inner.check_hyperparameters_module_extension(ext, module, g_inp, g_out)

    def backpropagate(self, ext, module, g_inp, g_out, backproped):
        if backproped is None:
            ids, arg = [], None
        else:
            ids = list(backproped["ids"])
            arg = {"matrices": list(backproped["matrices"]), "signs": list(backproped["signs"])}
        out = self.inner.backpropagate(ext, module, g_inp, g_out, arg)
        n_new = len(out["matrices"]) - len(ids)
        return {"matrices": out["matrices"], "signs": out["signs"], "ids": ids + [new_id() for _ in range(n_new)]}


def signed_sqrt_factors(R: Tensor, in_shape) -> List[Tensor]:
    """± square-root factors of symmetric ``R [N, D, D]``: ``R_n = P_n P_n^T - Q_n Q_n^T``.

    Returns ``[P, Q]``, each ``[D, N, *in_shape]`` (column ``v`` = ``sqrt(|λ_v|) u_v``).
    """
    R = 0.5 * (R + R.transpose(-1, -2))
    lam, U = torch.linalg.eigh(R)
    out = []
    for sign in (1.0, -1.0):
        P = U * (sign * lam).clamp(min=0).sqrt().unsqueeze(-2)  # [N, D, D(v)]
        out.append(P.permute(2, 0, 1).reshape(R.shape[-1], R.shape[0], *in_shape))
    return out


def param_diag_from_factors(derivatives, name, module, backproped, sum_batch: bool) -> Tensor:
    """``sum_f sign_f sum_v (J_θ^T M_f)^2`` ``[(N,) *param]``."""
    total = 0
    for M, s in zip(backproped["matrices"], backproped["signs"]):
        total = total + s * (derivatives.param_mjp(name, module, None, None, M, sum_batch=False) ** 2).sum(0)
    return total.sum(0) if sum_batch else total


class DenseResidualDiagH(ModuleExtension):
    """DiagHessian for modules with a dense per-sample input residual (small models only).

    Subclasses define ``derivatives``, ``sample_forward(module, x_n, extra_n)`` for one sample
    (``extra`` = per-sample side inputs, e.g. masks) and ``extras(module)``.
    """

    def __init__(self, derivatives, params, sum_batch: bool):
        self.derivatives = derivatives
        self.sum_batch = sum_batch
        for p in params:
            if not hasattr(self, p):
                setattr(self, p, self._make_param_method(p))
        super().__init__(params=params)

    def _make_param_method(self, name):
        def method(ext, module, g_inp, g_out, backproped):
            return param_diag_from_factors(self.derivatives, name, module, backproped, self.sum_batch)

        return method

    def extras(self, module):
        """Per-sample side inputs ``(tensor with batch axis 0 or None, ...)``."""
        return ()

    def input_residual(self, module, g_out) -> Tensor:
        """``R [N, D, D]``: Hessian of ``<g_out[n], f(x_n)>`` w.r.t. ``x_n``."""
        x = module.input0.detach()
        N, shape = x.shape[0], x.shape[1:]
        g = g_out[0].detach()
        extras = self.extras(module)

        def phi(x_flat, g_n, *extra_n):
            return (g_n * self.sample_forward(module, x_flat.reshape(shape), *extra_n)).sum()

        in_dims = (0, 0) + tuple(None if e is None else 0 for e in extras)
        with torch.no_grad():
            return vmap(hessian(phi), in_dims=in_dims)(x.reshape(N, -1), g, *extras)

    def backpropagate(self, ext, module, g_inp, g_out, backproped):
        mats = [self.derivatives.jac_t_mat_prod(module, g_inp, g_out, M) for M in backproped["matrices"]]
        signs = list(backproped["signs"])
        P, Q = signed_sqrt_factors(self.input_residual(module, g_out), module.input0.shape[1:])
        return {"matrices": mats + [P, Q], "signs": signs + [1.0, -1.0]}


class DiagHMHSA(DenseResidualDiagH):
    """DiagHessian / BatchDiagHessian for attention, including all residual terms.

    Input residual: dense ``[L·E, L·E]`` per sample. Parameter residual: non-zero only for the
    query/key rows of ``in_proj_weight`` and ``in_proj_bias`` (the output is linear in the
    value rows and in the out-projection), computed as the diagonal of a dense per-sample
    Hessian over ``in_proj_weight`` (``[3E·E]^2``). Small models only.
    """

    def __init__(self, sum_batch: bool = True):
        super().__init__(MHSADerivatives(), MHSADerivatives.PARAMS, sum_batch)

    def extras(self, module):
        allowed = allowed_mask(module, module.input0)
        if allowed is None:
            return (None,)
        return (allowed.expand(module.input0.shape[0], -1, -1, -1),)

    @staticmethod
    def sample_forward(module, x_n, allowed_n=None, W=None, b=None):
        """The layer on one sample, explicit core (twice differentiable by ``torch.func``);
        ``W``, ``b`` replace the in-projection's weight and bias when given."""
        p = AttentionParams.of(module)
        p = p._replace(in_proj_weight=p.in_proj_weight if W is None else W,
                       in_proj_bias=p.in_proj_bias if b is None else b)
        return attention_forward(module, x_n, allowed_n, params=p, explicit=True)

    def _param_residual(self, module, g_out, which: str) -> Tensor:
        """``[N, *param]`` diagonal of ``∇²_θ <g_out[n], f(x_n; θ)>`` for ``θ`` = ``which``."""
        x = module.input0.detach()
        g = g_out[0].detach()
        (allowed,) = self.extras(module)
        W0 = module.in_proj_weight.detach()
        b0 = None if module.in_proj_bias is None else module.in_proj_bias.detach()
        theta0 = W0 if which == "in_proj_weight" else b0

        def psi(theta, x_n, g_n, allowed_n):
            W, b = (theta, b0) if which == "in_proj_weight" else (W0, theta)
            return (g_n * self.sample_forward(module, x_n, allowed_n, W, b)).sum()

        def diag(x_n, g_n, allowed_n):
            flat = lambda t: psi(t.reshape(theta0.shape), x_n, g_n, allowed_n)
            Hn = hessian(flat)(theta0.reshape(-1))
            return Hn.diagonal().reshape(theta0.shape)

        with torch.no_grad():
            return vmap(diag, in_dims=(0, 0, None if allowed is None else 0))(x, g, allowed)

    def _with_residual(self, name, ext, module, g_inp, g_out, backproped):
        diag = param_diag_from_factors(self.derivatives, name, module, backproped, self.sum_batch)
        res = self._param_residual(module, g_out, name)
        return diag + (res.sum(0) if self.sum_batch else res)

    def in_proj_weight(self, ext, module, g_inp, g_out, backproped):
        return self._with_residual("in_proj_weight", ext, module, g_inp, g_out, backproped)

    def in_proj_bias(self, ext, module, g_inp, g_out, backproped):
        return self._with_residual("in_proj_bias", ext, module, g_inp, g_out, backproped)


class DiagHLayerNorm(DenseResidualDiagH):
    """DiagHessian for ``nn.LayerNorm`` (dense residual over each sample's features)."""

    def __init__(self, sum_batch: bool = True):
        super().__init__(LayerNormDerivatives(), ["weight", "bias"], sum_batch)

    @staticmethod
    def sample_forward(module, x_n):
        d = lambda p: None if p is None else p.detach()  # noqa: E731
        return layer_norm_explicit(x_n, module.normalized_shape, d(module.weight), d(module.bias), module.eps)


class DiagHEmbedding(ModuleExtension):
    """DiagHessian for ``nn.Embedding`` (linear in its weight; the input is discrete)."""

    def __init__(self, sum_batch: bool = True):
        self.derivatives = EmbeddingDerivatives()
        self.sum_batch = sum_batch
        super().__init__(params=["weight"])

    def weight(self, ext, module, g_inp, g_out, backproped):
        return param_diag_from_factors(self.derivatives, "weight", module, backproped, self.sum_batch)


class _ZeroResidual:
    """Derivatives mixin for linear, parameter-free modules."""

    def hessian_is_zero(self, module) -> bool:
        return True


class _SumDerivatives(_ZeroResidual, SumModuleDerivatives):
    pass


class _ScaleDerivatives(_ZeroResidual, ScaleModuleDerivatives):
    pass


class _PermuteDerivatives(_ZeroResidual, PermuteDerivatives):
    pass


class DiagHSumModule(DiagHBaseModule):
    def __init__(self):
        super().__init__(_SumDerivatives())


class DiagHScaleModule(DiagHBaseModule):
    """``ScaleModule`` and ``nn.Identity``."""

    def __init__(self):
        super().__init__(_ScaleDerivatives())


class DiagHPermute(DiagHBaseModule):
    def __init__(self):
        super().__init__(_PermuteDerivatives())


class DiagHGELU(DiagHBaseModule):
    def __init__(self):
        super().__init__(GELUDerivatives())
