"""Hessian blocks from their data, weight, moment and loss terms (docs/math.md §4–5), by hand.

`attention_factors` returns the ingredients of every closed-form block: data (tokens with a ones
column), weights (per head, bias rows appended), attention moments (A, mu_i, Sigma_i,
kappa_i[g_i]) and loss terms (r_i, Lambda_i). This script rebuilds three blocks of a causal,
2-head attention layer trained with MSE from those terms alone, with einsum, and checks them
against `hessian_blocks` (which `tests/test_blocks.py` checks against torch.func):

* GGN (V, V)   = sum_i  mu_i mu_i^T (x) W_O^h Lambda_i W_O^h^T
* GGN (Q, Q)   = 1/d_K sum_i  x_i x_i^T (x) B_i^T Lambda_i B_i,   B_i = U^T Sigma_i W_K / sqrt(d_K)
* functional (Q, Q) = 1/d_K sum_i  x_i x_i^T (x) W_K^T kappa_i[g_i] W_K,   g_i = U r_i

Blocks are in the paper's layout ((input, output) row-major, bias row included); `hessian_blocks`
returns torch layout, so the script compares through `param_index`.

Run:  python examples/factor_terms.py
"""

import math

import torch
from torch import nn

from backpack_attention import MultiheadSelfAttention, attention_factors, hessian_blocks, param_index


def paper_to_torch(block: torch.Tensor, d_in: int, d_out: int) -> torch.Tensor:
    """Reorder a (W, W) block of a [d_in + 1, d_out] weight (bias row last) to param_index order (W rows only)."""
    idx = torch.tensor([a * d_out + c for c in range(d_out) for a in range(d_in)])
    return block[idx][:, idx]


def main():
    torch.manual_seed(0)
    N, L, E, H = 4, 6, 8, 2
    attn = MultiheadSelfAttention(E, H, causal=True, dtype=torch.float64)
    X, Y = torch.randn(N, L, E, dtype=torch.float64), torch.randn(N, L, E, dtype=torch.float64)
    f = attention_factors(attn, nn.MSELoss(), attn, (X, Y))
    blocks = hessian_blocks(attn, nn.MSELoss(), attn, (X, Y))
    x, w, mo, lo = f.data.X, f.weights, f.moments, f.loss
    dk = attn.head_dim
    print(f"data X {list(x.shape)}, W_Q {list(w.W_Q.shape)}, Sigma {list(mo.Sigma.shape)}, "
          f"kappa_g {list(mo.kappa_g.shape)}, Lambda {list(lo.Lambda.shape)} (token-separable: {lo.separable})")

    h = 1
    # GGN (V, V): moments (mu) x weights and loss (W_O Lambda W_O^T)
    WoL = torch.einsum("ce,nlef,df->nlcd", w.W_O[h], lo.Lambda, w.W_O[h])
    VV = torch.einsum("nla,nlb,nlcd->acbd", mo.M1[:, h], mo.M1[:, h], WoL).reshape((E + 1) * dk, -1)
    # GGN (Q, Q): data (x x^T) x weights, moments and loss (B^T Lambda B)
    B = torch.einsum("ae,nlab,bc->nlec", w.U[h], mo.Sigma[:, h], w.W_K[h]) / math.sqrt(dk)
    QQ = torch.einsum("nla,nlb,nlec,nlef,nlfd->acbd", x, x, B, lo.Lambda, B).reshape((E + 1) * dk, -1)
    # functional (Q, Q): data (x x^T) x weights and third moment contracted with the loss gradient
    P = torch.einsum("ac,nlab,bd->nlcd", w.W_K[h], mo.kappa_g[:, h], w.W_K[h])
    QQf = torch.einsum("nla,nlb,nlcd->acbd", x, x, P).reshape((E + 1) * dk, -1) / dk

    checks = [
        ("GGN (W_V, W_V)", VV, blocks[("W_V", h), ("W_V", h)].outer),
        ("GGN (W_Q, W_Q)", QQ, blocks[("W_Q", h), ("W_Q", h)].outer),
        ("functional (W_Q, W_Q)", QQf, blocks[("W_Q", h), ("W_Q", h)].functional),
    ]
    worst = 0.0
    for name, by_hand, ref in checks:
        err = ((paper_to_torch(by_hand, E, dk) - ref).abs().max() / ref.abs().max()).item()
        worst = max(worst, err)
        print(f"{name:24s} from terms vs hessian_blocks: relative error {err:.1e}")
    print(f"head {h}: ||GGN(Q,Q)|| = {QQ.norm():.3e}, ||functional(Q,Q)|| = {QQf.norm():.3e}, "
          f"||GGN(V,V)|| = {VV.norm():.3e}")
    assert len(param_index(attn, "W_Q", h)) == E * dk
    print(f"max relative error: {worst:.1e}")
    return worst


if __name__ == "__main__":
    main()
