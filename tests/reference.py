"""Independent autodiff references (torch.func under the math SDPA kernel) for curvature tests."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev
from torch.nn.attention import SDPBackend, sdpa_kernel


def rel_error(a, b, scale=None, norm: str = "fro") -> float:
    """Relative error of ``a`` w.r.t. ``b`` (or w.r.t. ``scale`` where ``b`` may be exactly 0).

    ``norm="fro"`` (Frobenius) or ``"max"`` (largest absolute entry); a zero ``b`` counts as 1e-300.
    """
    size = (lambda t: t.norm()) if norm == "fro" else (lambda t: t.abs().max())
    ref = size(b) if scale is None else torch.as_tensor(scale)
    return (size(a - b) / ref.clamp_min(1e-300)).item()


def batch_weights(loss_func, batches, num_data=None):
    """Weights of the batches' losses in the empirical risk (mean reduction: each batch's share of
    the targets counted over all data; an explicit ``num_data``: curvlinops' ``N_b / num_data``)."""
    if loss_func.reduction == "sum":
        return [1.0] * len(batches)
    if num_data is not None:
        return [X.shape[0] / num_data for X, _ in batches]

    def counted(y):
        if isinstance(loss_func, torch.nn.CrossEntropyLoss) and not y.is_floating_point():
            keep = y != loss_func.ignore_index
            return float(keep.sum()) if loss_func.weight is None else float(loss_func.weight[y[keep]].sum())
        return float(y.numel())

    c = [counted(y) for _, y in batches]
    return [ci / sum(c) for ci in c]


def flat_parametrization(model, params):
    """``(unflatten, flat0)``: ``params`` concatenated row-major into ``flat0``, and the map from such
    a flat vector to the model's full parameter dict (for ``functional_call``)."""
    names = []  # in the order of `params`
    for q in params:
        names.extend(n for n, p in model.named_parameters() if p is q)
    base = {n: p.detach() for n, p in model.named_parameters()}
    sizes = [base[n].numel() for n in names]

    def unflatten(flat):
        ps, i = dict(base), 0
        for n, s in zip(names, sizes):
            ps[n] = flat[i : i + s].view_as(base[n])
            i += s
        return ps

    return unflatten, torch.cat([base[n].flatten() for n in names])


def dense_hessian_and_ggn(model, loss_func, params, batches, num_data=None):
    """``(H, GGN)`` of the empirical risk w.r.t. ``params`` (concatenated, row-major) by ``torch.func``
    (forward-over-reverse: wrong through ``layer_norm`` parameters in torch 2.13/2.14)."""
    unflatten, flat0 = flat_parametrization(model, params)
    H = G = 0
    with sdpa_kernel(SDPBackend.MATH):
        for (X, y), w in zip(batches, batch_weights(loss_func, batches, num_data)):
            out_fn = lambda flat: functional_call(model, unflatten(flat), (X,))  # noqa: E731
            H = H + w * hessian(lambda flat: loss_func(out_fn(flat), y))(flat0)
            out0 = out_fn(flat0).detach()
            J = jacrev(out_fn)(flat0).reshape(out0.numel(), -1)
            HL = hessian(lambda o: loss_func(o, y))(out0).reshape(out0.numel(), out0.numel())
            G = G + w * J.T @ HL @ J
    return H, G


def split_flat(flat, params, names):
    """Cut the last axis of ``flat [..., P]`` into ``{name: [..., *params[name].shape]}`` (in ``names`` order)."""
    out, i = {}, 0
    for n in names:
        k = params[n].numel()
        out[n] = flat[..., i : i + k].reshape(*flat.shape[:-1], *params[n].shape)
        i += k
    return out


def dense_hessian_double_backward(model, loss_func, params, batches, num_data=None, chunk=64):
    """Hessian of the empirical risk w.r.t. ``params`` (concatenated, row-major) by double backward.

    Reverse-over-reverse is right through ``layer_norm``, where torch's forward-over-reverse
    (``torch.func.hessian``, curvlinops' ``HessianLinearOperator``) is wrong in torch 2.13/2.14.
    Run it on a model whose attention supports double backward (``nn.MultiheadAttention`` under
    ``sdpa_kernel(SDPBackend.MATH)``).
    """
    params = list(params)
    P = sum(p.numel() for p in params)
    H = torch.zeros(P, P, dtype=params[0].dtype)
    with sdpa_kernel(SDPBackend.MATH):
        for (X, y), w in zip(batches, batch_weights(loss_func, batches, num_data)):
            loss = w * loss_func(model(X), y)
            g = torch.autograd.grad(loss, params, create_graph=True)
            flat = torch.cat([t.reshape(-1) for t in g])
            for i0 in range(0, P, chunk):
                i1 = min(P, i0 + chunk)
                E = torch.zeros(i1 - i0, P, dtype=flat.dtype)
                E[torch.arange(i1 - i0), torch.arange(i0, i1)] = 1.0
                rows = torch.autograd.grad(flat, params, E, retain_graph=True, is_grads_batched=True, allow_unused=True)
                H[i0:i1] += torch.cat([torch.zeros(i1 - i0, p.numel(), dtype=flat.dtype) if r is None
                                       else r.reshape(i1 - i0, -1) for r, p in zip(rows, params)], dim=1)
    return H


