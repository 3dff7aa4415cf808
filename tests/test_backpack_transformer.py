"""BackPACK extensions on a 2-layer pre-LN transformer, against independent references.

The model under test (``backpack_attention.models.language_model``, extended with
``use_converter=True``) is compared with the same network built from ``nn.MultiheadAttention``
(``backpack_attention.models.torch_twin``) and differentiated by ``torch.func`` under the math SDPA kernel:
per-sample gradients (``jacrev`` of the per-sample losses), exact GGN (``jacrev`` + loss
Hessian) and exact Hessian diagonals (``torch.func.hessian``). float64 throughout.
"""

from __future__ import annotations

import copy

import pytest
import torch
from reference import rel_error, split_flat
import torch.nn.functional as F
from backpack import backpack
from torch import nn
from torch.func import functional_call, hessian, jacrev
from torch.nn.attention import SDPBackend, sdpa_kernel

import backpack_attention.extensions as E
from backpack_attention.backpack_ext import extend
from backpack_attention.models import torch_twin
from cases import C, D, MLP, L, N, lm_problem

# BackPACK's converter warns about the mask buffers (get_attr nodes); they carry no gradient
pytestmark = pytest.mark.filterwarnings("ignore:Encountered node that may break:UserWarning")

RTOL = 1e-10


def canonical(name: str) -> str:
    """Parameter name shared by the reference and the BackPACK model."""
    return (name.replace("attn.mha.", "attn.").replace("attn.attention.", "attn.")
            .replace("attn.out_proj.weight", "attn.out_proj_weight")
            .replace("attn.out_proj.bias", "attn.out_proj_bias"))


class Problem:
    """Reference model (``nn.MultiheadAttention``), data, and all reference quantities."""

    def __init__(self, causal: bool, padding: bool, seed: int = 0, d: int = D, mlp: int = MLP):
        self.d, self.mlp = d, mlp
        # non-trivial LayerNorm affine parameters and biases
        self.model, self.X, self.y = lm_problem(causal, seed, d=d, mlp=mlp)
        self.ref = torch_twin(self.model, seq_len=L)  # fixed length: BackPACK's converter needs mask buffers
        self.causal = causal
        self.kpm = None
        if padding:
            self.kpm = torch.zeros(N, L, dtype=torch.bool)
            self.kpm[0, -1] = True
            self.kpm[2, -2:] = True
        self.params = {canonical(n): p.detach() for n, p in self.ref.named_parameters()}
        self.names = list(self.params)
        self._cache = {}

    def backpack_model(self, attention: str):
        model = copy.deepcopy(self.ref if attention == "torch" else self.model)
        return extend(model, use_converter=True)

    def run(self, attention: str, *exts):
        model = self.backpack_model(attention)
        loss_func = extend(nn.CrossEntropyLoss())
        with backpack(*exts):
            loss = loss_func(model(self.X, self.kpm), self.y)
            loss.backward()
        return {canonical(n): p for n, p in model.named_parameters()}

    # ---- references -----------------------------------------------------------------
    def logits(self, params, X=None, kpm=None):
        X = self.X if X is None else X
        kpm = self.kpm if X is self.X or kpm is None else kpm
        own = {n: params[canonical(n)] for n, _ in self.ref.named_parameters()}
        with sdpa_kernel(SDPBackend.MATH):
            return functional_call(self.ref, own, (X, kpm))

    def per_sample_losses(self, params):
        out = self.logits(params)
        return F.cross_entropy(out, self.y, reduction="none").sum(1) / (N * L)

    def grad_batch(self):
        if "gb" not in self._cache:
            self._cache["gb"] = jacrev(self.per_sample_losses)(self.params)
        return self._cache["gb"]

    def ggn(self):
        """Per-sample GGNs ``[N, P, P]`` over all parameters (flattened in ``names`` order)."""
        if "ggn" not in self._cache:
            J = jacrev(self.logits)(self.params)  # each [N, C, L, *p]
            Jn = torch.cat([J[n].reshape(N, C * L, -1) for n in self.names], dim=-1)  # [N, CL, P]
            out = self.logits(self.params).detach()

            def loss_of_logits(z):
                return F.cross_entropy(z, self.y, reduction="sum") / (N * L)

            Hz = hessian(loss_of_logits)(out).reshape(N, C * L, N, C * L)
            Hn = torch.stack([Hz[n, :, n] for n in range(N)])  # samples are independent
            self._cache["ggn"] = torch.einsum("nap,nab,nbq->npq", Jn, Hn, Jn)
        return self._cache["ggn"]

    def split(self, flat):
        """Cut the last axis of ``flat [..., P]`` into parameter-shaped tensors."""
        return split_flat(flat, self.params, self.names)

    def hessian_diag_batch(self):
        """Per-sample Hessian diagonals ``{name: [N, *p]}`` (they sum to the batch Hessian's)."""
        if "h" not in self._cache:
            flat0 = torch.cat([self.params[n].reshape(-1) for n in self.names])
            diags = []
            for n in range(N):
                X, kpm = self.X[n:n + 1], None if self.kpm is None else self.kpm[n:n + 1]

                def loss_n(flat, n=n, X=X, kpm=kpm):
                    out = self.logits(self.split(flat), X, kpm)
                    return F.cross_entropy(out, self.y[n:n + 1], reduction="sum") / (N * L)

                diags.append(hessian(loss_n)(flat0).diagonal())
            self._cache["h"] = self.split(torch.stack(diags))
        return self._cache["h"]


_PROBLEMS = {}


def problem(causal, padding, small=False) -> Problem:
    """Cached problems; ``small`` (width 4, MLP 6) keeps the dense Hessian references cheap."""
    key = (causal, padding, small)
    if key not in _PROBLEMS:
        _PROBLEMS[key] = Problem(causal, padding, **({"d": 4, "mlp": 6} if small else {}))
    return _PROBLEMS[key]


