r"""Kronecker factors: weight sharing (expand / reduce) and the attention-aware recipe.

**Weight sharing.** For a layer applied to ``[N, *R, D]`` inputs (``R`` shared positions, e.g. the
sequence) the two standard generalisations of KFAC (Eschenhagen et al., 2023; curvlinops'
``KFACType``) are

* ``"expand"``: positions are extra samples, ``A = sum_{n,r} x x^T / (N |R|)``,
  ``G = sum_{v,n,r} s s^T``;
* ``"reduce"``: ``A = sum_n xbar xbar^T / N`` with ``xbar`` the mean over positions,
  ``G = sum_{v,n} sbar sbar^T`` with ``sbar`` the *sum* over positions,

where ``s`` are the rows of a backpropagated square-root factor of the loss Hessian (exact for
KFLR, Monte-Carlo for KFAC). The BackPACK extensions (:mod:`backpack_attention.backpack_ext.kfac`)
use :func:`gradient_factor` / :func:`input_factor`.

**Attention-aware factors** (docs/math.md 7.3, docs/kfac.md). Per query token :math:`i` the
Jacobian of the attention output with respect to each parameter group is one Kronecker product
(docs/math.md 5.2) of an output-side vector (torch rows) and an input-side vector (columns), for
each column :math:`\mathbf s` of the square root of the output curvature
(:math:`\boldsymbol\Lambda_i=\sum_v\mathbf s_{v,i}\mathbf s_{v,i}^\top`):

* ``Q`` (all heads): :math:`\mathbf g_{q,i}=\mathbf B_i^\top\mathbf s_i/\sqrt{d_K}` (the query
  cotangent) and :math:`\tilde{\mathbf x}_i`;
* ``K`` (per head, roles swapped): :math:`\tilde{\mathbf q}_i` and
  :math:`\mathbf u_i=\tilde{\mathbf X}^\top\mathbf g_{T,i}=\mathbf C_i^\top\mathbf s_i/\sqrt{d_K}`,
  :math:`\mathbf g_{T,i}` row :math:`i` of the score cotangent
  :math:`\mathbf G_T=\mathbf J(\mathbf G_O\mathbf V^\top)/\sqrt{d_K}`;
* ``V`` (per head): :math:`\mathbf W_O^h\mathbf s_i` (head-output cotangent :math:`\mathbf G_O`) and
  :math:`\boldsymbol\mu_i=(\mathbf A\tilde{\mathbf X})_i`;
* ``O`` (all heads): :math:`\mathbf s_i` and :math:`\tilde{\mathbf z}_i`.

Each per-token vector depends on the column at token :math:`i` only (row :math:`i` of the scores
feeds only output :math:`i`): sums of exact per-token Kronecker terms, no cross-token terms. The
side that depends on the column is the **loss side** (summed over columns, tokens and data, times
the loss scale); the other is the **data side**, averaged over tokens and data weighted by each
token's loss-side trace (*trace weighting*, :func:`token_weights`: exact when either side is
token-independent, e.g. V under MSE; docs/kfac.md). The generic recipes (``"expand"``/``"reduce"``)
instead give ``K`` and ``V`` the raw tokens :math:`\tilde{\mathbf x}_j` as inputs and the per-key
cotangents :math:`\mathbf G_T^\top\mathbf Q`, :math:`\mathbf A^\top\mathbf G_O` (curvlinops'
``KFACLinearOperator`` on the ``nn.Linear`` twin), with unweighted means.

A group's sides are ``[..., N, *R, k]`` tensors; :func:`data_covariance`, :func:`loss_covariance`
and :func:`eigencorrection` reduce them to Kronecker factors and to EKFAC's eigenvalue corrections.
"""

from __future__ import annotations

import math
from math import sqrt
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from backpack_attention.derivatives.core import chunked
from backpack_attention.derivatives.forward import ForwardQuantities
from backpack_attention.layout import augment

#: The weight-sharing approximations (BackPACK's KFAC/KFLR extensions).
KFAC_APPROXIMATIONS = ("expand", "reduce")

#: The approximations of :class:`~backpack_attention.AttentionKFACLinearOperator`.
OPERATOR_KFAC_APPROXIMATIONS = ("attention", "attention-reduce", "expand", "reduce")


def attention_recipe(approx: str) -> bool:
    """Whether ``approx`` uses the attention-aware factors (``"attention"``, ``"attention-reduce"``)."""
    return approx.startswith("attention")


