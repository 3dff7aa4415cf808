"""Absolute product times of this checkout against another revision: did a change slow us down?

Ratios to one gradient (docs/benchmarks.md) move when the gradient itself gets faster or slower;
this script times the same three things in absolute terms for two versions of the package on the
benchmark transformer of docs/benchmarks.md (2-block pre-LN TinyTransformer, d=64, 4 heads, N=32,
float32, token-level CE, all attention parameters): one gradient, one GGN product and one Hessian
product of our operators (median of 9 interleaved repeats after a warm-up). Each measurement is a
fresh process; the two versions alternate (base, head, base, head, ...) so that drifting machine
load affects both alike.

Run:   python benchmarks/compare_revisions.py --base REV [--lengths 256 64] [--rounds 2]
Worker (one measurement; what the driver runs): python benchmarks/compare_revisions.py --worker REPO L

The base revision is checked out with ``git worktree add`` into a temporary folder (removed at the
end); both versions must have ``benchmarks/operators.py`` with its ``problem`` function.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker(repo: str, L: int) -> None:
    sys.path.insert(0, repo)
    sys.path.insert(0, os.path.join(repo, "benchmarks"))
    import torch

    torch.set_num_threads(2)
    spec = importlib.util.spec_from_file_location("opbench", os.path.join(repo, "benchmarks", "operators.py"))
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    import backpack_attention as ba

    assert ba.__file__.startswith(repo), ba.__file__
    model, loss_func, params, data = m.problem(L, 32, 64, 4, 2)
    X, y = data[0]
    G = ba.AttentionGGNLinearOperator(model, loss_func, params, data, check_deterministic=False)
    H = ba.AttentionHessianLinearOperator(model, loss_func, params, data, check_deterministic=False)
    v = torch.randn(G.shape[1])

    def grad():
        torch.autograd.grad(loss_func(model(X), y), params)

    fs = {"grad": grad, "ggn": lambda: G @ v, "hess": lambda: H @ v}
    for f in fs.values():
        f()
    ts = {k: [] for k in fs}
    for _ in range(9):
        for k, f in fs.items():
            t = time.perf_counter()
            f()
            ts[k].append(time.perf_counter() - t)
    print(repo, L, {k: round(statistics.median(t) * 1e3, 1) for k, t in ts.items()}, flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", help="git revision to compare with")
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 64])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--worker", nargs=2, metavar=("REPO", "L"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker[0], int(args.worker[1]))
        return 0
    if not args.base:
        ap.error("--base REV is required")
    base = tempfile.mkdtemp(prefix="ba-base-")
    subprocess.run(["git", "worktree", "add", "-f", "--detach", base, args.base], cwd=ROOT, check=True)
    try:
        for L in args.lengths:
            for _ in range(args.rounds):
                for repo in (base, ROOT):
                    subprocess.run([sys.executable, __file__, "--worker", repo, str(L)], check=True)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", base], cwd=ROOT, check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
