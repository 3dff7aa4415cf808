"""Attention variants (bias=False, linear attention, masks given as keywords) in a sequential
model with GELU, LayerNorm and a token-level MSE loss, against an independent reference.

The reference replaces :class:`MultiheadSelfAttention` by plain torch ops (softmax/linear
attention written out here) and is differentiated with ``torch.func``. float64.
"""

from __future__ import annotations

import copy

import pytest
import torch
from reference import PlainAttention, rel_error, split_flat
from backpack import backpack
from torch import nn
from torch.func import functional_call, hessian, jacrev

import backpack_attention.extensions as E
from backpack_attention import MultiheadSelfAttention
from backpack_attention.backpack_ext import extend

# BackPACK's converter warns about the mask buffers (get_attr nodes); they carry no gradient
pytestmark = pytest.mark.filterwarnings("ignore:Encountered node that may break:UserWarning")

DT = torch.float64
N, L, DIN, D, HEADS, C = 3, 5, 3, 6, 2, 4
RTOL = 1e-10


class SeqModel(nn.Module):
    """``Linear -> GELU(tanh) -> attention(masks as keywords) -> LayerNorm -> Linear``, ``[N, L, C]``."""

    def __init__(self, bias, kind, causal, attn_mask):
        super().__init__()
        self.inp = nn.Linear(DIN, D, dtype=DT)
        self.act = nn.GELU(approximate="tanh")
        self.attn = MultiheadSelfAttention(D, HEADS, bias=bias, causal=causal, attention=kind, dtype=DT)
        self.ln = nn.LayerNorm(D, dtype=DT)
        self.out = nn.Linear(D, C, dtype=DT)
        self.register_buffer("mask", attn_mask)

    def forward(self, x, kpm=None):
        h = self.attn(self.act(self.inp(x)), key_padding_mask=kpm, attn_mask=self.mask)
        return self.out(self.ln(h))


CASES = {
    "softmax-bias-masks": dict(bias=True, kind="softmax", causal=False, masks=True),
    "softmax-nobias-causal": dict(bias=False, kind="softmax", causal=True, masks=False),
    "linear-bias-causal-masks": dict(bias=True, kind="linear", causal=True, masks=True),
    "linear-nobias": dict(bias=False, kind="linear", causal=False, masks=False),
}


class Problem:
    def __init__(self, bias, kind, causal, masks, seed=0):
        torch.manual_seed(seed)
        attn_mask = None
        self.kpm = None
        if masks:
            attn_mask = torch.rand(L, L) < 0.3
            attn_mask.fill_diagonal_(False)  # every query keeps itself
            self.kpm = torch.zeros(N, L, dtype=torch.bool)
            self.kpm[0, -1] = self.kpm[1, -2] = True
        self.model = SeqModel(bias, kind, causal, attn_mask)
        with torch.no_grad():
            for p in self.model.parameters():
                p.add_(0.3 * torch.randn_like(p))
        self.ref = copy.deepcopy(self.model)
        self.ref.attn = PlainAttention(self.model.attn)
        self.X = torch.randn(N, L, DIN, dtype=DT)
        self.Y = torch.randn(N, L, C, dtype=DT)
        self.params = {n: p.detach() for n, p in self.ref.named_parameters()}
        self.names = list(self.params)

    def run(self, *exts):
        model = extend(copy.deepcopy(self.model), use_converter=True)
        loss_func = extend(nn.MSELoss())
        with backpack(*exts):
            loss_func(model(self.X, self.kpm), self.Y).backward()
        return dict(model.named_parameters())

    def out(self, params, X=None, kpm=None):
        X = self.X if X is None else X
        return functional_call(self.ref, params, (X, self.kpm if kpm is None and X is self.X else kpm))

    def grad_batch(self):
        def losses(params):
            return ((self.out(params) - self.Y) ** 2).flatten(1).sum(1) / self.Y.numel()
        return jacrev(losses)(self.params)

    def ggn(self):
        J = jacrev(self.out)(self.params)
        Jn = torch.cat([J[n].reshape(N, L * C, -1) for n in self.names], -1)
        return 2.0 / self.Y.numel() * torch.einsum("nap,naq->npq", Jn, Jn)

    def split(self, flat):
        """Cut the last axis of ``flat [..., P]`` into parameter-shaped tensors."""
        return split_flat(flat, self.params, self.names)

    def hessian_diag_batch(self):
        flat0 = torch.cat([self.params[n].reshape(-1) for n in self.names])
        diags = []
        for n in range(N):
            kpm = None if self.kpm is None else self.kpm[n:n + 1]

            def loss_n(flat, n=n, kpm=kpm):
                out = self.out(self.split(flat), self.X[n:n + 1], kpm)
                return ((out - self.Y[n:n + 1]) ** 2).sum() / self.Y.numel()
            diags.append(hessian(loss_n)(flat0).diagonal())
        return self.split(torch.stack(diags))


