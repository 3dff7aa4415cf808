"""KFAC / KFLR on the pre-LN transformer against curvlinops (type-2 = KFLR, expand/reduce).

curvlinops only knows ``nn.Linear``; its twin of the transformer therefore computes attention
with ``nn.Linear`` in/out-projections and the embedding as a bias-free ``nn.Linear`` on one-hot
inputs. Every Kronecker product is compared as a dense matrix.

Convention note. For a loss over *token-level* outputs ``[N, C, L]`` curvlinops 3.0.1's type-2
backpropagates each column ``c`` of the per-token loss-Hessian square roots for all tokens of a
sequence at once, which adds cross-token terms wherever tokens interact further down the network
(attention keys/values and everything below). BackPACK's exact factor has one column per
(class, token), and that is what our KFLR uses: it is the expectation of the Monte-Carlo KFAC
(whose sampled columns are independent across tokens). So the exact curvlinops comparison uses
a per-sequence readout (``[N, C]``), where both conventions coincide; for the token-level model
only the layers above the last token mixing are compared with curvlinops, and KFAC's
convergence to KFLR is checked statistically.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from backpack import backpack
from curvlinops import KFACLinearOperator
from torch import nn

import backpack_attention.extensions as E
from backpack_attention.backpack_ext import extend
from backpack_attention.models import TinyTransformer
from backpack_attention.module import MultiheadSelfAttention
from cases import C, D, DT, lm_problem
from reference import OneHotEmbedding

# BackPACK's converter warns about the mask buffers (get_attr nodes); they carry no gradient
pytestmark = pytest.mark.filterwarnings("ignore:Encountered node that may break:UserWarning")


class LinearProjAttention(nn.Module):
    """Multi-head self-attention from two ``nn.Linear`` and an explicit softmax core."""

    def __init__(self, mhsa: MultiheadSelfAttention):
        super().__init__()
        E_, self.H, self.causal = mhsa.embed_dim, mhsa.num_heads, mhsa.causal
        self.in_proj = nn.Linear(E_, 3 * E_, dtype=DT)
        self.out_proj = nn.Linear(E_, E_, dtype=DT)
        with torch.no_grad():
            self.in_proj.weight.copy_(mhsa.in_proj_weight)
            self.in_proj.bias.copy_(mhsa.in_proj_bias)
            self.out_proj.weight.copy_(mhsa.out_proj_weight)
            self.out_proj.bias.copy_(mhsa.out_proj_bias)

    def forward(self, x, key_padding_mask=None):
        n, l, e = x.shape
        d = e // self.H
        q, k, v = (t.reshape(n, l, self.H, d).transpose(1, 2) for t in self.in_proj(x).chunk(3, -1))
        s = q @ k.transpose(-1, -2) / math.sqrt(d)
        if self.causal:
            s = s.masked_fill(torch.ones(l, l, dtype=torch.bool).triu(1), float("-inf"))
        z = (torch.softmax(s, -1) @ v).transpose(1, 2).reshape(n, l, e)
        return self.out_proj(z)


def twin(model: TinyTransformer) -> TinyTransformer:
    """The same network with curvlinops-visible layers only (shares nothing with ``model``)."""
    t = copy.deepcopy(model)
    t.embed = OneHotEmbedding(model.embed, one_hot_input=True)
    for b_t, b in zip(t.blocks, model.blocks):
        b_t.attn = LinearProjAttention(b.attn)
    return t


def kron_blocks(params_bp, twin_model, savefield):
    """Dense Kronecker blocks in the order of the twin's Linear parameters."""
    out = []
    bp = dict(params_bp)
    for name, _ in twin_model.named_parameters():
        if ".ln" in name:
            continue
        if name == "embed.lin.weight":
            A, G = getattr(bp["embed.weight"], savefield)  # embed.weight [C, D] -> kron(A, G)
            K = torch.kron(A, G).reshape(C, D, C, D).permute(1, 0, 3, 2).reshape(C * D, C * D)
        else:
            src = name.replace("attn.in_proj.weight", "attn.in_proj_weight").replace(
                "attn.in_proj.bias", "attn.in_proj_bias").replace(
                "attn.out_proj.weight", "attn.out_proj_weight").replace("attn.out_proj.bias", "attn.out_proj_bias")
            factors = getattr(bp[src], savefield)
            K = factors[0] if len(factors) == 1 else torch.kron(factors[0], factors[1])
        out.append((name, K))
    return out


