r"""Per-token factors of one attention layer's Hessian (SPEC §4–5): data, weights, moments, loss.

For one :class:`~backpack_attention.MultiheadSelfAttention` inside any network,
:func:`attention_factors` collects

* **data**: :math:`\tilde{\mathbf X} = [\mathbf X, \mathbf 1]` (the ones column only with biases);
* **weights** (per head, augmented with bias rows): :math:`\tilde{\mathbf W}_Q,\tilde{\mathbf W}_K,
  \tilde{\mathbf W}_V`, :math:`\mathbf W_O^h` and the OV circuit :math:`\mathbf U^h=\tilde{\mathbf W}_V^h\mathbf W_O^h`;
* **moments** (per head and sequence): :math:`\mathbf A`, :math:`\mathbf M_1` (rows :math:`\boldsymbol\mu_i`),
  :math:`\boldsymbol\Sigma_i=\tilde{\mathbf X}^\top\mathbf J_i\tilde{\mathbf X}` and
  :math:`\boldsymbol\kappa_i[\mathbf g_i]` with :math:`\mathbf g_i=\mathbf U^h\mathbf r_i`
  (:math:`\boldsymbol\kappa_i` itself is never formed);
* **loss**: :math:`\mathbf r_i=\partial\ell/\partial\mathbf F_i` and the output curvature
  :math:`\boldsymbol\Lambda` — per token (``[N, L, E, E]``) when the layer output is the model
  output under MSE, else dense per sequence (``[N, L, E, L, E]``, GGN-propagated through the network
  above), plus the exact output Hessian ``Lambda_exact`` for the full Hessian of a deep network.

Batches are concatenated along ``N`` with the loss terms weighted as curvlinops does.
The network above the layer must treat sequences independently (no batch-coupling layers).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn
from torch.func import grad, jacrev, jvp, vmap
from tqdm.auto import tqdm

from backpack_attention.derivatives.core import LINEAR, attention_matrix
from backpack_attention.derivatives.loss import batch_weight, check_loss, loss_hessian_mp
from backpack_attention.module import as_attention, call_arguments


@dataclass
class DataTerms:
    """``X``: :math:`\\tilde{\\mathbf X}` ``[N, L, d']`` (``d' = E + 1`` with biases, else ``E``)."""

    X: Tensor
    has_bias: bool

    @property
    def gram(self) -> Tensor:
        r""":math:`\sum_{n,i}\tilde{\mathbf x}_i\tilde{\mathbf x}_i^\top` ``[d', d']``."""
        return torch.einsum("nla,nlb->ab", self.X, self.X)


@dataclass
class WeightTerms:
    """Per-head weights in the paper's (input x output) layout, bias rows appended.

    ``W_Q, W_K`` ``[H, d', d_K]``, ``W_V`` ``[H, d', d_h]``, ``W_O`` ``[H, d_h, E]``, ``b_O`` ``[E]`` or
    ``None``, ``U = W_V W_O`` ``[H, d', E]``.
    """

    W_Q: Tensor
    W_K: Tensor
    W_V: Tensor
    W_O: Tensor
    b_O: Optional[Tensor]
    U: Tensor


@dataclass
class MomentTerms:
    r"""Attention moments per sequence ``n``, head ``h`` and query token ``i``.

    ``A`` ``[N, H, L, L]``; ``M1`` ``[N, H, L, d']`` (:math:`\boldsymbol\mu_i`); ``Sigma``
    ``[N, H, L, d', d']`` (:math:`\tilde{\mathbf X}^\top\mathbf J_i\tilde{\mathbf X}`: the attention
    covariance for softmax, the masked Gram matrix for linear attention); ``kappa_g``
    ``[N, H, L, d', d']`` (:math:`\boldsymbol\kappa_i[\mathbf g_i]`, zero for linear attention);
    ``q`` ``[N, H, L, d_K]`` (unscaled queries) and ``z`` ``[N, H, L, d_h]`` (head outputs).
    """

    A: Tensor
    M1: Tensor
    Sigma: Tensor
    kappa_g: Tensor
    q: Tensor
    z: Tensor


@dataclass
class LossTerms:
    r"""Loss-side terms at the layer output, batch weights included.

    ``r`` ``[N, L, E]``; ``Lambda``: ``[N, L, E, E]`` if ``separable`` else ``[N, L, E, L, E]``
    (GGN-propagated); ``Lambda_exact``: the exact output Hessian (same layout), or ``None`` when it
    equals ``Lambda`` (the layer output is the model output).
    """

    r: Tensor
    Lambda: Tensor
    separable: bool
    Lambda_exact: Optional[Tensor] = None

    @property
    def Lambda_full(self) -> Tensor:
        return self.Lambda if self.Lambda_exact is None else self.Lambda_exact


@dataclass
class AttentionFactors:
    """Everything the closed-form blocks are assembled from (see module docstring)."""

    module: nn.Module
    data: DataTerms
    weights: WeightTerms
    moments: MomentTerms
    loss: LossTerms
    num_heads: int
    head_dim: int
    attention: str
    info: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
def split_weights(m) -> WeightTerms:
    """Per-head augmented weights of a :class:`MultiheadSelfAttention` (SPEC §5.3 index map)."""
    E, H, d = m.embed_dim, m.num_heads, m.head_dim
    W = m.in_proj_weight.detach().view(3, H, d, E).transpose(-1, -2)  # [3, H, E, d]
    if m.bias:
        b = m.in_proj_bias.detach().view(3, H, 1, d)
        W = torch.cat([W, b], dim=2)  # [3, H, E+1, d]
    W_O = m.out_proj_weight.detach().T.reshape(H, d, E)
    U = W[2] @ W_O
    b_O = m.out_proj_bias.detach() if m.bias else None
    return WeightTerms(W[0], W[1], W[2], W_O, b_O, U)


def augment(x: Tensor, has_bias: bool) -> Tensor:
    """``[N, L, E] -> [N, L, E+1]`` (ones column) when ``has_bias``."""
    return torch.cat([x, torch.ones_like(x[..., :1])], dim=-1) if has_bias else x


def layer_moments(X: Tensor, w: WeightTerms, allowed, kind: str, r: Tensor) -> MomentTerms:
    """Moments of one layer from augmented inputs ``X`` ``[N, L, d']`` and output gradient ``r``."""
    q = torch.einsum("nla,hac->nhlc", X, w.W_Q)
    k = torch.einsum("nla,hac->nhlc", X, w.W_K)
    A = attention_matrix(q, k, allowed, kind)
    M1 = A @ X[:, None]
    z = torch.einsum("nhla,hac->nhlc", M1, w.W_V)
    if kind == LINEAR:
        mask = torch.ones_like(A) if allowed is None else allowed.to(A.dtype).expand_as(A)
        Sigma = torch.einsum("nhik,nka,nkb->nhiab", mask, X, X)
        kappa_g = torch.zeros_like(Sigma)
    else:
        AX = A[..., None] * X[:, None, None, :, :]  # [N, H, L(i), L(k), d']
        Sigma = AX.transpose(-1, -2) @ X[:, None, None] - M1[..., :, None] * M1[..., None, :]
        g = torch.einsum("hae,nle->nhla", w.U, r)
        Xc = X[:, None, None, :, :] - M1[:, :, :, None, :]  # [N, H, L(i), L(k), d']
        weight = A * torch.einsum("nhika,nhia->nhik", Xc, g)
        kappa_g = (weight[..., None] * Xc).transpose(-1, -2) @ Xc  # sum_k w_ik (x_k - mu_i)(x_k - mu_i)^T
    return MomentTerms(A, M1, Sigma, kappa_g, q, z)


# ---------------------------------------------------------------------------------------------
def _as_batches(data):
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor):
        return [tuple(data)]
    try:
        batches = list(data)
    except TypeError as err:
        raise TypeError("data must be an iterable of (X, y) batches or one (X, y) tuple") from err
    if not batches:
        raise ValueError("data is empty: pass at least one (X, y) batch")
    for b in batches:
        if not (isinstance(b, (tuple, list)) and len(b) == 2):
            raise TypeError("data must be an iterable of (X, y) batches or one (X, y) tuple")
    return batches


class _LayerProbe:
    """Forward hook that records one module's inputs/output, or substitutes its output."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.calls = []
        self.replacement = None

    def __call__(self, module, args, kwargs, output):
        self.calls.append((call_arguments(args, kwargs), output))
        return self.replacement if self.replacement is not None else output

    def run(self, model_func, X, replacement=None):
        self.calls, self.replacement = [], replacement
        handle = self.module.register_forward_hook(self, with_kwargs=True)
        try:
            out = model_func(X)
        finally:
            handle.remove()
            self.replacement = None
        if len(self.calls) != 1:
            raise ValueError(
                "module: expected the attention module to be called exactly once per forward pass of "
                f"model_func, but it was called {len(self.calls)} times"
                + (" (is it part of the model?)" if not self.calls else " (shared layers are not supported)")
            )
        return out


def _output_terms(model_func, loss_func, probe: _LayerProbe, X, y, F0: Tensor, out0: Tensor, w: float):
    """``(r, Lambda, separable, Lambda_exact)`` for one batch, batch weight ``w`` included.

    ``out0 is F0`` means the layer output is the model output.
    """
    if out0 is F0 and isinstance(loss_func, nn.MSELoss):
        # The layer output is the model output: closed form, token-separable.
        r = w * torch.func.grad(lambda f: loss_func(f, y))(F0)
        N, L, E = F0.shape
        c = w * (2.0 / F0.numel() if loss_func.reduction == "mean" else 2.0)
        Lam = c * torch.eye(E, dtype=F0.dtype, device=F0.device).expand(N, L, E, E)
        return r, Lam, True, None

    def model_out(f):
        return probe.run(model_func, X, replacement=f)

    def loss_of(f):
        return loss_func(model_out(f), y)

    N, L, E = F0.shape
    basis = torch.eye(L * E, dtype=F0.dtype, device=F0.device).view(L * E, 1, L, E).expand(L * E, N, L, E)
    r = w * grad(loss_of)(F0)
    Jt = vmap(lambda t: jvp(model_out, (F0,), (t,))[1])(basis)  # [LE, *out.shape]
    HJt = loss_hessian_mp(loss_func, out0, y, Jt)
    Lam = torch.einsum("bnk,cnk->nbc", Jt.reshape(L * E, N, -1), HJt.reshape(L * E, N, -1))
    # jacrev, not grad: torch's forward-mode rule of mse_loss_backward fails on grad's unbatched
    # unit cotangent ("ZeroTensors are immutable", torch 2.15); jacrev's batched one is fine.
    Hex = vmap(lambda t: jvp(jacrev(loss_of), (F0,), (t,))[1])(basis)  # [LE, N, L, E]
    Lam_ex = Hex.reshape(L * E, N, L * E).transpose(0, 1)
    return r, w * Lam.reshape(N, L, E, L, E), False, w * Lam_ex.reshape(N, L, E, L, E)


def attention_factors(model_func, loss_func, module: nn.Module, data, *, num_data: Optional[int] = None,
                      progressbar: bool = False) -> AttentionFactors:
    """Per-token factors of ``module``'s Hessian blocks in the network ``model_func`` (SPEC §4–5).

    Args:
        model_func: the model (an ``nn.Module`` or callable ``X -> output``) containing ``module``.
        loss_func: ``nn.MSELoss`` or ``nn.CrossEntropyLoss`` (``"mean"`` or ``"sum"``).
        module: a :class:`~backpack_attention.MultiheadSelfAttention` (or converted adapter) that
            ``model_func`` calls exactly once per forward pass.
        data: an iterable of ``(X, y)`` batches (or one ``(X, y)`` tuple). All batches must have the
            same sequence length.
        num_data: total number of sequences (default: summed over ``data``).
        progressbar: show a tqdm progress bar over the batches.

    Returns:
        :class:`AttentionFactors` with data ``[N, L, d']``, weights, moments ``[N, H, L, ...]`` and
        loss terms (see :class:`LossTerms`).
    """
    check_loss(loss_func)
    m = as_attention(module)
    if isinstance(model_func, nn.Module):
        if not any(s is m for s in model_func.modules()):
            raise ValueError("module is not a submodule of model_func")
        random = [n for n, s in model_func.named_modules()
                  if isinstance(s, nn.modules.dropout._DropoutNd) and s.p > 0 and s.training]
        if random:
            raise ValueError(
                f"model_func: dropout modules {random} are active (train mode, p > 0), so the curvature "
                "would be random; call model_func.eval() or set their p to 0"
            )
    batches = _as_batches(data)
    for X, y in batches:
        for name, t in (("X", X), ("y", y)):
            if isinstance(t, Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ValueError(f"data: {name} contains non-finite values (nan or inf)")
    N_total = sum(X.shape[0] for X, _ in batches) if num_data is None else num_data
    probe = _LayerProbe(m)
    w_terms = split_weights(m)
    # First pass: validate every batch before any curvature work.
    firsts = []
    with torch.no_grad():
        for X, y in batches:
            out = probe.run(model_func, X)
            try:
                loss = loss_func(out, y)
            except (RuntimeError, ValueError, IndexError) as err:
                raise ValueError(f"data: loss_func(model_func(X), y) failed for a batch: {err}") from err
            if not bool(torch.isfinite(loss)):
                raise ValueError(f"loss is not finite ({loss.item()}) on a batch of data")
            firsts.append(probe.calls[0][0])
    if len({args[0].shape[1] for args in firsts}) > 1:
        raise ValueError("data: all batches must have the same sequence length L")

    parts = {k: [] for k in ("X", "mom", "r", "Lam", "Lex")}
    separable = None
    for X, y in tqdm(batches, desc="attention factors", unit="batch", disable=not progressbar):
        out0 = probe.run(model_func, X)
        (args, F0) = probe.calls[0]
        x = args[0].detach()
        kpm = args[1] if len(args) > 1 else None
        attn_mask = args[2] if len(args) > 2 else None
        is_output = out0 is F0
        F0 = F0.detach()
        out0 = F0 if is_output else out0.detach()
        w = batch_weight(loss_func, X.shape[0], N_total)
        with torch.no_grad():  # torch.func transforms still differentiate; no graph on the parameters
            r, Lam, sep, Lex = _output_terms(model_func, loss_func, probe, X, y, F0, out0, w)
        if separable is None:
            separable = sep
        elif separable != sep:
            raise ValueError("data: batches lead to different loss structures")
        with torch.no_grad():
            Xt = augment(x, m.bias)
            allowed = m.allowed_mask(x, kpm, attn_mask)
            parts["mom"].append(layer_moments(Xt, w_terms, allowed, m.attention, r))
        parts["X"].append(Xt)
        parts["r"].append(r)
        parts["Lam"].append(Lam)
        parts["Lex"].append(Lex)

    cat = lambda ts: torch.cat(ts, dim=0)  # noqa: E731
    moments = MomentTerms(*[cat([getattr(mo, f) for mo in parts["mom"]]) for f in ("A", "M1", "Sigma", "kappa_g", "q", "z")])
    loss = LossTerms(cat(parts["r"]), cat(parts["Lam"]), separable,
                     None if parts["Lex"][0] is None else cat(parts["Lex"]))
    return AttentionFactors(m, DataTerms(cat(parts["X"]), m.bias), w_terms, moments, loss,
                            m.num_heads, m.head_dim, m.attention, {"num_data": N_total})
