"""BackPACK's KFLR/KFAC with ``kfac_approx="attention"`` give the factors of AttentionKFACLinearOperator.

The reference is the operator (tests/test_kfac_operator.py checks it against the exact GGN and
curvlinops). For the attention layer under token-wise layers (the last block of the pre-LN
language model), BackPACK's exact square-root columns (one per class and token) and the
operator's type-2 columns give the same per-token curvature, so the factors agree to rounding.
"""

from __future__ import annotations

import copy

import pytest
import torch
from backpack import backpack
from torch import nn

import backpack_attention as ba
import backpack_attention.extensions as E
from backpack_attention.backpack_ext import extend
from backpack_attention.models import language_model

pytestmark = pytest.mark.filterwarnings("ignore:Encountered node that may break:UserWarning")

DT = torch.float64
N, L, C, D, HEADS = 3, 4, 5, 8, 2


def problem(layers=1, seed=0):
    torch.manual_seed(seed)
    model = language_model(C, D, HEADS, layers, 12, causal=True, readout="token", max_len=L, dtype=DT)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    X = torch.randint(0, C, (N, L))
    y = torch.randint(0, C, (N, L))
    return model, X, y


def backpack_params(model, X, y, ext):
    m = extend(copy.deepcopy(model), use_converter=True)
    loss_func = extend(nn.CrossEntropyLoss())
    with backpack(ext):
        loss_func(m(X), y).backward()
    return dict(m.named_parameters())


def operator_blocks(model, X, y, attn_name):
    attn = model.get_submodule(attn_name)
    K = ba.AttentionKFACLinearOperator(model, nn.CrossEntropyLoss(), list(attn.parameters()), [(X, y)],
                                       separate_weight_and_bias=True)
    return {b.name[len(attn_name) + 1:]: torch.kron(b.out_factor, b.in_factor) for b in K.blocks()}


def backpack_blocks(params, attn_name, savefield):
    out = {}
    for pname, suffix in (("in_proj_weight", "weight"), ("in_proj_bias", "bias")):
        for group, factors in getattr(params[f"{attn_name}.{pname}"], savefield).items():
            out[f"{group}.{suffix}"] = factors[0] if len(factors) == 1 else torch.kron(*factors)
    for pname, suffix in (("out_proj_weight", "weight"), ("out_proj_bias", "bias")):
        factors = getattr(params[f"{attn_name}.{pname}"], savefield)
        out[f"O.{suffix}"] = factors[0] if len(factors) == 1 else torch.kron(*factors)
    return out


@pytest.mark.parametrize("layers", [1, 2])
def test_kflr_attention_factors_equal_the_operator(layers):
    model, X, y = problem(layers)
    attn_name = f"blocks.{layers - 1}.attn"  # the last attention layer: token-wise layers above it
    bp = backpack_blocks(backpack_params(model, X, y, E.KFLR(kfac_approx="attention")), attn_name, "kflr")
    ref = operator_blocks(model, X, y, attn_name)
    assert sorted(bp) == sorted(ref)
    for name, block in ref.items():
        if block.norm() == 0:  # b_K: no curvature
            assert bp[name].abs().max() == 0, name
            continue
        assert ((bp[name] - block).norm() / block.norm()) < 1e-10, name


def test_kfac_attention_factors_converge_to_kflr():
    model, X, y = problem(1, seed=1)
    name = "blocks.0.attn"
    kflr = backpack_blocks(backpack_params(model, X, y, E.KFLR(kfac_approx="attention")), name, "kflr")
    torch.manual_seed(3)
    kfac = backpack_blocks(backpack_params(model, X, y, E.KFAC(mc_samples=2000, kfac_approx="attention")), name, "kfac")
    worst = max(((kfac[k] - v).norm() / v.norm()).item() for k, v in kflr.items() if v.norm() > 0)
    assert worst < 0.1  # ~2-3% expected at 2000 samples


def test_attention_approx_leaves_other_layers_on_expand():
    model, X, y = problem(1, seed=2)
    att = backpack_params(model, X, y, E.KFLR(kfac_approx="attention"))
    exp = backpack_params(model, X, y, E.KFLR(kfac_approx="expand"))
    for name in ("blocks.0.mlp.0.weight", "unembed.weight", "blocks.0.ln1.weight"):
        for a, b in zip(att[name].kflr, exp[name].kflr):
            assert torch.equal(a, b), name


def test_unknown_approximation_is_refused():
    with pytest.raises(ValueError, match="kfac_approx"):
        E.KFLR(kfac_approx="attentive")
    with pytest.raises(ValueError, match="AttentionKFACLinearOperator only"):  # operator-only recipe
        E.KFAC(kfac_approx="attention-reduce")