def weight_sharing(approx: str) -> str:
    """The weight sharing of ``approx``: ``"reduce"`` (``"reduce"``, ``"attention-reduce"``: positions
    summed into one gradient per sequence, for models that pool over positions) or ``"expand"``."""
    return "reduce" if approx.endswith("reduce") else "expand"

#: The Fisher/GGN flavours (curvlinops' names).
FISHER_TYPES = ("type-2", "mc", "empirical")

#: Losses whose Hessian square roots and samples are implemented (as curvlinops' KFAC).
KFAC_LOSSES = (nn.MSELoss, nn.CrossEntropyLoss, nn.BCEWithLogitsLoss)


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


# ---------------------------------------------------------------------------------------------
# loss side: output layout, loss-Hessian square roots, samples (curvlinops' conventions)
# ---------------------------------------------------------------------------------------------
def flatten_output(loss_func, output: Tensor, y: Tensor) -> Tuple[Tensor, Tensor]:
    """``(output [B, C], y)`` with every loss term a row, as curvlinops' KFAC flattens them.

    Cross-entropy: classes on dim 1 (``[N, C, *R] -> [(N R), C]``); MSE/BCE: classes last.
    """
    if isinstance(loss_func, nn.CrossEntropyLoss):
        out = output.movedim(1, -1).reshape(-1, output.shape[1])
        return out, y.reshape(-1) if y.dim() == output.dim() - 1 else y.movedim(1, -1).reshape(-1, y.shape[1])
    return output.reshape(-1, output.shape[-1]), y.reshape(-1, y.shape[-1])


def num_loss_terms(loss_func, y: Tensor) -> int:
    """Number of loss terms in one batch (curvlinops: ``y.numel()`` for CE, else ``y.shape[:-1].numel()``)."""
    return y.numel() if isinstance(loss_func, nn.CrossEntropyLoss) else y.shape[:-1].numel()


def loss_hessian_sqrt(loss_func, out: Tensor) -> Tensor:
    r"""Square roots :math:`\mathbf S_b` ``[B, C, C]`` of each row's loss Hessian,
    :math:`\nabla^2_{\mathbf f_b}\ell_b=\mathbf S_b\mathbf S_b^\top`, without the ``1/B`` of a mean.

    MSE: :math:`\sqrt{2c}\,\mathbf I`; cross-entropy:
    :math:`\mathrm{diag}(\sqrt{\mathbf p})-\mathbf p\sqrt{\mathbf p}^\top`; BCE:
    :math:`\sqrt c\,\mathrm{diag}(\sqrt{\sigma(1-\sigma)})`, with :math:`c=1/C` for MSE/BCE under
    ``reduction="mean"`` (they also average over the output dimension) and 1 otherwise.
    """
    B, C = out.shape
    c = 1.0 / C if loss_func.reduction == "mean" else 1.0
    if isinstance(loss_func, nn.MSELoss):
        return sqrt(2.0 * c) * torch.eye(C, dtype=out.dtype, device=out.device).expand(B, C, C)
    if isinstance(loss_func, nn.CrossEntropyLoss):
        p = out.softmax(dim=1)
        ps = p.sqrt()
        return torch.diag_embed(ps) - p[:, :, None] * ps[:, None, :]
    if isinstance(loss_func, nn.BCEWithLogitsLoss):
        p = out.sigmoid()
        return sqrt(c) * torch.diag_embed((p * (1 - p)).sqrt())
    raise NotImplementedError(f"loss {type(loss_func).__name__}")


def draw_labels(loss_func, out: Tensor, generator: torch.Generator) -> Tensor:
    """A sample from the model's predictive distribution for 2-D outputs (curvlinops' ``draw_label``)."""
    if isinstance(loss_func, nn.MSELoss):
        noise = torch.randn(out.shape, device=out.device, dtype=out.dtype, generator=generator)
        return out.detach() + sqrt(0.5) * noise
    if isinstance(loss_func, nn.CrossEntropyLoss):
        return out.detach().softmax(dim=1).multinomial(num_samples=1, generator=generator).squeeze(-1)
    if isinstance(loss_func, nn.BCEWithLogitsLoss):
        return out.detach().sigmoid().bernoulli(generator=generator)
    raise NotImplementedError(f"loss {type(loss_func).__name__}")


