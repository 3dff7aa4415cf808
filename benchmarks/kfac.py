"""Benchmark: KFAC / EKFAC for transformers, ours vs curvlinops on the nn.Linear twin.

Setup (docs/benchmarks.md's transformer): float32, d=64, 4 heads, N=32 sequences, L in {64, 256};
a 2-block pre-LN ``TinyTransformer`` (attention + MLP + residuals, token-level cross-entropy over
all positions, vocabulary 16). Its logits are flattened to ``[N L, C]`` (what curvlinops' EKFAC
accepts; the data points are still the N sequences). ``params`` = every attention and
``nn.Linear`` parameter (LayerNorm and embedding excluded: KFAC has no factors for them).
curvlinops runs on the twin whose attention is computed from ``nn.Linear`` q/k/v/o projections
(what it can see); ours on the model itself.

Timed, as medians over ``--repeats`` and as multiples of one gradient (loss + backward for the
same parameters, timed right before each run):

* **build**: the Kronecker factors (EKFAC: and the eigenvalue corrections) plus the damped
  inverse (eigendecompositions; curvlinops computes its inverse on the first product, so its build
  includes one product);
* **apply**: one product of the damped inverse with the gradient (the preconditioned gradient).

A second table gives the relative Frobenius errors against the exact GGN blocks of a small model's
attention layer (``backpack_attention.kfac_quality``), and the angle between KFAC- and
exact-GGN-preconditioned gradients.

    python benchmarks/kfac.py            # full run, writes docs/benchmarks_kfac.md
    python benchmarks/kfac.py --quick    # seconds, prints only
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import platform
import statistics
import warnings

import torch
from torch import nn

warnings.filterwarnings("ignore", message=".*torch.jit.script.*is deprecated")

import backpack_attention as ba  # noqa: E402
from backpack_attention._compat import CURVLINOPS_VERSION  # noqa: E402
from backpack_attention.models import LinearProjectionAttention, TinyTransformer, default_problem  # noqa: E402

from common import load_average, load_warning, machine_line, median_time, timed_once  # noqa: E402
from curvlinops import EKFACLinearOperator, KFACInverseLinearOperator, KFACLinearOperator  # noqa: E402


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Flat(nn.Module):
    """Token logits ``[N, C, L]`` -> ``[N L, C]``."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, X):
        out = self.model(X)
        return out.transpose(1, 2).reshape(-1, out.shape[1])


def problem(L: int, N: int, d: int, heads: int, layers: int = 2, vocab: int = 16):
    torch.manual_seed(0)
    model = TinyTransformer(vocab=vocab, d_model=d, num_heads=heads, num_layers=layers, max_len=L,
                            readout="token", norm="pre", dtype=torch.float32).eval()
    X = torch.randint(0, vocab, (N, L))
    y = torch.randint(0, vocab, (N, L)).reshape(-1)
    flat = Flat(model)
    params = [p for n, p in model.named_parameters() if ".ln" not in n and not n.startswith(("embed", "pos", "ln"))]
    twin_model = copy.deepcopy(model)
    for b_t, b in zip(twin_model.blocks, model.blocks):
        b_t.attn = LinearProjectionAttention(b.attn)
    twin_params = []
    for b in twin_model.blocks:
        twin_params += b.attn.linear_params() + list(b.mlp.parameters())
    twin_params += list(twin_model.unembed.parameters())
    assert sum(p.numel() for p in twin_params) == sum(p.numel() for p in params)
    return flat, Flat(twin_model), nn.CrossEntropyLoss(), params, twin_params, [(X, y)]


