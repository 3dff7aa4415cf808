r"""Kronecker factors of layers applied at every position of a sequence (weight sharing).

For a layer applied to ``[N, *R, D]`` inputs (``R`` shared positions, e.g. the sequence) the two
standard generalisations of KFAC (Eschenhagen et al., 2023; curvlinops' ``KFACType``) are

* ``"expand"``: positions are extra samples, ``A = sum_{n,r} x x^T / (N |R|)``,
  ``G = sum_{v,n,r} s s^T``;
* ``"reduce"``: ``A = sum_n xbar xbar^T / N`` with ``xbar`` the mean over positions,
  ``G = sum_{v,n} sbar sbar^T`` with ``sbar`` the *sum* over positions,

where ``s`` are the rows of a backpropagated square-root factor of the loss Hessian (exact for
KFLR, Monte-Carlo for KFAC). The BackPACK extensions (:mod:`backpack_attention.backpack_ext.kfac`)
and the curvature operators share these functions.
"""

from __future__ import annotations

from torch import Tensor

#: The weight-sharing approximations.
KFAC_APPROXIMATIONS = ("expand", "reduce")


def gradient_factor(S: Tensor, approx: str) -> Tensor:
    """``G [o, o]`` from square-root rows ``S [V, N, *R, o]``."""
    if approx == "reduce" and S.dim() > 3:
        S = S.sum(tuple(range(2, S.dim() - 1)))
    S = S.reshape(-1, S.shape[-1])
    return S.T @ S


def input_factor(x: Tensor, approx: str) -> Tensor:
    """``A [i, i]`` from layer inputs ``x [N, *R, i]``."""
    x = x.detach()
    if approx == "reduce" and x.dim() > 2:
        x = x.mean(tuple(range(1, x.dim() - 1)))
    x = x.reshape(-1, x.shape[-1])
    return x.T @ x / x.shape[0]
