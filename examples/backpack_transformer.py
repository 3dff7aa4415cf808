"""BackPACK on a 2-layer pre-LN transformer: per-sample gradient norms, GGN diagonals, KFAC.

Model: Embedding -> [LayerNorm -> causal attention -> residual -> LayerNorm -> MLP(GELU) ->
residual] x 2 -> Linear, trained with a token-level cross-entropy (next-token prediction on
the built-in 5-digit addition sequences). Runs in a few seconds on a CPU::

    python examples/backpack_transformer.py

Steps:
1. ``BatchL2Grad``: per-sample gradient norms (e.g. for clipping or data valuation).
2. ``DiagGGNExact``: the exact GGN diagonal, summarised per block.
3. ``KFAC``: Kronecker factors, used to precondition a few gradient steps.
"""

from __future__ import annotations

import time
import warnings

import torch
from backpack import backpack
from torch import nn

import backpack_attention.extensions as bae
from backpack_attention.backpack_ext import extend
from backpack_attention.models import VOCAB, addition_data, language_model

warnings.filterwarnings("ignore", message="Full backward hook is firing")
warnings.filterwarnings("ignore", message="Encountered node that may break")


def data(num_sequences: int = 16):
    """Next-token prediction on ``XXXXX+YYYYY=ZZZZZZ``: inputs ``[N, 17]``, targets ``[N, 17]``."""
    X, y = addition_data(num_sequences, seed=0)
    tokens = torch.cat([X, y[:, -1:]], dim=1)
    return tokens[:, :-1], tokens[:, 1:]


def kfac_direction(p: torch.Tensor, damping: float) -> torch.Tensor:
    """``(F + damping I)^{-1} grad`` per parameter from its KFAC factors (damped factor-wise)."""
    factors = p.kfac
    eye = lambda k: torch.eye(k, dtype=p.dtype)  # noqa: E731
    g = p.grad
    if len(factors) == 1:  # dense block (biases, LayerNorm): [G]
        (G,) = factors
        return torch.linalg.solve(G + damping * eye(G.shape[0]), g.reshape(-1)).reshape(g.shape)
    first, second = factors  # weight: kron(first, second) acts on the row-major weight
    # factor-wise damping with sqrt(damping) on each factor
    d = damping**0.5
    left = torch.linalg.solve(first + d * eye(first.shape[0]), g)
    return torch.linalg.solve(second + d * eye(second.shape[0]), left.T).T


def main():
    torch.manual_seed(0)
    X, Y = data()
    model = language_model(vocab=VOCAB, d_model=24, num_heads=4, num_layers=2, causal=True)  # TinyTransformer preset
    model = extend(model, use_converter=True)  # residual adds -> SumModule, permute -> Permute
    loss_func = extend(nn.CrossEntropyLoss())
    params = dict(model.named_parameters())

    # 1. per-sample gradient norms -------------------------------------------------------
    t = time.perf_counter()
    with backpack(bae.BatchL2Grad()):
        loss = loss_func(model(X), Y)
        loss.backward()
    norms = sum(p.batch_l2 for p in params.values()).sqrt()
    print(f"loss {loss.item():.4f}; per-sample gradient norms ({time.perf_counter() - t:.2f}s):")
    print("  min {:.4f}  median {:.4f}  max {:.4f}".format(norms.min(), norms.median(), norms.max()))

    # 2. exact GGN diagonal per block ----------------------------------------------------
    model.zero_grad()
    t = time.perf_counter()
    with backpack(bae.DiagGGNExact()):
        loss_func(model(X), Y).backward()
    print(f"GGN diagonal ({time.perf_counter() - t:.2f}s): mean curvature per block")
    blocks = {}
    for name, p in params.items():
        block = name.split(".")[0] if not name.startswith("blocks") else ".".join(name.split(".")[:3])
        blocks.setdefault(block, []).append(p.diag_ggn_exact.reshape(-1))
    for block, diags in blocks.items():
        d = torch.cat(diags)
        print(f"  {block:<20s} {d.numel():6d} params   mean {d.mean():.3e}   max {d.max():.3e}")

    # 3. KFAC-preconditioned steps -------------------------------------------------------
    lr, damping = 0.3, 0.1  # KFAC with one MC sample is noisy: damp generously
    for step in range(5):
        model.zero_grad()
        t = time.perf_counter()
        with backpack(bae.KFAC(mc_samples=1)):
            loss = loss_func(model(X), Y)
            loss.backward()
        with torch.no_grad():
            for p in params.values():
                p -= lr * kfac_direction(p, damping)
        print(f"KFAC step {step}: loss {loss.item():.4f}  ({time.perf_counter() - t:.2f}s)")
    with torch.no_grad():
        print(f"final loss {loss_func(model(X), Y).item():.4f}")


if __name__ == "__main__":
    main()
