"""Benchmark: one dense within-head (W_Q, W_Q) Hessian block, closed form vs torch.func.

Setup (default): one ``MultiheadSelfAttention(64, 4, dtype=float64)`` (d_K = 16, default init),
``nn.MSELoss()``, random inputs ``X [8, 64, 64]`` and targets. The block is
``blocks[("W_Q", 0), ("W_Q", 0)]``: the 16 rows of ``in_proj_weight`` of head 0, i.e. 1024 x 1024.

* **ours**: :func:`backpack_attention.attention_factors` (timed separately), then the block from
  the factors (``HessianBlocks(factors)[key]`` with ``.outer``, ``.functional`` and ``.full``).
* **torch.func**: the loss as a function of only those 16 rows (``functional_call`` with the rows
  substituted into ``in_proj_weight``) of ``module.to_torch()`` (an ``nn.MultiheadAttention`` with
  the same weights, so the reference is independent of this package), under
  ``sdpa_kernel(SDPBackend.MATH)``:

  * full block: ``torch.func.hessian`` (= ``jacfwd(jacrev)``);
  * GGN block: ``J^T (2/numel) J`` with ``J`` from ``torch.func.jacfwd`` of the output (1024
    tangents, the cheaper direction here). ``jacrev`` needs one VJP per output entry
    (N L E = 32768): it is timed on the first ``--jacrev-rows`` rows of ``J`` and scaled up
    (marked *estimated*); ``--quick`` runs the whole ``jacrev`` instead.

Every part of our block (outer, functional = full - outer, full) is checked against the reference
(max abs difference / max abs reference entry; must be < 1e-10), so both sides compute the same
numbers. One gradient (forward + backward of the loss w.r.t. all module parameters, default fused
kernel) is timed for scale. Times are medians of ``--repeats`` runs after one warm-up; the
expensive torch.func runs use ``--ref-repeats`` (default 1) after a warm-up on one sequence.

    python benchmarks/blocks.py            # full run (about 2 minutes), writes docs/benchmarks_blocks.md
    python benchmarks/blocks.py --quick    # seconds, prints only
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone

import torch
from torch import nn
from torch.func import functional_call, hessian, jacfwd, jacrev, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from common import fill_defaults, load_average, machine_line

from backpack_attention import MultiheadSelfAttention, attention_factors
from backpack_attention.derivatives.blocks import HessianBlocks

DT = torch.float64
TOL = 1e-10
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "benchmarks_blocks.md")


def timed(f, repeats: int, warmup: bool = True):
    """``(median seconds, last result)`` of ``repeats`` calls of ``f`` (after one warm-up call)."""
    if warmup:
        f()
    ts, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = f()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), out


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a - ref).abs().max() / ref.abs().max().clamp_min(1e-300)).item()


def problem(d: int, heads: int, L: int, N: int, seed: int = 0):
    torch.manual_seed(seed)
    module = MultiheadSelfAttention(d, heads, dtype=DT)
    X = torch.randn(N, L, d, dtype=DT)
    Y = torch.randn(N, L, d, dtype=DT)
    return module, nn.MSELoss(), X, Y


def reference_functions(module: MultiheadSelfAttention, loss_func, dk: int):
    """Output and loss of the vanilla ``nn.MultiheadAttention`` copy as functions of head 0's W_Q rows."""
    mha = module.to_torch(batch_first=True)
    base = {n: p.detach() for n, p in mha.named_parameters()}
    W_in = base["in_proj_weight"]
    rows0 = W_in[:dk].clone()  # W_Q of head 0: rows 0..dk-1 of in_proj_weight (docs/math.md §5.3)

    def out_of(rows, X):
        params = dict(base)
        params["in_proj_weight"] = torch.cat([rows, W_in[dk:]])
        return functional_call(mha, params, (X, X, X), {"need_weights": False})[0]

    def loss_of(rows, X, Y):
        return loss_func(out_of(rows, X), Y)

    return rows0, out_of, loss_of


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    d, H, L, N = args.d, args.heads, args.L, args.N
    dk = d // H
    module, loss_func, X, Y = problem(d, H, L, N)
    key = (("W_Q", 0), ("W_Q", 0))
    P = dk * d
    res = {"config": dict(d=d, heads=H, d_K=dk, L=L, N=N, block=f"{P} x {P}")}
    t: dict = {}

    # ---- scale: one gradient -----------------------------------------------------------------
    params = list(module.parameters())
    t["grad"], _ = timed(lambda: torch.autograd.grad(loss_func(module(X), Y), params), 4 * args.repeats)

    # ---- ours ---------------------------------------------------------------------------------
    def factors():
        return attention_factors(module, loss_func, module, (X, Y))

    def block(f):
        b = HessianBlocks(f)[key]
        return b.outer, b.functional, b.full

    t["factors"], fac = timed(factors, args.repeats)
    t["block"], (outer, functional, full) = timed(lambda: block(fac), args.repeats)
    t["ours_total"], _ = timed(lambda: block(factors()), args.repeats)

    # ---- torch.func reference (math kernel, vanilla nn.MultiheadAttention) ----------------------
    rows0, out_of, loss_of = reference_functions(module, loss_func, dk)
    c = 2.0 / Y.numel()

    def ref_hessian(Xb, Yb):
        return hessian(loss_of)(rows0, Xb, Yb).reshape(P, P)

    def ref_ggn_jacfwd(Xb):
        J = jacfwd(out_of)(rows0, Xb).reshape(-1, P)
        return c * J.T @ J

    def ref_ggn_jacrev(Xb):
        J = jacrev(out_of, chunk_size=args.jacrev_chunk)(rows0, Xb).reshape(-1, P)
        return c * J.T @ J

    def jacrev_rows(Xb, n_rows):
        """The first ``n_rows`` rows of J by VJPs (what jacrev does for every one of its rows)."""
        out, pullback = vjp(lambda r: out_of(r, Xb), rows0)
        basis = torch.eye(out.numel(), n_rows, dtype=DT).T.reshape(n_rows, *out.shape)
        return vmap(pullback, chunk_size=args.jacrev_chunk)(basis)[0].reshape(n_rows, P)

    with sdpa_kernel(SDPBackend.MATH):
        warm = not args.quick  # full size: warm up on one sequence instead of a full extra run
        if warm:
            ref_hessian(X[:1], Y[:1])
            ref_ggn_jacfwd(X[:1])
        t["hessian"], H_ref = timed(lambda: ref_hessian(X, Y), args.ref_repeats, warmup=not warm)
        t["jacfwd"], G_ref = timed(lambda: ref_ggn_jacfwd(X), args.ref_repeats, warmup=not warm)
        n_out = Y.numel()
        if args.quick or args.jacrev_rows >= n_out:
            t["jacrev"], G_rev = timed(lambda: ref_ggn_jacrev(X), args.ref_repeats, warmup=not warm)
            res["jacrev_estimated"] = False
            res["err_jacrev"] = rel_err(G_rev, G_ref)
        else:
            n_rows = args.jacrev_rows
            if warm:
                jacrev_rows(X, min(n_rows, args.jacrev_chunk))
            t_part, _ = timed(lambda: jacrev_rows(X, n_rows), args.ref_repeats, warmup=not warm)
            t["jacrev"] = t_part * n_out / n_rows
            res["jacrev_estimated"] = True
            res["jacrev_rows"] = n_rows
        res["n_out"] = n_out

    res["err"] = {
        "full": rel_err(full, H_ref),
        "outer": rel_err(outer, G_ref),
        "functional": rel_err(functional, H_ref - G_ref),
    }
    res["max_rel_err"] = max(res["err"].values())
    res["times"] = t
    res.update(quick=args.quick, repeats=args.repeats, ref_repeats=args.ref_repeats)
    return res


