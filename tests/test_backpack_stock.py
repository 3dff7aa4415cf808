"""Stock BackPACK behaviour is unchanged, and unsupported combinations fail loudly.

A plain MLP and a CNN give bit-identical results with ``backpack_attention``'s extensions and
with BackPACK's own. Extensions that cannot handle a module raise ``NotImplementedError``
naming the module and the extension.
"""

from __future__ import annotations

import copy

import backpack
import pytest
import torch
from backpack import backpack as bp_context
from torch import nn

import backpack_attention.extensions as E
from backpack_attention import MultiheadSelfAttention
from backpack_attention.backpack_ext import extend

EXTENSIONS = [
    ("BatchGrad", {}), ("BatchL2Grad", {}), ("SumGradSquared", {}), ("Variance", {}),
    ("DiagGGNExact", {}), ("DiagGGNMC", {"mc_samples": 3}), ("BatchDiagGGNExact", {}),
    ("BatchDiagGGNMC", {"mc_samples": 2}), ("SqrtGGNExact", {}), ("SqrtGGNMC", {"mc_samples": 2}),
    ("KFAC", {"mc_samples": 2}), ("KFLR", {}), ("KFRA", {}), ("DiagHessian", {}), ("BatchDiagHessian", {}),
]


def mlp():
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.Sigmoid(), nn.Linear(4, 3))


def cnn():
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(3 * 2 * 2, 3))


def run(model, X, y, ext, extend_fn):
    model = extend_fn(copy.deepcopy(model))
    loss_func = extend_fn(nn.CrossEntropyLoss())
    torch.manual_seed(7)  # same Monte-Carlo samples for both runs
    with bp_context(ext):
        loss_func(model(X), y).backward()
    return [getattr(p, ext.savefield) for p in model.parameters()]


def same(a, b) -> bool:
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return torch.equal(a, b)


@pytest.mark.parametrize("name,kwargs", EXTENSIONS, ids=[e[0] for e in EXTENSIONS])
@pytest.mark.parametrize("net", ["mlp", "cnn"])
def test_stock_models_unchanged(net, name, kwargs):
    torch.manual_seed(0)
    model = {"mlp": mlp, "cnn": cnn}[net]()
    X = torch.randn(4, 6) if net == "mlp" else torch.randn(4, 2, 4, 4)
    y = torch.randint(0, 3, (4,))
    ours = run(model, X, y, getattr(E, name)(**kwargs), extend)
    stock = run(model, X, y, getattr(backpack.extensions, name)(**kwargs), backpack.extend)
    assert same(ours, stock)
    assert all(r is not None for r in ours)


def attention_net():
    return nn.Sequential(nn.Linear(3, 4), MultiheadSelfAttention(4, 2), nn.Flatten(), nn.Linear(12, 2))


@pytest.mark.parametrize("name", ["KFRA", "HMP", "GGNMP", "PCHMP"])
def test_unsupported_extensions_raise_naming_module_and_extension(name):
    torch.manual_seed(0)
    model = extend(attention_net())
    loss_func = extend(nn.CrossEntropyLoss())
    X, y = torch.randn(2, 3, 3), torch.randint(0, 2, (2,))
    with pytest.raises(NotImplementedError, match=rf"{name}.*MultiheadSelfAttention"):
        with bp_context(getattr(E, name)()):
            loss_func(model(X), y).backward()


def test_kfra_on_layernorm_raises():
    model = extend(nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)))
    loss_func = extend(nn.CrossEntropyLoss())
    with pytest.raises(NotImplementedError, match=r"KFRA.*LayerNorm"):
        with bp_context(E.KFRA()):
            loss_func(model(torch.randn(2, 3)), torch.randint(0, 2, (2,))).backward()


def test_unknown_module_error_names_extension():
    model = extend(nn.Sequential(nn.Linear(3, 4), nn.SiLU(), nn.Linear(4, 2)))
    loss_func = extend(nn.CrossEntropyLoss())
    with pytest.raises(NotImplementedError, match=r"DiagHessian.*SiLU"):
        with bp_context(E.DiagHessian()):
            loss_func(model(torch.randn(2, 3)), torch.randint(0, 2, (2,))).backward()


def test_batch_first_false_is_refused():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(4, 2, batch_first=False)

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    with pytest.raises(ValueError, match="batch_first"):
        extend(Net())


def test_register_rejects_non_extensions():
    with pytest.raises(TypeError, match="BackPACK extension"):
        E.register(object())


EMBEDDING_EXTENSIONS = [e for e in EXTENSIONS if e[0] not in ("KFAC", "KFLR", "KFRA", "DiagHessian", "BatchDiagHessian")]


@pytest.mark.parametrize("name,kwargs", EMBEDDING_EXTENSIONS, ids=[e[0] for e in EMBEDDING_EXTENSIONS])
def test_embedding_matches_stock_in_float32(name, kwargs):
    """Our float64-safe Embedding derivatives agree with BackPACK's where BackPACK works."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(7, 3), nn.Flatten(), nn.Linear(12, 3))
    X, y = torch.randint(0, 7, (5, 4)), torch.randint(0, 3, (5,))
    ours = run(model, X, y, getattr(E, name)(**kwargs), extend)
    stock = run(model, X, y, getattr(backpack.extensions, name)(**kwargs), backpack.extend)
    for a, b in zip(ours, stock):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
