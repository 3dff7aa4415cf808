"""No host synchronisation in the product loop, checked on the CPU.

On a GPU, ``torch.cuda.set_sync_debug_mode("error")`` catches synchronising calls (tests/test_gpu.py,
skipped without one). Here the same calls are caught on the CPU: a dispatch mode records the ATen
operators that read a tensor's data on the host or have data-dependent shapes (``.item()``,
``bool(t)``, ``float(t)``, ``nonzero``, ``masked_select``, boolean indexing, ``unique``), and
``Tensor.cpu``/``tolist``/``numpy`` are recorded while the products run. None may occur in the
products of the GGN, Hessian, KFAC and EKFAC operators or of a KFAC inverse once their caches and
factors exist.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import backpack_attention as ba
from backpack_attention.models import TinyTransformer

_SYNC_OPS = {
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.is_nonzero.default,
    torch.ops.aten.nonzero.default,
    torch.ops.aten.masked_select.default,
    torch.ops.aten._unique2.default,
    torch.ops.aten.unique_consecutive.default,
}


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.hits = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        boolean_index = func is torch.ops.aten.index.Tensor and any(
            i is not None and i.dtype == torch.bool for i in args[1])
        if func in _SYNC_OPS or boolean_index:
            self.hits.append(str(func))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def host_syncs(monkeypatch):
    """Records synchronising calls made inside the block; yields the list of their names."""
    rec = _Recorder()
    for name in ("cpu", "tolist", "numpy"):
        original = getattr(torch.Tensor, name)

        def record(self, *a, _name=name, _original=original, **k):
            rec.hits.append(f"Tensor.{_name}")
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, record)
    with rec:
        yield rec.hits
    monkeypatch.undo()


def test_recorder_catches_synchronising_calls(monkeypatch):
    t = torch.randn(4)
    with host_syncs(monkeypatch) as hits:
        t.sum().item()
        bool(t[0] > 0)
        t[t > 0]  # noqa: B018
        t.cpu()
        t.tolist()
    assert hits == ["aten._local_scalar_dense.default", "aten._local_scalar_dense.default", "aten.index.Tensor",
                    "Tensor.cpu", "Tensor.tolist"]


def _problem():
    torch.manual_seed(0)
    model = TinyTransformer(vocab=8, d_model=8, num_heads=2, num_layers=2, max_len=6, readout="token",
                            norm="pre", causal=True, dtype=torch.float64).eval()
    X, y = torch.randint(0, 8, (3, 6)), torch.randint(0, 8, (3, 6))
    X[0, -2:] = 0  # some repeated tokens; nothing data-dependent should matter
    return model, nn.CrossEntropyLoss(), [(X, y)]


@pytest.mark.parametrize("kind", ["ggn", "hessian", "kfac", "ekfac"])
def test_products_do_not_synchronise(monkeypatch, kind):
    model, loss_func, data = _problem()
    if kind in ("kfac", "ekfac"):
        params = [p for n, p in model.named_parameters() if "attn" in n or "mlp" in n]
        cls = ba.AttentionKFACLinearOperator if kind == "kfac" else ba.AttentionEKFACLinearOperator
        op = cls(model, loss_func, params, data)
    else:
        params = [p for p in model.parameters() if p.requires_grad]
        cls = ba.AttentionGGNLinearOperator if kind == "ggn" else ba.AttentionHessianLinearOperator
        op = cls(model, loss_func, params, data)
    v = torch.randn(op.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    V = torch.randn(op.shape[1], 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    first = op @ v  # builds the cache / the factors (may synchronise: validation, eigendecompositions)
    inv = op.inverse(damping=1e-2) if kind == "kfac" else None
    if inv is not None:
        inv @ v
    with host_syncs(monkeypatch) as hits:
        again = op @ v
        op @ V
        if inv is not None:
            inv @ v
    assert hits == []
    torch.testing.assert_close(again, first, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_kfac_factor_computation_does_not_synchronise(monkeypatch, kind):
    """Computing the Kronecker factors (the data loop: forward, loss sides, covariances, trace
    weights) makes no synchronising call either. The module's masked-row check is replaced by what
    runs on an accelerator (an asynchronous device assertion); on the CPU it reads the mask."""
    import backpack_attention.module as module

    model, loss_func, data = _problem()
    params = [p for n, p in model.named_parameters() if "attn" in n or "mlp" in n]
    cls = ba.AttentionKFACLinearOperator if kind == "kfac" else ba.AttentionEKFACLinearOperator
    op = cls(model, loss_func, params, data, check_deterministic=False)  # index bookkeeping (CPU) here
    v = torch.randn(op.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    first = op @ v
    monkeypatch.setattr(module, "check_on_device", lambda cond, msg: torch._assert_async(cond, msg) or True)
    with host_syncs(monkeypatch) as hits:
        op.compute_kronecker_factors()
        again = op @ v
    assert hits == []
    torch.testing.assert_close(again, first, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", ["ggn", "hessian"])
def test_rebuild_after_a_step_does_not_synchronise(monkeypatch, kind):
    """After an optimizer step the next product rebuilds the cached batch (forward pass, loss
    terms, batch weight) without reading the device (the batch weights are remembered from the
    construction; tests/test_reliability.py checks that targets changed in place are re-read)."""
    import backpack_attention.module as module

    model, loss_func, data = _problem()
    cls = ba.AttentionGGNLinearOperator if kind == "ggn" else ba.AttentionHessianLinearOperator
    params = [p for p in model.parameters() if p.requires_grad]
    op = cls(model, loss_func, params, data, check_deterministic=False)
    v = torch.randn(op.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    op @ v
    with torch.no_grad():
        for p in params:
            p.add_(0.01 * torch.randn_like(p))
    monkeypatch.setattr(module, "check_on_device", lambda cond, msg: torch._assert_async(cond, msg) or True)
    with host_syncs(monkeypatch) as hits:
        after_step = op @ v
    assert hits == []
    torch.testing.assert_close(after_step, cls(model, loss_func, params, data) @ v, rtol=1e-12, atol=1e-14)