def fmt_s(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def table(res: dict) -> str:
    t = res["times"]
    ours = t["ours_total"]
    jr = "jacrev, estimated" if res["jacrev_estimated"] else "jacrev"
    rows = [
        ("one gradient (fwd + bwd, all params, fused kernel)", t["grad"], ""),
        ("ours: `attention_factors`", t["factors"], ""),
        ("ours: block from factors (outer, functional, full)", t["block"], ""),
        ("**ours: total** (factors + block)", ours, "1.0"),
        ("torch.func: full block, `hessian`", t["hessian"], f"{t['hessian'] / ours:.1f}"),
        ("torch.func: GGN block, `jacfwd` + J^T (2/numel) J", t["jacfwd"], f"{t['jacfwd'] / ours:.1f}"),
        (f"torch.func: GGN block, `{jr}` + J^T (2/numel) J", t["jacrev"], f"{t['jacrev'] / ours:.1f}"),
        ("torch.func: full + GGN (`hessian` + `jacfwd`)", t["hessian"] + t["jacfwd"],
         f"{(t['hessian'] + t['jacfwd']) / ours:.1f}"),
    ]
    g = t["grad"]
    lines = ["| what | median time | / one gradient | torch.func / ours total |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {fmt_s(s)} | {s / g:.0f} | {r} |" for name, s, r in rows]
    return "\n".join(lines)


def report(res: dict, command: str) -> str:
    c, e = res["config"], res["err"]
    machine = f"{machine_line()}, {platform.system()} {platform.machine()}"
    notes = [
        f"- Command: `{command}`",
        f"- Date (UTC): {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M')}",
        f"- Machine: {machine}",
        f"- Problem: one `MultiheadSelfAttention({c['d']}, {c['heads']}, dtype=float64)` (d_K = {c['d_K']}, "
        f"default init), `nn.MSELoss()`, X and targets `randn({c['N']}, {c['L']}, {c['d']})`; "
        f"block `blocks[(\"W_Q\", 0), (\"W_Q\", 0)]`, {c['block']}.",
        f"- Check: relative error (max abs difference / max abs reference) of our block vs torch.func: "
        f"full {e['full']:.2e}, outer {e['outer']:.2e}, functional {e['functional']:.2e} "
        f"(max {res['max_rel_err']:.2e}, required < {TOL:g}).",
        "- Ours: `attention_factors` runs the model once with the default (fused) kernel and collects "
        "the factors of the whole layer (all heads: A, M1, queries, head outputs, loss terms); the block "
        "step computes head 0's second moments (Sigma_i, kappa_i[g_i]) and builds the (Q, 0) block, outer "
        "and functional, from them, chunk by chunk over the tokens. Other blocks of the same layer reuse "
        "the factors.",
        "- torch.func: on `module.to_torch()` (same weights) under `sdpa_kernel(SDPBackend.MATH)`, the "
        f"loss/output as a function of only the {c['d_K']} rows of `in_proj_weight` of head 0.",
    ]
    if res["jacrev_estimated"]:
        notes.append(
            f"- `jacrev` needs one VJP per output entry ({res['n_out']}); its time is the measured time "
            f"for the first {res['jacrev_rows']} rows of J scaled by {res['n_out']}/{res['jacrev_rows']} "
            "(the J^T J product is left out).")
    if "err_jacrev" in res:
        notes.append(f"- jacrev vs jacfwd GGN: relative error {res['err_jacrev']:.2e}.")
    ref = (f"median of {res['ref_repeats']} run(s) after a warm-up run" if res["quick"] else
           f"median of {res['ref_repeats']} run(s) after a warm-up on one sequence (a full extra run "
           "would double the script's time)")
    notes.append(
        f"- Times: ours: median of {res['repeats']} runs after a warm-up (the gradient: {4 * res['repeats']} "
        f"runs); torch.func: "
        f"{ref}. 1-minute load average {res['load'][0]:.1f} at the start and {res['load'][1]:.1f} at the end "
        f"on {os.cpu_count()} cores (other jobs may share the machine, so expect some noise).")
    return "\n".join(["# Benchmark: one dense within-head (W_Q, W_Q) Hessian block", "",
                      table(res), "", *notes, ""])


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny problem, seconds; prints only")
    p.add_argument("--d", type=int, default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--L", type=int, default=None)
    p.add_argument("--N", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None, help="repeats for ours and the gradient")
    p.add_argument("--ref-repeats", type=int, default=1, help="repeats for the torch.func runs")
    p.add_argument("--jacrev-rows", type=int, default=1024, help="rows of J timed for the jacrev estimate")
    p.add_argument("--jacrev-chunk", type=int, default=1024, help="chunk_size of jacrev's vmap")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None,
                   help=f"markdown output (default: {DEFAULT_OUT} for the full run, none for --quick)")
    args = p.parse_args(argv)
    small, big = dict(d=8, heads=2, L=6, N=2, repeats=3), dict(d=64, heads=4, L=64, N=8, repeats=5)
    return fill_defaults(args, small, big, DEFAULT_OUT)


def main(argv=None) -> int:
    args = parse(argv)
    command = "python benchmarks/blocks.py " + " ".join(sys.argv[1:] if argv is None else argv)
    load0 = load_average()
    res = run(args)
    res["load"] = (load0, load_average())
    text = report(res, command.strip())
    print(text)
    print(f"max relative error: {res['max_rel_err']:.3e}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            fh.write(text)
        print(f"wrote {args.out}")
    if not res["max_rel_err"] < TOL:
        print(f"FAIL: relative error {res['max_rel_err']:.3e} >= {TOL:g}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
