"""Benchmark: attention GGN / Hessian products and eigsh, ours vs curvlinops.

Setup: float32, d=64, 4 heads, N=32 sequences, L in {64, 256}; a 2-block pre-LN transformer
(``models.TinyTransformer``: attention + MLP + residuals, token-level cross-entropy over all
positions); ``params`` = all parameters of both attention layers. curvlinops' operators run
under ``sdpa_kernel(SDPBackend.MATH)`` (they need forward-mode AD through attention); ours run
with the fused kernel. Times are medians of ``--repeats`` runs after one warm-up; ratios are to
one gradient (loss + backward for the same params, fused kernel): the median over repeats of
(product time / gradient time), each gradient timed right before the product (robust to load drift
on shared machines). ``eigsh`` (top-5 of the GGN, same ``v0`` and ``tol`` for both, our time
including the cache build) runs for each attention layer's whole parameter set and for all
attention parameters together; its times are medians of ``--eig-repeats`` interleaved runs.

Whole-model row: a GPT-2-style model (HuggingFace ``GPT2LMHeadModel`` from a config: n_embd=64,
4 heads, 2 layers, vocabulary 16, no dropout; N=32, L in {64, 256}, float32, next-token
cross-entropy) converted by ``convert_attention``; ``params`` = ALL parameters (embeddings,
LayerNorms, attention, MLPs). GGN and Hessian products as multiples of one gradient on all
parameters (converted model, fused kernel), ours against curvlinops on the unconverted model with
eager attention (``attn_implementation="eager"``, math kernel). Needs ``transformers`` (skipped
with a note if it is missing).

    python benchmarks/operators.py            # full run (a few minutes), writes docs/benchmarks.md
    python benchmarks/operators.py --quick    # seconds, prints only
    python benchmarks/operators.py --only whole-model   # just the GPT-2 row, prints only
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, eigsh
from torch import nn

from common import load_average, machine_line, median_time, timed_once

from backpack_attention._compat import CURVLINOPS_VERSION, curvlinops_operator, torch_math_attention
from backpack_attention.models import TinyTransformer, torch_twin
from backpack_attention.operators import AttentionGGNLinearOperator, AttentionHessianLinearOperator


def problem(L: int, N: int, d: int, heads: int, layers: int, vocab: int = 16):
    torch.manual_seed(0)
    model = TinyTransformer(vocab=vocab, d_model=d, num_heads=heads, num_layers=layers, max_len=L,
                            readout="token", norm="pre", dtype=torch.float32).eval()  # logits [N, C, L]
    X = torch.randint(0, vocab, (N, L))
    y = torch.randint(0, vocab, (N, L))
    params = [p for a in model.attention_layers() for p in a.parameters()]
    return model, nn.CrossEntropyLoss(), params, [(X, y)]


def eigsh_run(op, v0, k, tol, ctx=None):
    """Top-k (largest algebraic) eigenvalues; returns (seconds, number of matvecs)."""
    A = op.to_scipy(dtype=np.float32)
    count = [0]

    def mv(x):
        count[0] += 1 if x.ndim == 1 else x.shape[1]
        return A.matvec(x)

    B = LinearOperator(A.shape, matvec=mv, dtype=np.float32)
    t = time.perf_counter()
    if ctx is None:
        eigsh(B, k=k, which="LA", v0=v0, tol=tol, return_eigenvectors=False)
    else:
        with ctx():
            eigsh(B, k=k, which="LA", v0=v0, tol=tol, return_eigenvectors=False)
    return time.perf_counter() - t, count[0]


def time_our_products(row: dict, model, loss_func, params, data, v, repeats: int, gradient) -> None:
    """Our GGN and Hessian product: the first one (which builds the per-batch cache) and the median
    of ``repeats`` (seconds and ratio to ``gradient``), into ``row``."""
    G = AttentionGGNLinearOperator(model, loss_func, params, data, check_deterministic=False)
    H = AttentionHessianLinearOperator(model, loss_func, params, data, check_deterministic=False)
    for key, op in (("ggn", G), ("hess", H)):
        row[f"{key}_first"] = timed_once(lambda op=op: op @ v)
        row[key], row[f"r_{key}"] = median_time(lambda op=op: op @ v, repeats, gradient)


def run(L, N, d, heads, layers, repeats, eig_k, eig_tol, eig_repeats=5, do_eigsh=True):
    model, loss_func, params, data = problem(L, N, d, heads, layers)
    # the model a curvlinops user has today: nn.MultiheadAttention with the same weights; each
    # layer's parameters in the order of ours (in_proj weight and bias, out_proj weight and bias)
    twin = torch_twin(model)
    twin_layers = [list(a.parameters()) for a in twin.attention_layers()]
    twin_params = [p for ps in twin_layers for p in ps]
    (X, y), = data
    with torch.no_grad(), torch_math_attention():  # the twin computes the same function
        assert torch.allclose(model(X), twin(X), atol=1e-4), "nn.MultiheadAttention twin differs"
    P = sum(p.numel() for p in params)
    v = torch.randn(P, generator=torch.Generator().manual_seed(0))
    row = {"L": L, "P": P}

    def gradient():
        torch.autograd.grad(loss_func(model(X), y), params)

    def gradient_torch():
        torch.autograd.grad(loss_func(twin(X), y), twin_params)

    def forward():  # the unit of the eigsh cost model: one no-grad forward pass, fused kernel
        with torch.no_grad():
            model(X)

    row["grad"] = median_time(gradient, repeats)
    row["fwd"] = median_time(forward, repeats)
    row["grad_torch"], row["r_grad_torch"] = median_time(gradient_torch, repeats, gradient)
    for key, net, ps in (("clt", twin, twin_params), ("cl", model, params)):
        with torch_math_attention():
            Gc = curvlinops_operator("ggn", net, loss_func, ps, data, check_deterministic=False)
            Hc = curvlinops_operator("hessian", net, loss_func, ps, data, check_deterministic=False)
            row[f"{key}_ggn"], row[f"r_{key}_ggn"] = median_time(lambda: Gc @ v, repeats, gradient)
            row[f"{key}_hess"], row[f"r_{key}_hess"] = median_time(lambda: Hc @ v, repeats, gradient)
    time_our_products(row, model, loss_func, params, data, v, repeats, gradient)
    if do_eigsh:
        layers = [list(a.parameters()) for a in model.attention_layers()]
        sets = [(f"layer {i + 1} (whole layer)", ps, tp) for i, (ps, tp) in enumerate(zip(layers, twin_layers))]
        sets.append(("all attention layers", params, twin_params))
        row["eig"] = []
        for label, ps, tps in sets:
            Pk = sum(p.numel() for p in ps)
            v0 = np.random.default_rng(0).standard_normal(Pk).astype(np.float32)
            runs = {"ours": [], "clt": [], "cl": []}
            fwd_units = {"ours": [], "clt": []}  # per run: time per product / one forward pass timed just before
            for _ in range(eig_repeats):  # interleaved, so that load drift hits all three alike
                Gk = AttentionGGNLinearOperator(model, loss_func, ps, data, check_deterministic=False)
                f = median_time(forward, 3)
                runs["ours"].append(eigsh_run(Gk, v0, eig_k, eig_tol))  # includes building the cache
                fwd_units["ours"].append(runs["ours"][-1][0] / runs["ours"][-1][1] / f)
                for key, net, ps_ in (("clt", twin, tps), ("cl", model, ps)):
                    with torch_math_attention():
                        Gck = curvlinops_operator("ggn", net, loss_func, ps_, data, check_deterministic=False)
                    f = median_time(forward, 3)
                    runs[key].append(eigsh_run(Gck, v0, eig_k, eig_tol, ctx=torch_math_attention))
                    if key in fwd_units:
                        fwd_units[key].append(runs[key][-1][0] / runs[key][-1][1] / f)
            res = {"label": label, "P": Pk}
            for key, rs in runs.items():  # median time; the number of products is the same every run
                res[key] = (statistics.median(t for t, _ in rs), rs[0][1])
            res["fwd_units"] = {k: statistics.median(u) for k, u in fwd_units.items()}
            row["eig"].append(res)
    return row


def fmt_table(rows):
    """Products of the GGN / Hessian on all attention parameters, as ratios to one gradient."""
    head = ("| L | P | gradient (ours / nn.MHA) | curvlinops GGN: nn.MHA | our module | curvlinops Hessian: nn.MHA "
            "| our module | ours GGN (first) | ours Hessian (first) |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        g = r["grad"]
        x = lambda k: f"{r[k] * 1e3:.1f} ms ({r['r_' + k]:.2f}×)"  # noqa: E731
        lines.append(f"| {r['L']} | {r['P']} | {g * 1e3:.1f} ms (1×) / {x('grad_torch')} | {x('clt_ggn')} | "
                     f"{x('cl_ggn')} | {x('clt_hess')} | {x('cl_hess')} | "
                     f"{x('ggn')} ({r['ggn_first'] * 1e3:.0f} ms) | {x('hess')} ({r['hess_first'] * 1e3:.0f} ms) |")
    return "\n".join(lines)


def fmt_eigsh(rows, eig_k):
    """eigsh top-k of the GGN, per parameter set: curvlinops (on nn.MultiheadAttention and on our module) vs ours,
    and the time per product of each run in units of one forward pass of the model (no grad, fused kernel) timed
    right before that run (median over runs)."""
    lines = [f"| L | params | P | eigsh top-{eig_k} GGN: curvlinops, nn.MHA | curvlinops, our module | ours "
             "| speed-up vs nn.MHA / vs our module | per product, in forward passes: curvlinops nn.MHA / ours |",
             "|" + "---|" * 8]
    for r in rows:
        for e in r.get("eig", []):
            (t, mv), (tc, mvc), (to, mvo) = e["clt"], e["cl"], e["ours"]
            lines.append(f"| {r['L']} | {e['label']} | {e['P']} | {t:.2f} s ({mv} mv) | {tc:.2f} s ({mvc} mv) | "
                         f"{to:.2f} s ({mvo} mv) | {t / to:.1f}× / {tc / to:.1f}× | "
                         f"{e['fwd_units']['clt']:.1f} / {e['fwd_units']['ours']:.1f} |")
    lines.append("")
    lines.append("One forward pass (no grad, fused kernel): "
                 + ", ".join(f"L={r['L']}: {r['fwd'] * 1e3:.1f} ms" for r in rows) + ".")
    return "\n".join(lines)


COST_MODEL = (
    "Cost model for eigsh: both sides need the same number of products, so the speed-up is the per-product "
    "one (last column of the eigsh table, in forward passes). Our GGN product of a layer is a JVP and a VJP "
    "through that layer and every layer above it; each needs at least the matrix products of a forward pass "
    "through those layers (the attention cores about twice those), so for the lowest layer it stays above "
    "about two forward passes, plus the cache build. A 5× speed-up for the lowest layer therefore needs "
    "curvlinops at more than about 10 forward passes per product.")


def fmt_targets(rows):
    """Whether the targets (GGN <= 1.5x, Hessian <= 2.5x a gradient, eigsh >= 5x faster) are met."""
    out = ["", "Targets (per L): GGN-vector product ≤ 1.5× a gradient, Hessian ≤ 2.5×, "
           "eigsh of a whole attention layer's GGN ≥ 5× faster than curvlinops (on nn.MultiheadAttention, "
           "what curvlinops users have today; in brackets: on our module).", ""]
    ok = lambda c: "met" if c else "NOT met"  # noqa: E731
    for r in rows:
        line = (f"- L={r['L']}: GGN {r['r_ggn']:.2f}× ({ok(r['r_ggn'] <= 1.5)}), "
                f"Hessian {r['r_hess']:.2f}× ({ok(r['r_hess'] <= 2.5)})")
        for e in r.get("eig", []):
            if "whole layer" in e["label"]:
                sp, spc = e["clt"][0] / e["ours"][0], e["cl"][0] / e["ours"][0]
                line += f", eigsh {e['label'].split(' (')[0]} {sp:.1f}× ({ok(sp >= 5)}) [{spc:.1f}×]"
        out.append(line)
    out += ["", COST_MODEL]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# whole-model row: a GPT-2-style HuggingFace model, all parameters
# ---------------------------------------------------------------------------------------------
class _HFLogits(nn.Module):
    """``input_ids`` -> token logits ``[N, V, L]`` (cross-entropy over all positions)."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, X):
        return self.lm(input_ids=X).logits.transpose(1, 2)