@pytest.fixture(params=list(CASES), scope="module")
def problem(request):
    return Problem(**CASES[request.param])


def test_first_order_and_ggn(problem):
    P = problem
    params = P.run(E.BatchGrad(), E.DiagGGNExact(), E.BatchDiagGGNExact(), E.SqrtGGNExact())
    gb, G = P.grad_batch(), P.ggn()
    diag, diag_b = P.split(G.sum(0).diagonal()), P.split(torch.diagonal(G, dim1=1, dim2=2))
    assert set(P.names) == {n for n, p in params.items()}
    for n in P.names:
        assert rel_error(params[n].grad_batch, gb[n]) < RTOL, n
        assert rel_error(params[n].diag_ggn_exact, diag[n]) < RTOL, n
        assert rel_error(params[n].diag_ggn_exact_batch, diag_b[n]) < RTOL, n
    S = torch.cat([params[n].sqrt_ggn_exact.flatten(2) for n in P.names], -1)
    assert rel_error(torch.einsum("vnp,vnq->pq", S, S), G.sum(0)) < RTOL


def test_diag_hessian(problem):
    P = problem
    params = P.run(E.DiagHessian(), E.BatchDiagHessian())
    Hb = P.hessian_diag_batch()
    for n in P.names:
        assert rel_error(params[n].diag_h_batch, Hb[n]) < RTOL, n
        assert rel_error(params[n].diag_h, Hb[n].sum(0)) < RTOL, n


def test_subsampling(problem):
    P = problem
    sub = [0, 2]
    params = P.run(E.BatchGrad(subsampling=sub), E.SqrtGGNExact(subsampling=sub))
    gb, G = P.grad_batch(), P.ggn()
    S = torch.cat([params[n].sqrt_ggn_exact.flatten(2) for n in P.names], -1)
    assert S.shape[1] == len(sub)
    assert rel_error(torch.einsum("vnp,vnq->pq", S, S), G[sub].sum(0)) < RTOL
    for n in P.names:
        assert rel_error(params[n].grad_batch, gb[n][sub]) < RTOL, n


def test_kflr_input_factors(problem):
    """KFLR's input factors of the attention projections are the token second moments."""
    P = problem
    params = P.run(E.KFLR())
    with torch.no_grad():
        x = P.model.act(P.model.inp(P.X))
    attn = params["attn.in_proj_weight"].kflr
    assert len(attn) == 2 and attn[0].shape == (3 * D, 3 * D)
    A = torch.einsum("nli,nlj->ij", x, x) / (N * L)
    assert rel_error(attn[1], A) < 1e-12
    # weight and bias of the in-projection share the gradient factor
    if "attn.in_proj_bias" in params:
        (G_in,) = params["attn.in_proj_bias"].kflr
        assert torch.allclose(G_in, attn[0])


def test_key_bias_has_zero_curvature():
    P = Problem(**CASES["softmax-bias-masks"])
    params = P.run(E.DiagGGNExact(), E.DiagHessian())
    kb = slice(D, 2 * D)
    assert params["attn.in_proj_bias"].diag_ggn_exact[kb].abs().max() < 1e-13
    assert params["attn.in_proj_bias"].diag_h[kb].abs().max() < 1e-13
    assert params["attn.in_proj_bias"].diag_h[:D].abs().max() > 1e-6  # the query bias is not