def run_sizes(Ls, N, d, heads, repeats, damping, fisher_types):
    rows = []
    for L in Ls:
        model, twin_model, loss_func, params, twin_params, data = problem(L, N, d, heads)
        X, y = data[0]

        def gradient():
            loss = loss_func(model(X), y)
            torch.autograd.grad(loss, params)

        g = torch.autograd.grad(loss_func(model(X), y), params)
        g = [t.detach() for t in g]
        g_twin_shapes = [p.shape for p in twin_params]
        g_flat = torch.cat([t.reshape(-1) for t in g])
        g_twin = list(g_flat.split([math.prod(s) for s in g_twin_shapes]))
        g_twin = [t.reshape(s) for t, s in zip(g_twin, g_twin_shapes)]
        for ft in fisher_types:
            kw = dict(fisher_type=ft, check_deterministic=False)
            methods = {}
            for name, cls, approx in (("ours attention KFAC", ba.AttentionKFACLinearOperator, "attention"),
                                      ("ours expand KFAC", ba.AttentionKFACLinearOperator, "expand"),
                                      ("ours attention EKFAC", ba.AttentionEKFACLinearOperator, "attention")):
                state = {}

                def build(cls=cls, approx=approx, state=state):
                    op = cls(model, loss_func, params, data, kfac_approx=approx, **kw)
                    op.compute_kronecker_factors()
                    state["inv"] = op.inverse(damping)
                    state["op"] = op

                def apply(state=state):
                    return state["inv"] @ g

                methods[name] = (build, apply)
            for name, cls in (("curvlinops KFAC (twin)", KFACLinearOperator),
                              ("curvlinops EKFAC (twin)", EKFACLinearOperator)):
                state = {}

                def build(cls=cls, state=state):
                    op = cls(twin_model, loss_func, twin_params, data, kfac_approx="expand", **kw)
                    op.compute_kronecker_factors() if cls is KFACLinearOperator else op._maybe_compute_ekfac()
                    inv = KFACInverseLinearOperator(op, damping=damping, use_exact_damping=True)
                    inv @ g_twin  # curvlinops inverts on the first product
                    state["inv"], state["op"] = inv, op

                def apply(state=state):
                    return state["inv"] @ g_twin

                methods[name] = (build, apply)
            res = {}
            for name, (build, apply) in methods.items():
                tb, rb = median_time(build, repeats, gradient)
                ta, ra = median_time(apply, repeats, gradient)
                res[name] = (tb, rb, ta, ra)
            # sanity: our expand KFAC = curvlinops' KFAC on the twin (one product, float32)
            ours = ba.AttentionKFACLinearOperator(model, loss_func, params, data, kfac_approx="expand", **kw)
            ref = KFACLinearOperator(twin_model, loss_func, twin_params, data, kfac_approx="expand", **kw)
            a = torch.cat([t.reshape(-1) for t in ours @ g])
            b = torch.cat([t.reshape(-1) for t in ref @ g_twin])
            check = ((a - b).norm() / b.norm()).item()
            tg = statistics.median([timed_once(gradient) for _ in range(repeats)])
            rows.append((L, ft, sum(p.numel() for p in params), tg, res, check))
            print(f"L={L} fisher={ft} gradient {tg * 1e3:.1f} ms; expand vs curvlinops rel. diff {check:.1e}")
            for name, (tb, rb, ta, ra) in res.items():
                print(f"  {name:26s} build {tb * 1e3:8.1f} ms ({rb:5.2f}x)  apply {ta * 1e3:7.2f} ms ({ra:5.3f}x)")
    return rows


def quality(N: int, d: int, heads: int):
    """kfac_quality on the built-in small problem (1 layer, addition task, CE on the answers)."""
    model, loss_func, (X, y) = default_problem(num_sequences=N, d_model=d, num_heads=heads)
    q = ba.kfac_quality(model, loss_func, model.blocks[0].attn, (X, y))
    return q


