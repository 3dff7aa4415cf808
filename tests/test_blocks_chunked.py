"""Blocks and factors computed in chunks of tokens equal the autodiff reference (float64).

The closed-form blocks are sums over tokens; long sequences are processed in chunks of query rows
(``derivatives.blocks.CHUNK_BYTES``) and the second moments in sub-chunks
(``derivatives.factors.CHUNK_ELEMENTS``). Here both budgets are shrunk so that every path runs with
many chunks on small problems, and the results are compared with torch.func and with one chunk.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from backpack_attention import MultiheadSelfAttention, attention_factors, hessian_blocks
from backpack_attention.derivatives import blocks as dblocks
from backpack_attention.derivatives import factors as dfactors
from reference import dense_hessian_and_ggn, rel_error

DT = torch.float64
TOL = 1e-10
rel_err = functools.partial(rel_error, norm="max")


class Model(nn.Module):
    def __init__(self, E, H, *, kpm=None, **kw):
        super().__init__()
        self.attn = MultiheadSelfAttention(E, H, dtype=DT, **kw)
        self.kpm = kpm

    def forward(self, x):
        return self.attn(x, self.kpm)


def _model(H, bias, mask, attention, N, L, seed):
    g = torch.Generator().manual_seed(seed)
    E = 2 * H
    kpm = None
    if mask == "padding":
        kpm = torch.zeros(N, L, dtype=torch.bool)
        kpm[0, -2:] = True
        kpm[-1, 0] = True
    model = Model(E, H, kpm=kpm, bias=bias, causal=mask == "causal", attention=attention)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, dtype=DT, generator=g) * (0.5 if attention == "linear" else 0.8))
    X = torch.randn(N, L, E, dtype=DT, generator=g)
    Y = torch.randn(N, L, E, dtype=DT, generator=g)
    return model, X, Y


def _budget_for_rows(blocks_obj_args, rows):
    """CHUNK_BYTES that gives chunks of ``rows`` query rows for the model's sizes."""
    E, H, bias = blocks_obj_args
    d, dk = E + bias, E // H
    per_token = 3 * d * d + 2 * E * d + E * E + 2 * dk * dk
    return per_token * rows * 8


@pytest.mark.parametrize("keep_terms", [True, False])
@pytest.mark.parametrize("rows", [1, 2, "two sequences"])
@pytest.mark.parametrize("H,bias,mask,attention", [
    (1, True, "causal", "softmax"),
    (2, False, "padding", "softmax"),
    (2, True, "none", "linear"),
    (3, True, "padding", "linear"),
])
def test_chunked_blocks_equal_autodiff(monkeypatch, rows, H, bias, mask, attention, keep_terms):
    N, L = 3, 5
    model, X, Y = _model(H, bias, mask, attention, N, L, seed=hash((rows, H, bias, mask, attention)) % 2**31)
    budget_rows = 2 * L if rows == "two sequences" else rows
    monkeypatch.setattr(dblocks, "CHUNK_BYTES", _budget_for_rows((2 * H, H, bias), budget_rows))
    monkeypatch.setattr(dfactors, "CHUNK_ELEMENTS", 1)  # Sigma and kappa one query row at a time
    # per-head terms kept across blocks, or recomputed for each block (large problems)
    monkeypatch.setattr(dblocks, "TERMS_CACHE_BYTES", 2**40 if keep_terms else 0)
    # two batches (one with a fixed padding mask, which needs all sequences in each batch)
    data = [(X, Y)] if mask == "padding" else [(X[:2], Y[:2]), (X[2:], Y[2:])]
    blocks = hessian_blocks(model, nn.MSELoss(), model.attn, data)
    expected = {1: N * L, 2: N * 3, "two sequences": 2}[rows]
    assert len(blocks._chunks) == expected  # the budget really splits the tokens
    assert blocks._keep_terms == keep_terms
    H_ref, G_ref = dense_hessian_and_ggn(model, nn.MSELoss(), list(model.attn.parameters()), data)
    for part, ref in (("outer", G_ref), ("full", H_ref), ("functional", H_ref - G_ref)):
        assert rel_err(blocks.matrix(part), ref) < TOL, part


def test_moments_in_chunks_equal_whole(monkeypatch):
    """``Sigma``/``kappa_g`` sub-chunked, per head and per chunk equal the one-shot computation."""
    model, X, Y = _model(2, True, "causal", "softmax", N=2, L=6, seed=3)
    whole = attention_factors(model, nn.MSELoss(), model.attn, (X, Y)).moments
    Sigma, kappa = whole.Sigma, whole.kappa_g
    monkeypatch.setattr(dfactors, "CHUNK_ELEMENTS", 1)
    small = attention_factors(model, nn.MSELoss(), model.attn, (X, Y)).moments
    assert rel_err(small.Sigma, Sigma) < 1e-14 and rel_err(small.kappa_g, kappa) < 1e-14
    assert torch.allclose(small.sigma(1, slice(1, 2), slice(2, 5)), Sigma[1:2, 1, 2:5], atol=1e-15)
    assert torch.allclose(small.kappa(0, slice(0, 2), slice(4, 6)), kappa[:, 0, 4:6], atol=1e-15)
    # Sigma_i for one token, by its definition (covariance of the keys under a_i)
    Xt = torch.cat([X, torch.ones(2, 6, 1, dtype=DT)], -1)
    a = small.A[1, 0, 3]
    mu = a @ Xt[1]
    ref = (Xt[1].T * a) @ Xt[1] - torch.outer(mu, mu)
    assert torch.allclose(small.sigma(0, slice(1, 2), slice(3, 4))[0, 0], ref, atol=1e-14)


def test_large_blocks_are_not_cached_twice(monkeypatch):
    """A group block above CACHE_BYTES is recomputed for each key instead of kept beside the result."""
    model, X, Y = _model(2, True, "causal", "softmax", N=2, L=4, seed=4)
    monkeypatch.setattr(dblocks, "CACHE_BYTES", 0)
    blocks = hessian_blocks(model, nn.MSELoss(), model.attn, (X, Y))
    b = blocks[("W_Q", 0), ("W_K", 1)]
    assert not [k for k in blocks._cache if len(k) == 3]  # no group part kept
    H_ref, _ = dense_hessian_and_ggn(model, nn.MSELoss(), list(model.attn.parameters()), [(X, Y)])
    from backpack_attention import param_index
    r, c = param_index(model.attn, "W_Q", 0), param_index(model.attn, "W_K", 1)
    assert rel_err(b.full, H_ref[r][:, c]) < TOL