def output_columns(loss_func, out: Tensor, y: Tensor, fisher_type: str, mc_samples: int,
                   generator: Optional[torch.Generator]) -> Tensor:
    r"""Cotangents ``[V, B, C]`` of the flattened output whose backpropagation gives KFAC's columns.

    ``type-2``: the ``C`` columns of the per-row loss-Hessian square roots (``/B`` for a mean);
    ``mc``: gradients of the loss at ``mc_samples`` sampled labels; ``empirical``: the gradient of
    the loss. Exactly curvlinops' ``KFACLinearOperator`` (including its ``sqrt(C)`` rescaling of
    MSE/BCE means); :func:`loss_scale` gives the matching weight of the covariances.
    """
    out = out.detach()
    B = out.shape[0]
    mean = loss_func.reduction == "mean"
    if fisher_type == "type-2":
        S = loss_hessian_sqrt(loss_func, out)
        if mean:
            S = S / B
        return S.permute(2, 0, 1)
    if fisher_type == "mc":
        labels = [draw_labels(loss_func, out, generator) for _ in range(mc_samples)]
    elif fisher_type == "empirical":
        labels = [y]
    else:
        raise ValueError(f"fisher_type must be one of {FISHER_TYPES}, got {fisher_type!r}")
    adjust = sqrt(out.shape[1]) if mean and isinstance(loss_func, (nn.MSELoss, nn.BCEWithLogitsLoss)) else 1.0
    cols = []
    for lab in labels:
        with torch.enable_grad():
            o = out.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(loss_func(o, lab) * adjust, o)
        cols.append(g)
    return torch.stack(cols)


def loss_scale(loss_func, batch_terms: int, num_data: int, terms_per_example: int, mc_samples: int) -> float:
    """Weight of one batch's loss-side covariances (curvlinops' ``correction``): ``B^2/(N T M)``
    for a mean over ``B = batch_terms`` terms (``N`` data, ``T`` terms each, ``M`` MC samples), ``1/M`` for a sum."""
    if loss_func.reduction == "sum":
        return 1.0 / mc_samples
    return batch_terms ** 2 / (num_data * mc_samples * terms_per_example)


# ---------------------------------------------------------------------------------------------
# per-group sides of one attention layer
# ---------------------------------------------------------------------------------------------
#: Which side of each group depends on the backpropagated column (``"out"``: torch rows).
LOSS_SIDE_ATTENTION = {"Q": "out", "K": "in", "V": "out", "O": "out"}
LOSS_SIDE_GENERIC = {"Q": "out", "K": "out", "V": "out", "O": "out"}


def loss_side(group: str, approx: str) -> str:
    """``"out"`` or ``"in"``: the side of ``group`` that carries the loss (see the module docstring)."""
    return (LOSS_SIDE_ATTENTION if attention_recipe(approx) else LOSS_SIDE_GENERIC)[group]