def setup(causal=True, seed=0, readout="token"):
    return lm_problem(causal, seed, readout)


def backpack_factors(model, X, y, ext):
    m = extend(copy.deepcopy(model), use_converter=True)
    loss_func = extend(nn.CrossEntropyLoss())
    with backpack(ext):
        loss_func(m(X), y).backward()
    return {n: p for n, p in m.named_parameters()}


def curvlinops_blocks(model, X, y, kfac_approx):
    t = twin(model)
    params = [p for n, p in t.named_parameters() if ".ln" not in n]
    K = KFACLinearOperator(t, nn.CrossEntropyLoss(), params, [(F.one_hot(X, C).to(DT), y)],
                           fisher_type="type-2", kfac_approx=kfac_approx, check_deterministic=False)
    dense = K @ torch.eye(sum(p.numel() for p in params), dtype=DT)
    return t, dense


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_kflr_matches_curvlinops_type2(causal, kfac_approx):
    model, X, y = setup(causal, readout="sequence")
    bp = backpack_factors(model, X, y, E.KFLR(kfac_approx=kfac_approx))
    t, dense = curvlinops_blocks(model, X, y, kfac_approx)
    i = 0
    for name, block in kron_blocks(bp, t, "kflr"):
        k = block.shape[0]
        ref = dense[i:i + k, i:i + k]
        assert ((block - ref).norm() / ref.norm()) < 1e-10, name
        i += k
    assert i == dense.shape[0]  # every curvlinops block was compared


def test_kflr_token_level_top_layers_match_curvlinops():
    """Token-level loss: layers above the last attention core agree with curvlinops exactly."""
    model, X, y = setup(True)
    bp = backpack_factors(model, X, y, E.KFLR())
    t, dense = curvlinops_blocks(model, X, y, "expand")
    i, compared = 0, 0
    for name, block in kron_blocks(bp, t, "kflr"):
        k = block.shape[0]
        ref = dense[i:i + k, i:i + k]
        i += k
        if name.startswith(("unembed.", "blocks.1.mlp.", "blocks.1.attn.out_proj.")):
            assert ((block - ref).norm() / ref.norm()) < 1e-10, name
            compared += 1
    assert compared == 8


def test_kfac_mc_converges_to_kflr():
    """KFAC's input factors equal KFLR's; its gradient factors converge as samples grow."""
    model, X, y = setup(True)
    kflr = backpack_factors(model, X, y, E.KFLR())
    torch.manual_seed(3)
    kfac = backpack_factors(model, X, y, E.KFAC(mc_samples=3000))
    worst = 0.0
    for name, p in kflr.items():
        if ".ln" in name:
            continue  # dense GGN blocks, not Kronecker factors
        F_lr, F_ac = p.kflr, kfac[name].kfac
        input_factor = 0 if name == "embed.weight" else (1 if len(F_lr) == 2 else None)
        for j, (a, b) in enumerate(zip(F_lr, F_ac)):
            err = ((a - b).norm() / a.norm()).item()
            if j == input_factor:
                assert err < 1e-12, name  # input factors are deterministic
            else:
                worst = max(worst, err)
    assert worst < 0.05  # ~1% expected at 3000 samples; 10 samples give ~15%


def test_kfac_rejects_unknown_approximation():
    with pytest.raises(ValueError, match="kfac_approx"):
        E.KFAC(kfac_approx="average")
    with pytest.raises(ValueError, match="kfac_approx"):
        E.KFLR(kfac_approx="full")
