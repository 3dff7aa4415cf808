"""On CUDA: same numbers as on the CPU, and no host synchronisation where the work repeats.

``torch.cuda.set_sync_debug_mode("error")`` makes every synchronising call (``.item()``,
``bool(tensor)``, ``.cpu()``, data-dependent shapes) raise. Inside it run the module's forward
with masks (its masked-row check is an asynchronous device assertion there), the products of the
GGN, Hessian and KFAC operators once their caches (and factors) are built, and the product of a
damped KFAC inverse once its eigendecompositions exist.
Skipped without a GPU; run on one when available (the issue note says whether it was). On the CPU,
tests/test_host_sync.py checks the same products for synchronising calls with a dispatch mode.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

import backpack_attention as ba
from backpack_attention.models import TinyTransformer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@contextlib.contextmanager
def no_sync():
    old = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(old)


def problem(device, dtype=torch.float64, N=3, L=6):
    torch.manual_seed(0)
    model = TinyTransformer(vocab=8, d_model=8, num_heads=2, num_layers=2, max_len=L, readout="token",
                            norm="pre", causal=True, dtype=dtype).to(device).eval()
    X = torch.randint(0, 8, (N, L), device=device)
    y = torch.randint(0, 8, (N, L), device=device)
    return model, nn.CrossEntropyLoss(), [(X, y)]


def test_module_forward_with_masks_does_not_sync():
    attn = ba.MultiheadSelfAttention(8, 2, causal=True, dtype=torch.float32).cuda()
    x = torch.randn(3, 5, 8, device="cuda")
    pad = torch.zeros(3, 5, dtype=torch.bool, device="cuda")
    pad[:, -1] = True
    with no_sync():
        out = attn(x, key_padding_mask=pad)
        out.sum().backward()
    torch.testing.assert_close(out.cpu(), attn.cpu()(x.cpu(), key_padding_mask=pad.cpu()))


@pytest.mark.parametrize("kind", ["ggn", "hessian", "kfac"])
def test_operator_products_match_cpu_and_do_not_sync(kind):
    results = {}
    for device in ("cpu", "cuda"):
        model, loss_func, data = problem(device)
        params = [p for p in model.parameters() if p.requires_grad]
        if kind == "kfac":
            params = [p for n, p in model.named_parameters() if "attn" in n or "mlp" in n]
            op = ba.AttentionKFACLinearOperator(model, loss_func, params, data)
        else:
            cls = ba.AttentionGGNLinearOperator if kind == "ggn" else ba.AttentionHessianLinearOperator
            op = cls(model, loss_func, params, data)
        v = torch.randn(op.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(device)
        first = op @ v  # builds the cache / the factors (may synchronise)
        inv = op.inverse(damping=1e-2) if kind == "kfac" else None  # eigendecompositions (may synchronise)
        ctx = no_sync() if device == "cuda" else contextlib.nullcontext()
        with ctx:
            again = op @ v
            if kind == "kfac":
                solved = inv @ v
        results[device] = [first, again] + ([solved] if kind == "kfac" else [])
    for a, b in zip(results["cpu"], results["cuda"]):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-9, atol=1e-12)