class AttentionKFACTerms:
    r"""Per-token sides of one attention layer's Kronecker groups for one batch (one call of the layer).

    ``layer``: a :class:`~backpack_attention.MultiheadSelfAttention`; ``x [N, L, E]`` its input and
    ``allowed`` its mask (:meth:`~backpack_attention.MultiheadSelfAttention.allowed_mask`).
    Groups are keyed ``(name, head)``: ``("Q", None)``, ``("O", None)`` and, for ``"attention"``,
    ``("K", h)``, ``("V", h)`` per head, else ``("K", None)``, ``("V", None)`` (all heads, the
    ``nn.Linear`` twin's projections). Every side has the bias column (a ones column for inputs)
    when the layer has biases.
    """

    def __init__(self, layer, x: Tensor, allowed: Optional[Tensor], approx: str,
                 fq: Optional[ForwardQuantities] = None):
        self.layer, self.approx = layer, approx
        self.layout = layer.layout
        self.fq = ForwardQuantities(layer, x, allowed) if fq is None else fq
        bias = self.layout.bias
        self.X = augment(x.detach(), bias)  # [N, L, d']
        self.W_out = layer.out_proj_weight.detach()
        H = self.layout.num_heads
        fq = self.fq
        data = {("Q", None): ("in", self.X), ("O", None): ("in", augment(fq.Z, bias))}
        if attention_recipe(approx):
            M1 = fq.A @ self.X[:, None]  # [N, H, L, d']: mu_i per head
            for h in range(H):
                data[("K", h)] = ("out", fq.Q[:, h])  # queries with biases, [N, L, d_K]
                data[("V", h)] = ("in", M1[:, h])
        else:
            data[("K", None)] = ("in", self.X)
            data[("V", None)] = ("in", self.X)
        self.data = data

    def groups(self):
        return list(self.data)

    def loss_sides(self, s: Tensor) -> Dict[tuple, Tensor]:
        """Loss sides ``[*V, N, L, k]`` of every group for output cotangents ``s [*V, N, L, E]`` (columns)."""
        fq, lay = self.fq, self.layout
        variant = self.layer.variant
        scale = 1.0 / math.sqrt(lay.head_dim)
        s = s.detach()
        dO = lay.split_heads(s @ self.W_out)  # head-output cotangents [N, H, L, d]
        attention = attention_recipe(self.approx)
        X = self.X[:, None]  # [N, 1, L, d']

        def f(A, Q, K, V, dO, X, allowed):
            G_T = variant.jvp(A, dO @ V.transpose(-1, -2), allowed) * scale  # score cotangent
            out = [G_T @ K]  # d loss / d Q
            if attention:
                out.append(G_T @ X)  # u_i = X^T g_{T,i}
            else:
                out += [G_T.transpose(-1, -2) @ Q, A.transpose(-1, -2) @ dO]  # d/dK, d/dV
            return tuple(out)

        res = chunked(f, fq.A, fq.Q, fq.K, fq.V, dO, X, fq.allowed, L=fq.A.shape[-1])
        sides = {("Q", None): lay.merge_heads(res[0]), ("O", None): s}
        if attention:
            u = res[1]
            if lay.bias and variant.name == "softmax":
                # softmax is shift invariant: u's bias entry (a row sum of G_T) is exactly 0
                u = torch.cat([u[..., :-1], torch.zeros_like(u[..., -1:])], -1)
            for h in range(lay.num_heads):
                sides[("K", h)] = u[..., h, :, :]
                sides[("V", h)] = dO[..., h, :, :]
        else:
            sides[("K", None)] = lay.merge_heads(res[1])
            sides[("V", None)] = lay.merge_heads(res[2])
        return sides

    def sides(self, s: Tensor) -> Dict[tuple, Tuple[Tensor, Tensor]]:
        """``{group: (out_side, in_side)}`` for one column ``s``."""
        loss = self.loss_sides(s)
        out = {}
        for g, (where, d) in self.data.items():
            out[g] = (loss[g], d) if where == "in" else (d, loss[g])
        return out

    def factors(self, S: Tensor) -> Dict[tuple, Tuple[Tensor, Tensor]]:
        r"""``{group: (out_factor, in_factor)}`` of one batch from square-root columns ``S [V, N, L, E]``
        at the layer output (columns already scaled: the loss side is their plain sum).

        ``"attention"``: loss side :math:`\sum_{v,n,i}`, data side the trace-weighted mean
        (:func:`data_covariance` with :func:`token_weights`); ``"attention-reduce"``, ``"expand"``,
        ``"reduce"``: the loss side as :func:`loss_covariance` and the data side divided by ``N``.
        """
        loss = self.loss_sides(S)
        approx = weight_sharing(self.approx)
        out = {}
        for g, (where, d) in self.data.items():
            side = loss[g]
            lc = sum(loss_covariance(sv, approx) for sv in side)
            if self.approx == "attention":
                w = token_weights(side.reshape(-1, *side.shape[-2:])).reshape(side.shape[0], -1).sum(0)
                w = w.reshape(d.shape[0], -1)
                total = w.sum()
                dc = data_covariance(d, approx, w) / total if total > 0 else data_covariance(d, approx) / d.shape[0]
            else:
                dc = data_covariance(d, approx) / d.shape[0]
            out[g] = (dc, lc) if where == "out" else (lc, dc)
        return out


class LinearKFACTerms:
    """The one group ``("linear", None)`` of an ``nn.Linear`` on inputs ``x [N, *R, D]``: data side
    the input (with a ones column when the layer has a bias), loss side the output cotangent."""

    def __init__(self, module: nn.Module, x: Tensor):
        self.data = {("linear", None): ("in", augment(x.detach(), module.bias is not None))}

    def groups(self):
        return list(self.data)

    def loss_sides(self, s: Tensor) -> Dict[tuple, Tensor]:
        return {("linear", None): s.detach()}

    def sides(self, s: Tensor) -> Dict[tuple, Tuple[Tensor, Tensor]]:
        return {("linear", None): (s.detach(), self.data[("linear", None)][1])}


