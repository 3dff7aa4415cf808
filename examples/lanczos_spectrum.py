"""eigsh and a Lanczos spectral density of the attention Hessian on the built-in model.

    python examples/lanczos_spectrum.py [--out spectrum.png]
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy.sparse.linalg import eigsh

from backpack_attention._compat import LanczosApproximateSpectrumCached, xtrace
from backpack_attention.models import default_problem
from backpack_attention.operators import AttentionGGNLinearOperator, AttentionHessianLinearOperator


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="save the density plot here (needs matplotlib)")
    args = ap.parse_args(argv)

    model, loss_func, (X, y) = default_problem(num_sequences=64)  # float64, 1 layer, d=16, 2 heads
    data = [(X[:32], y[:32]), (X[32:], y[32:])]
    params = list(model.attention_layers()[0].parameters())

    H = AttentionHessianLinearOperator(model, loss_func, params, data)  # full Hessian
    F = AttentionHessianLinearOperator(model, loss_func, params, data, part="functional")
    G = AttentionGGNLinearOperator(model, loss_func, params, data)
    v0 = np.ones(H.shape[0])
    for name, op in (("Hessian", H), ("GGN", G), ("functional", F)):
        top = eigsh(op.to_scipy(), k=3, which="LA", v0=v0, tol=1e-6, return_eigenvectors=False)
        msg = f"{name:>10}: top {np.sort(top)[::-1]}"
        if name != "GGN":  # the GGN is PSD with many ~0 eigenvalues: "SA" converges slowly
            bottom = eigsh(op.to_scipy(), k=3, which="SA", v0=v0, tol=1e-6, return_eigenvectors=False)
            msg += f", bottom {np.sort(bottom)}"
        print(msg)
    print("tr(GGN) ~", xtrace(G, 100))

    lo, hi = eigsh(H.to_scipy(), k=2, which="BE", v0=v0, tol=1e-3, return_eigenvectors=False)
    density = LanczosApproximateSpectrumCached(H, ncv=64, boundaries=(lo, hi))
    grid, rho = density.approximate_spectrum(num_repeats=3, num_points=512, kappa=3.0)
    print(f"spectral density on [{lo:.3g}, {hi:.3g}], integral {np.trapezoid(rho, grid):.3f}")
    if args.out:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        plt.semilogy(grid, rho)
        plt.xlabel("eigenvalue")
        plt.ylabel("density")
        plt.title("Attention Hessian spectral density (Lanczos)")
        plt.savefig(args.out, dpi=120)
        print("wrote", args.out)


if __name__ == "__main__":
    main()