def gpt2_problem(L: int, N: int, d: int, heads: int, layers: int, vocab: int = 16):
    """(converted net, unconverted net with eager attention, loss, data); the same weights."""
    import copy

    import transformers

    import backpack_attention as ba

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=layers, n_embd=d, n_head=heads, vocab_size=vocab, n_positions=L,
                                  attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    lm = transformers.GPT2LMHeadModel(cfg).float().eval()
    eager = copy.deepcopy(lm)
    eager.set_attn_implementation("eager")
    ours = ba.convert_attention(lm)
    ids = torch.randint(0, vocab, (N, L + 1))
    return _HFLogits(ours), _HFLogits(eager), nn.CrossEntropyLoss(), [(ids[:, :-1], ids[:, 1:])]


def run_whole_model(L, N, d, heads, layers, repeats):
    """Products on ALL parameters of the GPT-2-style model, as multiples of one gradient."""
    net, eager, loss_func, data = gpt2_problem(L, N, d, heads, layers)
    (X, y), = data
    params, eager_params = list(net.parameters()), list(eager.parameters())
    with torch.no_grad(), torch_math_attention():
        assert torch.allclose(net(X), eager(X), atol=1e-4), "converted GPT-2 differs from the eager one"
    P = sum(p.numel() for p in params)
    v = torch.randn(P, generator=torch.Generator().manual_seed(0))
    row = {"L": L, "P": P, "N": N, "d": d, "heads": heads, "layers": layers}

    def gradient():
        torch.autograd.grad(loss_func(net(X), y), params)

    def gradient_eager():
        torch.autograd.grad(loss_func(eager(X), y), eager_params)

    row["grad"] = median_time(gradient, repeats)
    row["grad_eager"], row["r_grad_eager"] = median_time(gradient_eager, repeats, gradient)
    with torch_math_attention():
        Gc = curvlinops_operator("ggn", eager, loss_func, eager_params, data, check_deterministic=False)
        Hc = curvlinops_operator("hessian", eager, loss_func, eager_params, data, check_deterministic=False)
        row["cl_ggn"], row["r_cl_ggn"] = median_time(lambda: Gc @ v, repeats, gradient)
        row["cl_hess"], row["r_cl_hess"] = median_time(lambda: Hc @ v, repeats, gradient)
    time_our_products(row, net, loss_func, params, data, v, repeats, gradient)
    return row


