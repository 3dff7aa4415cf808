"""`hessian_blocks` is a read-only, lazy collections.abc.Mapping and a snapshot of the model."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import torch
from torch import nn

from backpack_attention import MultiheadSelfAttention, attention_factors, hessian_blocks, param_index
from backpack_attention.layout import AttentionLayout

DT = torch.float64


def _problem(bias=True, H=2, E=4, seed=0):
    torch.manual_seed(seed)
    attn = MultiheadSelfAttention(E, H, bias=bias, causal=True, dtype=DT)
    X, Y = torch.randn(3, 4, E, dtype=DT), torch.randn(3, 4, E, dtype=DT)
    return attn, nn.MSELoss(), (X, Y)


@pytest.mark.parametrize("bias", [True, False])
def test_mapping_protocol(bias):
    attn, loss, data = _problem(bias)
    blocks = hessian_blocks(attn, loss, attn, data)
    assert isinstance(blocks, Mapping)
    names = AttentionLayout(4, 2, bias).block_names()
    single = [(n, None) if n == "b_O" else (n, h) for n in names for h in range(2) if n != "b_O" or h == 0]
    keys = list(blocks)
    assert keys == [(a, b) for a in single for b in single]
    assert len(blocks) == len(keys) == len(set(keys))
    assert list(blocks.keys()) == keys
    # `in` checks keys without computing anything; all-heads keys are valid too
    assert (("W_Q", 0), ("W_K", 1)) in blocks and (("W_Q", None), ("W_V", None)) in blocks
    assert (("W_X", 0), ("W_K", 1)) not in blocks and "W_Q" not in blocks
    assert (("b_Q", 0), ("W_K", 1)) in blocks if bias else (("b_Q", 0), ("W_K", 1)) not in blocks
    assert blocks._cache == {}
    assert blocks.get((("W_X", 0), ("W_K", 1))) is None
    assert blocks.get((("W_X", 0), ("W_K", 1)), 7) == 7
    b = blocks.get((("W_Q", 0), ("W_K", 1)))
    assert torch.equal(b.full, blocks[("W_Q", 0), ("W_K", 1)].full)
    items = dict(blocks.items())
    assert len(items) == len(keys)
    # the per-head items tile the whole layer matrix
    M = blocks.matrix("full")
    for (k1, k2), blk in items.items():
        r, c = param_index(attn, *k1), param_index(attn, *k2)
        assert torch.equal(blk.full, M[r[:, None], c[None, :]])
    assert len(list(blocks.values())) == len(keys)
    with pytest.raises(TypeError):
        blocks[("W_Q", 0), ("W_K", 1)] = b  # read-only
    with pytest.raises(KeyError, match="must be one of"):
        blocks[("W_X", 0), ("W_K", 1)]


def test_blocks_and_factors_are_snapshots():
    attn, loss, data = _problem()
    blocks = hessian_blocks(attn, loss, attn, data)
    factors = attention_factors(attn, loss, attn, data)
    ref_blocks = hessian_blocks(attn, loss, attn, data).matrix("full").clone()
    W_O = factors.weights.W_O.clone()
    with torch.no_grad():  # an optimizer step, in place
        for p in attn.parameters():
            p.add_(0.3 * torch.randn_like(p))
    assert torch.equal(factors.weights.W_O, W_O)
    assert torch.equal(blocks.matrix("full"), ref_blocks)  # computed lazily after the step
    fresh = hessian_blocks(attn, loss, attn, data).matrix("full")
    assert (fresh - ref_blocks).norm() > 1e-3 * ref_blocks.norm()  # the step did change the Hessian


@pytest.mark.parametrize("bias", [True, False])
def test_lazily_computed_moments_are_snapshots(bias):
    """Sigma and kappa_g are formed on first access; reading them after an optimizer step and an
    in-place change of the data still gives the moments at the time of the call."""
    attn, loss, (X, Y) = _problem(bias)
    factors = attention_factors(attn, loss, attn, (X, Y))
    ref = attention_factors(attn, loss, attn, (X.clone(), Y.clone())).moments
    Sigma, kappa = ref.Sigma.clone(), ref.kappa_g.clone()
    with torch.no_grad():
        for p in attn.parameters():
            p.add_(0.3 * torch.randn_like(p))
        X.mul_(2.0)
        Y.add_(1.0)
    assert torch.equal(factors.moments.Sigma, Sigma)
    assert torch.equal(factors.moments.kappa_g, kappa)
    assert kappa.abs().max() > 0  # not trivially equal
    fresh = attention_factors(attn, loss, attn, (X, Y)).moments
    assert not torch.allclose(fresh.Sigma, Sigma)


@pytest.mark.parametrize("bias", [True, False])
def test_weights_do_not_share_storage_with_parameters(bias):
    attn, loss, data = _problem(bias)
    w = attention_factors(attn, loss, attn, data).weights
    params = [p for p in attn.parameters()]
    for t in (w.W_Q, w.W_K, w.W_V, w.W_O, w.U) + ((w.b_O,) if bias else ()):
        for p in params:
            assert t.untyped_storage().data_ptr() != p.untyped_storage().data_ptr()