def cooccurrence_quality(seed: int = 0):
    """Relative Frobenius error of KFAC's diagonal blocks against the exact GGN on the co-occurrence
    task of Yang et al. (examples/cooccurrence_phases.py: 60 sequences, 5 tokens, width 128, at
    initialisation), for the attention-aware and the generic recipe and EKFAC, computed exactly
    without forming the blocks (49152 in-projection entries): the model has one output per
    sequence, so the GGN is ``G = J^T diag(lam) J`` with ``J [60, P]`` (one backward pass per
    sequence) and, per block b,
    ``||K_bb - G_bb||^2 = ||K_bb||^2 - 2 sum_n lam_n j_nb^T K_bb j_nb + sum_nm lam_n lam_m (j_nb . j_mb)^2``,
    ``||K_bb||`` from the Kronecker factors (EKFAC: its corrected eigenvalues)."""
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    from cooccurrence_phases import M, CooccurrenceModel, cooccurrence_data

    class ColumnOutput(nn.Module):  # one logit per sequence as a column [N, 1], as the KFAC operators need
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, tokens):
            return self.model(tokens).unsqueeze(-1)

    tokens, y, _ = cooccurrence_data(seed)
    base = CooccurrenceModel(seed)
    model, loss_func, data = ColumnOutput(base), nn.BCEWithLogitsLoss(), [(tokens, y[:, None])]
    params = base.trained_parameters()  # in_proj_weight [3M, M], W.weight [M1, M]
    P, n = sum(p.numel() for p in params), tokens.shape[0]
    n_in = params[0].numel()
    blocks = {"W_Q": (0, M * M), "W_K": (M * M, 2 * M * M), "W_V": (2 * M * M, n_in), "W (MLP)": (n_in, P)}
    f = model(tokens)[:, 0]
    J = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(f[i], params, retain_graph=True)])
                     for i in range(n)])  # [n, P]
    lam = (torch.sigmoid(f) * (1 - torch.sigmoid(f))).detach() / n  # BCE (mean): d2 loss / d f_i^2
    kw = dict(check_deterministic=False)
    G = ba.AttentionGGNLinearOperator(model, loss_func, params, data, **kw)
    v = torch.randn(P, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    check = (G @ v - J.T @ (lam * (J @ v))).norm() / (G @ v).norm()
    assert check < 1e-10, f"J^T diag(lam) J differs from the GGN operator: {check:.1e}"
    ops = {"attention": ba.AttentionKFACLinearOperator(model, loss_func, params, data, kfac_approx="attention", **kw),
           "expand": ba.AttentionKFACLinearOperator(model, loss_func, params, data, kfac_approx="expand", **kw),
           "reduce": ba.AttentionKFACLinearOperator(model, loss_func, params, data, kfac_approx="reduce", **kw),
           "attention-reduce": ba.AttentionKFACLinearOperator(model, loss_func, params, data,
                                                              kfac_approx="attention-reduce", **kw),
           "ekfac": ba.AttentionEKFACLinearOperator(model, loss_func, params, data, kfac_approx="attention", **kw),
           "ekfac (attention-reduce)": ba.AttentionEKFACLinearOperator(model, loss_func, params, data,
                                                                       kfac_approx="attention-reduce", **kw)}
    out = {}
    for name, (a, b) in blocks.items():
        Jb = torch.zeros(P, n, dtype=torch.float64)
        Jb[a:b] = J[:, a:b].T
        gram = J[:, a:b] @ J[:, a:b].T
        g2 = (lam[:, None] * lam[None, :] * gram ** 2).sum()
        out[name] = {}
        for key, op in ops.items():
            k2 = 0.0
            for blk in op.blocks():  # the Kronecker blocks inside [a, b)
                lo, hi = int(blk.index.min()), int(blk.index.max())
                if a <= lo and hi < b:
                    if key == "ekfac":
                        k2 += op.corrections()[blk.name].pow(2).sum().item()
                    else:
                        k2 += (blk.out_factor.pow(2).sum() * blk.in_factor.pow(2).sum()).item()
                elif lo < b and hi >= a:
                    raise RuntimeError(f"Kronecker block {blk.name} straddles block {name}")
            cross = (lam * (Jb[a:b] * (op @ Jb)[a:b]).sum(0)).sum().item()
            out[name][key] = math.sqrt(max(k2 - 2 * cross + g2.item(), 0.0)) / math.sqrt(g2.item())
    return out, check.item()


def cooccurrence_markdown(res) -> str:
    q, check = res
    lines = ["## Errors against the exact GGN on the co-occurrence task (Yang et al., at initialisation)", "",
             "Relative Frobenius error of each diagonal block, exact (`G = J^T diag(lam) J` from one backward pass "
             f"per sequence, equal to `AttentionGGNLinearOperator`'s product to {check:.0e}; KFAC norms from "
             "the Kronecker factors); the model of `examples/cooccurrence_phases.py` (60 sequences, 5 tokens, "
             "width 128, 1 head, BCE), type-2 Fisher. The MLP weight W is an `nn.Linear` (attention and expand "
             "give it the same KFAC); the model sums its outputs over the positions, which is the case "
             "the `reduce` weight sharing is made for (`attention-reduce`: the attention-aware factors "
             "with it).", "",
             "| block | attention | expand | reduce | attention-reduce | ekfac (attention) | ekfac (attention-reduce) |",
             "|---|---|---|---|---|---|---|"]
    def f(x):  # the error formula cancels to rounding: below ~1e-7 it is zero to that precision
        return f"{x:.3g}" if x >= 1e-7 else "< 1e-7"

    for b, r in q.items():
        lines.append(f"| {b} | {f(r['attention'])} | {f(r['expand'])} | {f(r['reduce'])} | "
                     f"{f(r['attention-reduce'])} | {f(r['ekfac'])} | {f(r['ekfac (attention-reduce)'])} |")
    return "\n".join(lines) + "\n"


def markdown(rows, q, args) -> str:
    lines = ["# KFAC benchmarks", "",
             f"- command: `python benchmarks/kfac.py` (threads={torch.get_num_threads()}, repeats={args.repeats}, "
             f"damping={args.damping})",
             f"- machine: {machine_line()}; load average at the end "
             f"{load_average():.1f} (a shared machine: absolute times scale with the load, ratios less so)",
             f"- versions: python {platform.python_version()}, torch {torch.__version__}, curvlinops {CURVLINOPS_VERSION}",
             f"- model: 2-block pre-LN TinyTransformer, d={args.d}, {args.heads} heads, N={args.N}, float32, token-level CE "
             "(logits flattened to [N L, C]); params = every attention and nn.Linear parameter; curvlinops on the "
             "nn.Linear twin (q/k/v/o projections), kfac_approx='expand'",
             "- build = factors (+ EKFAC corrections) + damped inverse; apply = one damped-inverse product with the "
             "gradient; both as multiples of one gradient (loss + backward, same parameters)", ""]
    lines += load_warning(load_average())
    lines.append("| L | fisher | P | gradient | method | build | build (× grad) | apply | apply (× grad) |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for L, ft, P, tg, res, check in rows:
        for name, (tb, rb, ta, ra) in res.items():
            lines.append(f"| {L} | {ft} | {P} | {tg * 1e3:.1f} ms | {name} | {tb * 1e3:.0f} ms | {rb:.2f}× | "
                         f"{ta * 1e3:.2f} ms | {ra:.3f}× |")
    lines.append("")
    lines.append("Check: ours `expand` equals curvlinops' KFAC on the twin (relative difference of one product, float32): "
                 + ", ".join(f"L={L} {ft}: {check:.1e}" for L, ft, _, _, _, check in rows) + ".")
    lines.append("")
    targets = []
    for L, ft, P, tg, res, check in rows:
        ratio = res["ours attention KFAC"][0] / res["curvlinops KFAC (twin)"][0]
        apply = res["ours attention KFAC"][3]
        targets.append(f"- L={L}, {ft}: attention-aware build / curvlinops KFAC build = {ratio:.2f} (target ≤ 1.5: "
                       f"{'met' if ratio <= 1.5 else 'NOT met'}); apply = {apply:.3f}× a gradient (target ≤ 1: "
                       f"{'met' if apply <= 1 else 'NOT met'})")
    lines += ["Targets:", ""] + targets + [""]
    lines += [f"## Errors against the exact GGN (small model: `default_problem(num_sequences={args.qN}, "
              f"d_model={args.qd}, num_heads={args.qheads})`, attention layer, type-2)", "",
              "Relative Frobenius error of each block (`kfac_quality`); `best_kronecker` is the best single Kronecker "
              "product of that block (Van Loan–Pitsianis), the floor of any one-Kronecker-product approximation. "
              "`layer` is the whole layer's GGN (KFAC drops the couplings between blocks).", "", q.table(), ""]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, print only")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--damping", type=float, default=1e-3)
    ap.add_argument("--out", default="docs/benchmarks_kfac.md")
    ap.add_argument("--cooccurrence-only", action="store_true",
                    help="only the co-occurrence errors, written to --cooccurrence-out")
    ap.add_argument("--cooccurrence-out", default="docs/benchmarks_kfac_cooccurrence.md")
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    if args.quick:
        args.N, args.d, args.heads, Ls, args.repeats = 4, 16, 2, [8], 1
        args.qN, args.qd, args.qheads = 4, 8, 2
        fisher_types = ["mc"]
    else:
        args.N, args.d, args.heads, Ls = 32, 64, 4, [64, 256]
        args.qN, args.qd, args.qheads = 32, 16, 2
        fisher_types = ["mc", "type-2"]
    if args.cooccurrence_only:  # the co-occurrence errors alone (no timings), into their own file
        text = (f"# KFAC errors on the co-occurrence task\n\n- command: `python benchmarks/kfac.py "
                f"--cooccurrence-only`\n- machine: {machine_line()}\n\n"
                + cooccurrence_markdown(cooccurrence_quality()))
        print(text)
        with open(args.cooccurrence_out, "w") as f:
            f.write(text)
        return
    rows = run_sizes(Ls, args.N, args.d, args.heads, args.repeats, args.damping, fisher_types)
    q = quality(args.qN, args.qd, args.qheads)
    text = markdown(rows, q, args)
    if not args.quick:
        text += "\n" + cooccurrence_markdown(cooccurrence_quality())
    print(text)
    if not args.quick:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
