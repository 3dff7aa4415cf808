"""Closed-form Hessian blocks of one attention layer inside a model: the user-facing calls.

:func:`attention_factors` runs the model once per batch, records the layer's inputs and the loss
terms at its output, and returns the per-token factors
(:mod:`backpack_attention.derivatives.factors`); :func:`hessian_blocks` assembles the dense blocks
from them (:mod:`backpack_attention.derivatives.blocks`). Both return snapshots: later changes to
the model's parameters do not change them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Callable, Optional

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from backpack_attention.derivatives.blocks import HessianBlocks
from backpack_attention.derivatives.factors import (
    AttentionFactors,
    DataTerms,
    LossTerms,
    MomentTerms,
    layer_moments,
    output_terms,
)
from backpack_attention.derivatives.forward import AttentionParams
from backpack_attention.derivatives.loss import batch_weight, check_loss, mean_denominator
from backpack_attention.checks import check_memory, check_no_randomness, check_precision
from backpack_attention.module import as_attention, call_arguments

__all__ = ["attention_factors", "hessian_blocks"]


def _as_batches(data):
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], (Tensor, Mapping)):
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


def _cat_lambda(lams):
    """The batches' ``Lambda`` along ``N``; one expanded tensor (no copy) if every batch's is the same
    ``E x E`` matrix for every token (MSE at the layer output), which would otherwise take ``N L E^2``."""
    shared = all(t.dim() == 4 and t.stride()[:2] == (0, 0) for t in lams) and all(
        torch.equal(t[0, 0], lams[0][0, 0]) for t in lams)
    if shared:
        return lams[0][:1, :1].expand(sum(t.shape[0] for t in lams), *lams[0].shape[1:])
    return torch.cat(lams, dim=0)


def attention_factors(model_func, loss_func, module: nn.Module, data, *, num_data: Optional[int] = None,
                      progressbar: bool = False, batch_size_fn: Optional[Callable] = None) -> AttentionFactors:
    """Per-token factors of ``module``'s Hessian blocks in the network ``model_func`` (docs/math.md, sections 4 and 5).

    Args:
        model_func: the model (an ``nn.Module`` or callable ``X -> output``) containing ``module``.
        loss_func: ``nn.MSELoss`` or ``nn.CrossEntropyLoss`` (``"mean"`` or ``"sum"``).
        module: a :class:`~backpack_attention.MultiheadSelfAttention` (or converted adapter) that
            ``model_func`` calls exactly once per forward pass.
        data: an iterable of ``(X, y)`` batches (or one ``(X, y)`` tuple). All batches must have the
            same sequence length.
        num_data: total number of sequences. Default: batches are weighted by their share of the
            targets the loss counts (see :mod:`backpack_attention.derivatives.loss`); given: by
            ``batch_size / num_data`` as curvlinops does.
        batch_size_fn: batch size of an ``X`` that is not a tensor (e.g. a dict of tensors, as the
            operators and curvlinops accept), e.g. ``lambda X: X["input_ids"].shape[0]``.
        progressbar: show a tqdm progress bar over the batches.

    Returns:
        :class:`AttentionFactors` with data ``[N, L, d']``, weights, moments ``[N, H, L, ...]`` and
        loss terms (see :class:`LossTerms`).
    """
    check_loss(loss_func)
    m = as_attention(module)
    check_precision(m.in_proj_weight.dtype, "module's parameters")
    if isinstance(model_func, nn.Module):
        if not any(s is m for s in model_func.modules()):
            raise ValueError("module is not a submodule of model_func")
        check_no_randomness(model_func)
    batches = _as_batches(data)

    def size(X) -> int:
        if batch_size_fn is not None:
            return batch_size_fn(X)
        if not isinstance(X, Tensor):
            raise ValueError(f"data yields X of type {type(X).__name__}: pass batch_size_fn (as for the operators)")
        return X.shape[0]

    for X, y in batches:
        for name, t in (("X", X), ("y", y)):
            if isinstance(t, Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ValueError(f"data: {name} contains non-finite values (nan or inf)")
    # Batch weights: shares of the mean's denominator over all data (counted targets), or
    # curvlinops' batch_size / num_data with an explicit num_data (derivatives/loss.py).
    if num_data is None:
        dens = [mean_denominator(loss_func, size(X), y) for X, y in batches]
        den_total = sum(dens)
        if den_total <= 0 and loss_func.reduction == "mean":
            raise ValueError("data: no target is counted by loss_func (all are ignore_index?)")
        if loss_func.reduction == "mean":  # batches that count no target contribute nothing (0/0)
            batches, dens = [b for b, d in zip(batches, dens) if d > 0], [d for d in dens if d > 0]
    else:
        dens, den_total = [size(X) for X, _ in batches], num_data
    probe = _LayerProbe(m)
    w_terms = m.layout.head_weights(*AttentionParams.of(m))
    # First pass: validate every batch before any curvature work.
    firsts, token_separable = [], []
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
            token_separable.append(out is probe.calls[0][1] and isinstance(loss_func, nn.MSELoss))
    if len({args[0].shape[1] for args in firsts}) > 1:
        raise ValueError("data: all batches must have the same sequence length L")
    N_all, L = sum(args[0].shape[0] for args in firsts), firsts[0][0].shape[1]
    check_memory(m.in_proj_weight.element_size() * N_all * m.num_heads * L * L * 3, m.in_proj_weight.device,
                 f"data: the attention matrices A [N, H, L, L] = [{N_all}, {m.num_heads}, {L}, {L}] of all sequences",
                 "use fewer or shorter sequences (or several calls on parts of the data), or the operators")
    if not all(token_separable):
        # the output curvature is dense per sequence: Lambda (and the exact one) [N, L E, L E]
        LE = L * firsts[0][0].shape[2]
        item = m.in_proj_weight.element_size()
        check_memory(item * LE * LE * (2 * N_all + 1), m.in_proj_weight.device,
                     f"module: its output is not the model output under nn.MSELoss, so the curvature above it "
                     f"is a dense [L E, L E] = [{LE}, {LE}] matrix per sequence ({N_all} sequences), which",
                     "use fewer or shorter sequences, or the operators (AttentionGGNLinearOperator, "
                     "AttentionHessianLinearOperator), which never form it")

    parts = {k: [] for k in ("X", "mom", "r", "Lam", "Lex")}
    separable = None
    for (X, y), den in zip(tqdm(batches, desc="attention factors", unit="batch", disable=not progressbar), dens):
        out0 = probe.run(model_func, X)
        (args, F0) = probe.calls[0]
        x = args[0].detach()
        kpm = args[1] if len(args) > 1 else None
        attn_mask = args[2] if len(args) > 2 else None
        is_output = out0 is F0
        F0 = F0.detach()
        out0 = F0 if is_output else out0.detach()
        w = batch_weight(loss_func, den, den_total)
        with torch.no_grad():  # torch.func transforms still differentiate; no graph on the parameters
            r, Lam, sep, Lex = output_terms(lambda f: probe.run(model_func, X, replacement=f), loss_func, y, F0, out0, w)
        if separable is None:
            separable = sep
        elif separable != sep:
            raise ValueError("data: batches lead to different loss structures")
        with torch.no_grad():
            allowed = m.allowed_mask(x, kpm, attn_mask)
            parts["mom"].append(layer_moments(m, x, allowed, r, w_terms))
        parts["X"].append(parts["mom"][-1].X)
        parts["r"].append(r)
        parts["Lam"].append(Lam)
        parts["Lex"].append(Lex)

    cat = lambda ts: torch.cat(ts, dim=0)  # noqa: E731
    data_terms = DataTerms(cat(parts["X"]), m.bias)
    moms = parts["mom"]
    allowed = None
    if any(mo.allowed is not None for mo in moms):
        L = data_terms.X.shape[1]
        allowed = cat([torch.ones(mo.A.shape[0], 1, L, L, dtype=torch.bool, device=mo.A.device)
                       if mo.allowed is None else mo.allowed for mo in moms])
    moments = MomentTerms(*[cat([getattr(mo, f) for mo in moms]) for f in ("A", "M1", "q", "z")],
                          data_terms.X, cat([mo.g for mo in moms]), allowed, m.variant)
    loss = LossTerms(cat(parts["r"]), _cat_lambda(parts["Lam"]), separable,
                     None if parts["Lex"][0] is None else cat(parts["Lex"]))
    return AttentionFactors(m, data_terms, w_terms, moments, loss,
                            m.num_heads, m.head_dim, m.attention, m.layout)


def hessian_blocks(model_func, loss_func, module, data, *, num_data: Optional[int] = None,
                   progressbar: bool = False, batch_size_fn: Optional[Callable] = None) -> HessianBlocks:
    """Closed-form Hessian blocks of ``module`` in ``model_func`` (see :func:`attention_factors`).

    Returns a :class:`~backpack_attention.derivatives.blocks.HessianBlocks`, a read-only, lazy
    ``collections.abc.Mapping``: ``blocks[("W_Q", h1), ("W_K", h2)]`` is a
    :class:`~backpack_attention.derivatives.blocks.Block` with ``.outer``, ``.functional`` and
    ``.full`` ``[rows, cols]`` in :func:`~backpack_attention.param_index` order. A snapshot of the
    model at the time of the call.
    """
    return HessianBlocks(attention_factors(model_func, loss_func, module, data, num_data=num_data,
                                           progressbar=progressbar, batch_size_fn=batch_size_fn))
