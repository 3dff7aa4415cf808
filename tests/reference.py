"""Independent autodiff references (torch.func under the math SDPA kernel) for curvature tests."""

from __future__ import annotations

import torch
from torch.func import functional_call, hessian, jacrev
from torch.nn.attention import SDPBackend, sdpa_kernel


def rel_error(a, b, scale=None) -> float:
    """Relative error of ``a`` w.r.t. ``b`` (or w.r.t. ``scale`` where ``b`` may be exactly 0)."""
    return ((a - b).norm() / (b.norm() if scale is None else scale)).item()


def dense_hessian_and_ggn(model, loss_func, params, batches, num_data=None):
    """``(H, GGN)`` of the empirical risk w.r.t. ``params`` (concatenated, row-major), curvlinops' weighting."""
    names = []  # in the order of `params`
    for q in params:
        for n, p in model.named_parameters():
            if p is q:
                names.append(n)
    base = {n: p.detach() for n, p in model.named_parameters()}
    sizes = [base[n].numel() for n in names]

    def unflatten(flat):
        ps, i = dict(base), 0
        for n, s in zip(names, sizes):
            ps[n] = flat[i : i + s].view_as(base[n])
            i += s
        return ps

    flat0 = torch.cat([base[n].flatten() for n in names])
    N_total = sum(X.shape[0] for X, _ in batches) if num_data is None else num_data
    H = G = 0
    with sdpa_kernel(SDPBackend.MATH):
        for X, y in batches:
            w = X.shape[0] / N_total if loss_func.reduction == "mean" else 1.0
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