def fmt_whole_model(rows):
    """Products of the GGN / Hessian on ALL parameters of the GPT-2-style model, as ratios to one gradient."""
    lines = ["| model | L | P (all) | gradient (converted / eager) | curvlinops GGN (eager) | ours GGN (first) "
             "| curvlinops Hessian (eager) | ours Hessian (first) |", "|" + "---|" * 8]
    for r in rows:
        x = lambda k: f"{r[k] * 1e3:.1f} ms ({r['r_' + k]:.2f}×)"  # noqa: E731
        lines.append(f"| GPT-2 ({r['layers']} layers, d={r['d']}, {r['heads']} heads, N={r['N']}) | {r['L']} | {r['P']} "
                     f"| {r['grad'] * 1e3:.1f} ms (1×) / {x('grad_eager')} | {x('cl_ggn')} | "
                     f"{x('ggn')} ({r['ggn_first'] * 1e3:.0f} ms) | {x('cl_hess')} | "
                     f"{x('hess')} ({r['hess_first'] * 1e3:.0f} ms) |")
    return "\n".join(lines)


def fmt_whole_model_targets(rows):
    ok = lambda c: "met" if c else "NOT met"  # noqa: E731
    out = ["", "Whole-model targets (GPT-2-style, all parameters): GGN-vector product ≤ 1.5× a gradient, "
           "Hessian ≤ 2.5×.", ""]
    for r in rows:
        out.append(f"- L={r['L']}: GGN {r['r_ggn']:.2f}× ({ok(r['r_ggn'] <= 1.5)}; curvlinops {r['r_cl_ggn']:.2f}×), "
                   f"Hessian {r['r_hess']:.2f}× ({ok(r['r_hess'] <= 2.5)}; curvlinops {r['r_cl_hess']:.2f}×)")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, seconds; prints only")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--lengths", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--eig-k", type=int, default=5)
    ap.add_argument("--eig-tol", type=float, default=1e-3)
    ap.add_argument("--eig-repeats", type=int, default=5, help="interleaved eigsh runs per operator (median)")
    ap.add_argument("--output", default="docs/benchmarks.md")
    ap.add_argument("--only", choices=["attention", "whole-model"], default=None,
                    help="run one part only (prints, writes nothing)")
    args = ap.parse_args(argv)
    if args.eig_repeats < 1:
        ap.error(f"--eig-repeats must be >= 1, got {args.eig_repeats}")
    torch.set_num_threads(args.threads)
    if args.quick:
        cfg = dict(N=4, d=16, heads=4, layers=args.layers, repeats=3)
        lengths = [16]
    else:
        cfg = dict(N=32, d=64, heads=4, layers=args.layers, repeats=args.repeats)
        lengths = args.lengths
    rows, whole = [], []
    load0 = load_average()
    if args.only != "whole-model":
        for L in lengths:
            rows.append(run(L, eig_k=args.eig_k, eig_tol=args.eig_tol,
                            eig_repeats=1 if args.quick else args.eig_repeats, **cfg))
            print(fmt_table(rows[-1:]), flush=True)
            print(fmt_eigsh(rows[-1:], args.eig_k), flush=True)
    if args.only != "attention":
        try:
            import transformers  # noqa: F401
        except ImportError:
            print("whole-model row skipped: transformers is not installed")
        else:
            for L in lengths:
                whole.append(run_whole_model(L, N=cfg["N"], d=cfg["d"], heads=cfg["heads"], layers=args.layers,
                                             repeats=cfg["repeats"]))
                print(fmt_whole_model(whole[-1:]), flush=True)
    table = ""
    if rows:
        table = fmt_table(rows) + "\n\n" + fmt_eigsh(rows, args.eig_k)
    if whole:
        table += ("\n\n" if table else "") + "Whole model, GPT-2-style (HuggingFace GPT2LMHeadModel, converted; ALL " \
                 "parameters; curvlinops on the unconverted model with eager attention):\n\n" + fmt_whole_model(whole)
    info = (f"- command: `python benchmarks/operators.py{' --quick' if args.quick else ''}` "
            f"(threads={args.threads}, repeats={cfg['repeats']}, eigsh tol={args.eig_tol}, fixed v0, "
            f"eigsh times: median of {1 if args.quick else args.eig_repeats} interleaved runs)\n"
            f"- machine: {machine_line()}; load average at the start {load0:.1f}, at the end {load_average():.1f}\n"
            f"- versions: python {platform.python_version()}, torch {torch.__version__}, curvlinops {CURVLINOPS_VERSION}\n"
            f"- model: {cfg['layers']}-block pre-LN TinyTransformer, d={cfg['d']}, {cfg['heads']} heads, "
            f"N={cfg['N']}, float32, token-level CE; params = all attention parameters\n"
            "- curvlinops runs on the math SDPA kernel (MHA fast path off), once on a twin of the model with "
            "nn.MultiheadAttention (same weights; what curvlinops users have today) and once on our module "
            "(where its forward-mode and backward passes already use our closed-form core derivatives)\n"
            f"- whole-model row: HuggingFace GPT2LMHeadModel from a config (n_embd={cfg['d']}, {cfg['heads']} heads, "
            f"{args.layers} layers, vocabulary 16, N={cfg['N']}, float32, next-token CE), converted by convert_attention; "
            "params = all parameters; gradient = all parameters of the converted model (fused kernel); curvlinops on "
            "the unconverted model with attn_implementation=\"eager\" under the math SDPA kernel\n")
    targets = (fmt_targets(rows) if rows else "") + (fmt_whole_model_targets(whole) if whole else "")
    print(table)
    print(targets)
    if not args.quick and args.only is None:
        with open(args.output, "w") as f:
            f.write("# Operator benchmarks\n\n" + info + "\n" + table + "\n" + targets + "\n")
        print(f"wrote {args.output}")
    return rows + whole


if __name__ == "__main__":
    main()