SETTINGS = [(True, False), (False, False), (True, True)]
IDS = ["causal", "full", "causal+padding"]


@pytest.mark.parametrize("attention", ["ours", "torch"])
@pytest.mark.parametrize("causal,padding", SETTINGS, ids=IDS)
def test_first_order(causal, padding, attention):
    P = problem(causal, padding)
    params = P.run(attention, E.BatchGrad(), E.BatchL2Grad(), E.SumGradSquared(), E.Variance())
    gb = P.grad_batch()
    for n in P.names:
        p, g = params[n], gb[n]
        assert rel_error(p.grad_batch, g) < RTOL, n
        assert rel_error(p.batch_l2, (g**2).flatten(1).sum(1)) < RTOL, n
        assert rel_error(p.sum_grad_squared, (g**2).sum(0)) < RTOL, n
        # BackPACK's definition: mean_n g_n^2 - (mean_n g_n)^2 of the (1/N-scaled) g_n
        var = g.pow(2).mean(0) - g.mean(0).pow(2)
        assert torch.allclose(p.variance, var, rtol=1e-8, atol=1e-14), n
        assert rel_error(p.grad, g.sum(0)) < RTOL, n


@pytest.mark.parametrize("attention", ["ours", "torch"])
@pytest.mark.parametrize("causal,padding", SETTINGS, ids=IDS)
def test_diag_ggn_exact(causal, padding, attention):
    P = problem(causal, padding)
    params = P.run(attention, E.DiagGGNExact(), E.BatchDiagGGNExact())
    G = P.ggn()
    diag = P.split(G.sum(0).diagonal())
    diag_batch = P.split(torch.diagonal(G, dim1=1, dim2=2))
    for n in P.names:
        if n.endswith("in_proj_bias"):
            # the key bias has exactly zero curvature (softmax shift invariance)
            assert params[n].diag_ggn_exact[P.d:2 * P.d].abs().max() < 1e-12
        assert rel_error(params[n].diag_ggn_exact, diag[n]) < RTOL, n
        assert rel_error(params[n].diag_ggn_exact_batch, diag_batch[n]) < RTOL, n


@pytest.mark.parametrize("causal,padding", SETTINGS, ids=IDS)
def test_sqrt_ggn_exact(causal, padding):
    P = problem(causal, padding)
    params = P.run("ours", E.SqrtGGNExact())
    S = torch.cat([params[n].sqrt_ggn_exact.flatten(2) for n in P.names], dim=-1)  # [V, N, P]
    G = torch.einsum("vnp,vnq->pq", S, S)
    assert rel_error(G, P.ggn().sum(0)) < RTOL


def test_mc_extensions_statistics():
    """DiagGGNMC, BatchDiagGGNMC and SqrtGGNMC with many samples converge to the exact GGN."""
    P = problem(True, False)
    torch.manual_seed(1)
    M = 1500
    params = P.run("ours", E.DiagGGNMC(mc_samples=M), E.BatchDiagGGNMC(mc_samples=M),
                   E.SqrtGGNMC(mc_samples=M))
    G = P.ggn()
    exact = torch.cat([d.reshape(-1) for d in P.split(G.sum(0).diagonal()).values()])
    exact_b = torch.cat([d.flatten(1) for d in P.split(torch.diagonal(G, dim1=1, dim2=2)).values()], 1)
    mc = torch.cat([params[n].diag_ggn_mc.reshape(-1) for n in P.names])
    mc_b = torch.cat([params[n].diag_ggn_mc_batch.flatten(1) for n in P.names], 1)
    S = torch.cat([params[n].sqrt_ggn_mc.flatten(2) for n in P.names], -1)
    # ~2-3% expected at 1500 samples (10 samples give ~25%)
    assert rel_error(mc, exact) < 0.06
    assert rel_error(mc_b, exact_b) < 0.06
    assert rel_error(torch.einsum("vnp,vnq->pq", S, S), G.sum(0)) < 0.1


@pytest.mark.parametrize("causal,padding", [(True, False), (True, True)], ids=["causal", "causal+padding"])
def test_diag_hessian(causal, padding):
    P = problem(causal, padding, small=True)
    params = P.run("ours", E.DiagHessian(), E.BatchDiagHessian())
    Hb = P.hessian_diag_batch()
    H = {n: h.sum(0) for n, h in Hb.items()}
    for n in P.names:
        assert rel_error(params[n].diag_h, H[n]) < RTOL, n
        assert rel_error(params[n].diag_h_batch, Hb[n]) < RTOL, n
    # the Hessian differs from the GGN here (the residual terms matter)
    G = P.split(P.ggn().sum(0).diagonal())
    assert max(rel_error(H[n], G[n]) for n in P.names) > 1e-3


@pytest.mark.slow
def test_diag_hessian_full_attention_torch_adapter():
    P = problem(False, False, small=True)
    params = P.run("torch", E.DiagHessian())
    Hb = P.hessian_diag_batch()
    for n in P.names:
        assert rel_error(params[n].diag_h, Hb[n].sum(0)) < RTOL, n


def test_kflr_layernorm_blocks_are_exact_ggn_blocks():
    """LayerNorm's KFLR entry is its exact GGN block."""
    P = problem(True, True)
    params = P.run("ours", E.KFLR())
    G = P.ggn().sum(0)
    offsets, i = {}, 0
    for n in P.names:
        offsets[n] = (i, i + P.params[n].numel())
        i += P.params[n].numel()
    for n in P.names:
        if ".ln" in n:
            (block,) = params[n].kflr
            a, b = offsets[n]
            assert rel_error(block, G[a:b, a:b]) < RTOL, n