# ---------------------------------------------------------------------------------------------
# reductions: covariances (KFAC) and eigenvalue corrections (EKFAC)
# ---------------------------------------------------------------------------------------------
def _positions(t: Tensor) -> Tensor:
    """``[N, *R, k] -> [N, R, k]`` (``R = 1`` for 2-D inputs)."""
    return t.reshape(t.shape[0], -1, t.shape[-1])


def token_weights(side: Tensor) -> Tensor:
    r"""``[N, R]``: the squared norm of a loss side at every position (summed over columns by the
    caller, this is :math:`\mathrm{tr}` of the token's loss-side factor)."""
    return _positions(side.detach()).square().sum(-1)


def data_covariance(t: Tensor, approx: str, weights: Optional[Tensor] = None) -> Tensor:
    """Sum over the batch of a data side's second moment: ``sum_{n,r} t t^T / R`` (expand,
    attention) or ``sum_n tbar tbar^T`` (reduce, ``tbar`` the mean over positions); divide by the
    number of data points afterwards. With ``weights [N, R]``: ``sum_{n,r} w t t^T`` (divide by
    the sum of the weights afterwards: the trace-weighted mean of the attention recipe)."""
    t = _positions(t.detach())
    if weights is not None:
        t = t.reshape(-1, t.shape[-1])
        return (t * weights.reshape(-1, 1)).T @ t
    if approx == "reduce":
        t = t.mean(1)
        return t.T @ t
    R = t.shape[1]
    t = t.reshape(-1, t.shape[-1])
    return t.T @ t / R


def loss_covariance(t: Tensor, approx: str) -> Tensor:
    """``sum_{n,r} t t^T`` (expand, attention) or ``sum_n tsum tsum^T`` (reduce, ``tsum`` the sum
    over positions) of a loss side; multiply by :func:`loss_scale` afterwards."""
    t = _positions(t.detach())
    if approx == "reduce":
        t = t.sum(1)
    else:
        t = t.reshape(-1, t.shape[-1])
    return t.T @ t


def eigencorrection(out: Tensor, inp: Tensor, Q_out: Tensor, Q_in: Tensor, per_token: bool) -> Tensor:
    r"""EKFAC's corrected eigenvalues ``[p, q]`` of one group (before the loss scale).

    In the Kronecker eigenbasis :math:`\mathbf Q_{out}\otimes\mathbf Q_{in}`, the second moment of
    the gradients on the diagonal (George et al., 2018). ``per_token``: each position's gradient
    :math:`\mathbf o_r\mathbf i_r^\top` is one sample (exact per-token square roots: the diagonal
    of the exact GGN in that basis when tokens' losses are separable), else the per-sequence
    gradient :math:`\sum_r\mathbf o_r\mathbf i_r^\top` (curvlinops' ``EKFACLinearOperator``).
    ``out [N, *R, p]``, ``inp [N, *R, q]``.
    """
    return eigencorrection_rotated(rotate(out, Q_out), rotate(inp, Q_in), per_token)


def rotate(side: Tensor, Q: Tensor) -> Tensor:
    """A side ``[N, *R, k]`` in the eigenbasis ``Q [k, k]``: ``[N, R, k]``."""
    return _positions(side.detach()) @ Q


def eigencorrection_rotated(o: Tensor, i: Tensor, per_token: bool) -> Tensor:
    """:func:`eigencorrection` from rotated sides ``o [N, R, p]``, ``i [N, R, q]``."""
    if per_token:
        return o.square().reshape(-1, o.shape[-1]).T @ i.square().reshape(-1, i.shape[-1])
    return (o.transpose(1, 2) @ i).square().sum(0)


def best_kronecker(M: Tensor, p: int, q: int) -> Tuple[Tensor, Tensor]:
    r"""The best single Kronecker product :math:`\mathbf B\otimes\mathbf C` (Frobenius norm) to a
    ``[p q, p q]`` matrix (Van Loan & Pitsianis, 1993): the top singular pair of the rearrangement
    :math:`\mathcal R(\mathbf M)[(a,b),(c,d)] = \mathbf M[(a,c),(b,d)]`. Returns ``(B [p, p], C [q, q])``."""
    R = M.reshape(p, q, p, q).permute(0, 2, 1, 3).reshape(p * p, q * q)
    U, S, Vh = torch.linalg.svd(R, full_matrices=False)
    return (U[:, 0] * S[0]).reshape(p, p), Vh[0].reshape(q, q)