def dense_ggn(model, loss_func, params, batches, num_data=None):
    """GGN ``sum_n J_n^T Lambda_n J_n`` by reverse mode only (``jacrev``; right through LayerNorm)."""
    G = 0
    unflatten, flat0 = flat_parametrization(model, params)
    with sdpa_kernel(SDPBackend.MATH):
        for (X, y), w in zip(batches, batch_weights(loss_func, batches, num_data)):
            out_fn = lambda flat: functional_call(model, unflatten(flat), (X,))  # noqa: E731
            out0 = out_fn(flat0).detach()
            J = jacrev(out_fn)(flat0).reshape(out0.numel(), -1)
            HL = hessian(lambda o: loss_func(o, y))(out0).reshape(out0.numel(), out0.numel())
            G = G + w * J.T @ HL @ J
    return G


class PlainAttention(nn.Module):
    """Multi-head self-attention written out in plain torch ops: the autodiff reference for
    :class:`~backpack_attention.MultiheadSelfAttention` (copies its parameters, same names; causal,
    ``key_padding_mask``, bool ``attn_mask``; softmax or linear). ``record=True``: keep the
    ``(input, attention matrix)`` of every call in ``seen``."""

    def __init__(self, m):
        super().__init__()
        self.H, self.causal, self.kind = m.num_heads, m.causal, m.attention
        for name in ("in_proj_weight", "in_proj_bias", "out_proj_weight", "out_proj_bias"):
            p = getattr(m, name)
            self.register_parameter(name, None if p is None else nn.Parameter(p.detach().clone()))
        self.record, self.seen = False, []

    def forward(self, x, key_padding_mask=None, attn_mask=None):
        n, l, e = x.shape
        d = e // self.H
        qkv = x @ self.in_proj_weight.T
        if self.in_proj_bias is not None:
            qkv = qkv + self.in_proj_bias
        q, k, v = (t.reshape(n, l, self.H, d).permute(0, 2, 1, 3) for t in qkv.split(e, -1))
        s = torch.einsum("nhid,nhjd->nhij", q, k) / math.sqrt(d)
        banned = torch.zeros(n, 1, l, l, dtype=torch.bool)
        if self.causal:
            banned = banned | torch.ones(l, l, dtype=torch.bool).triu(1)
        if attn_mask is not None:
            banned = banned | attn_mask
        if key_padding_mask is not None:
            banned = banned | key_padding_mask[:, None, None, :]
        a = torch.softmax(s.masked_fill(banned, float("-inf")), -1) if self.kind == "softmax" else s * (~banned)
        if self.record:
            self.seen.append((x.detach(), a.detach()))
        z = torch.einsum("nhij,nhjd->nhid", a, v).permute(0, 2, 1, 3).reshape(n, l, e)
        out = z @ self.out_proj_weight.T
        return out if self.out_proj_bias is None else out + self.out_proj_bias


class OneHotEmbedding(nn.Module):
    """An ``nn.Embedding`` as a bias-free ``nn.Linear`` with the same weights (for tools that handle
    ``nn.Linear`` but not embeddings). ``one_hot_input``: ``X`` is already one-hot ``[N, L, V]``;
    else token ids, encoded here."""

    def __init__(self, emb: nn.Embedding, one_hot_input: bool = False):
        super().__init__()
        w = emb.weight
        self.lin = nn.Linear(emb.num_embeddings, emb.embedding_dim, bias=False, dtype=w.dtype, device=w.device)
        with torch.no_grad():
            self.lin.weight.copy_(w.T)
        self.one_hot_input = one_hot_input

    def forward(self, X):
        if not self.one_hot_input:
            X = nn.functional.one_hot(X, self.lin.in_features).to(self.lin.weight.dtype)
        return self.lin(X)
