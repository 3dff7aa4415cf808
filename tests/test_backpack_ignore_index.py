"""BackPACK's second-order extensions with nn.CrossEntropyLoss(ignore_index=...): ignored targets
carry no curvature and the mean divides by counted targets (stock BackPACK gets both wrong)."""

from __future__ import annotations

import copy

import pytest
import torch
from backpack import backpack
from torch import nn

import backpack_attention as ba
from reference import dense_ggn, dense_hessian_double_backward, rel_error

DT = torch.float64


class Net(nn.Module):
    """nn.MultiheadAttention -> tanh -> Linear, token logits [N, C, L]."""

    def __init__(self, E=4, H=2, C=3):
        super().__init__()
        self.attn = nn.MultiheadAttention(E, H, batch_first=True, dtype=DT)
        self.act = nn.Tanh()
        self.out = nn.Linear(E, C, dtype=DT)

    def forward(self, x):
        return self.out(self.act(self.attn(x, x, x, need_weights=False)[0])).permute(0, 2, 1)


def _problem(ignore_index, reduction, seed=0):
    torch.manual_seed(seed)
    ref = Net()
    X = torch.randn(3, 4, 4, dtype=DT)
    y = torch.randint(0, 3, (3, 4))
    y[0, :2] = ignore_index
    y[2, 3] = ignore_index
    return ref, nn.CrossEntropyLoss(ignore_index=ignore_index, reduction=reduction), X, y


def _diag(model, loss_func, X, y, ext, field):
    model = ba.extend(copy.deepcopy(model), use_converter=True)
    loss_func = ba.extend(copy.deepcopy(loss_func))
    with backpack(ext):
        loss_func(model(X), y).backward()
    return torch.cat([getattr(p, field).reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("ignore_index,reduction", [(-100, "mean"), (2, "mean"), (-1, "sum")])
def test_diag_ggn_and_diag_hessian_with_ignore_index(ignore_index, reduction):
    ref, loss_func, X, y = _problem(ignore_index, reduction)
    params = list(ref.parameters())
    G = dense_ggn(ref, loss_func, params, [(X, y)])
    H = dense_hessian_double_backward(ref, loss_func, params, [(X, y)])
    assert rel_error(_diag(ref, loss_func, X, y, ba.extensions.DiagGGNExact(), "diag_ggn_exact"), G.diagonal()) < 1e-10
    assert rel_error(_diag(ref, loss_func, X, y, ba.extensions.DiagHessian(), "diag_h"), H.diagonal()) < 1e-10


def test_mc_diag_ggn_converges_with_ignore_index():
    ref, loss_func, X, y = _problem(-100, "mean", seed=1)
    G = dense_ggn(ref, loss_func, list(ref.parameters()), [(X, y)]).diagonal()
    torch.manual_seed(0)
    mc = _diag(ref, loss_func, X, y, ba.extensions.DiagGGNMC(mc_samples=4000), "diag_ggn_mc")
    assert rel_error(mc, G) < 0.1
