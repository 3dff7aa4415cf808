"""Every public curvature call leaves the model as it found it: parameter values, gradients, hooks,
requires_grad flags and train/eval mode, whether the call succeeds or fails."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import backpack_attention as ba
from backpack_attention.models import TinyTransformer, addition_data

DT = torch.float64


def _snapshot(model: nn.Module):
    mods = list(model.modules())
    return {
        "values": [p.detach().clone() for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "training": [m.training for m in mods],
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
                   len(getattr(m, "_backward_pre_hooks", {}))) for m in mods],
        "attrs": [sorted(k for k in vars(m) if k.startswith("_bpa")) for m in mods],
        "versions": [p._version for p in model.parameters()],
    }


def _assert_same(before, after):
    for k in ("requires_grad", "training", "hooks", "attrs", "versions"):
        assert before[k] == after[k], k
    for a, b in zip(before["values"], after["values"]):
        assert torch.equal(a, b)
    for a, b in zip(before["grads"], after["grads"]):
        assert (a is None and b is None) or torch.equal(a, b)


def _problem():
    torch.manual_seed(0)
    model = TinyTransformer(d_model=8, num_heads=2, num_layers=1, norm="pre", dtype=DT).eval()
    X, y = addition_data(6)
    # a non-trivial starting state: some grads, a frozen parameter, a user hook, mixed modes
    model(X).sum().backward()
    model.embed.weight.requires_grad_(False)
    model.blocks[0].mlp.train()
    model.blocks[0].attn.register_forward_hook(lambda *a: None)
    return model, nn.CrossEntropyLoss(), [(X, y)]


CALLS = {
    "ggn_operator": lambda m, l, d: ba.AttentionGGNLinearOperator(m, l, list(m.parameters())[1:], d)
    @ torch.ones(sum(p.numel() for p in list(m.parameters())[1:]), dtype=DT),
    "hessian_operator": lambda m, l, d: ba.AttentionHessianLinearOperator(
        m, l, list(m.blocks[0].attn.parameters()), d, part="functional")
    @ torch.ones(sum(p.numel() for p in m.blocks[0].attn.parameters()), dtype=DT),
    "hessian_blocks": lambda m, l, d: ba.hessian_blocks(m, l, m.blocks[0].attn, d)[("W_Q", 0), ("W_K", 1)].full,
    "attention_factors": lambda m, l, d: ba.attention_factors(m, l, m.blocks[0].attn, d),
    "block_eigenvalues": lambda m, l, d: ba.attention_block_eigenvalues(m, l, d, blocks=("W_V",), k=1,
                                                                         progress=False),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_successful_calls_leave_the_model_untouched(name):
    model, loss, data = _problem()
    before = _snapshot(model)
    CALLS[name](model, loss, data)
    _assert_same(before, _snapshot(model))


@pytest.mark.parametrize("name", list(CALLS))
def test_failing_calls_leave_the_model_untouched(name):
    model, loss, data = _problem()
    X, y = data[0]
    bad = [(X, torch.full_like(y, 99))]  # targets out of range: the loss fails inside the call
    before = _snapshot(model)
    with pytest.raises(Exception):
        CALLS[name](model, loss, bad)
    _assert_same(before, _snapshot(model))
