"""Spectra of the attention curvature blocks: our operators next to curvlinops', with timings.

For each attention layer of the built-in model (``backpack_attention.models.default_problem``:
a causal transformer on the 5-digit addition task, cross-entropy on the answer digits, float64)
and each block W_Q, W_K, W_V, W_O (all heads), for the GGN and the Hessian:

* the top-k eigenvalues, by scipy's ``eigsh`` on the block (a curvlinops
  ``SubmatrixLinearOperator`` of the operator over the layer's weight), and for the Hessian also
  the smallest eigenvalue (to 1e-4 of the largest: it is the density's lower boundary);
* a spectral density, by curvlinops' ``LanczosApproximateSpectrumCached`` with the boundaries
  found above;

once with this package's ``AttentionGGNLinearOperator`` / ``AttentionHessianLinearOperator`` on
the model, once with curvlinops' ``GGNLinearOperator`` / ``HessianLinearOperator`` on its
``torch_twin`` (the same model with ``nn.MultiheadAttention``, what a curvlinops user has today),
under ``sdpa_kernel(SDPBackend.MATH)`` (curvlinops needs forward-mode AD through attention, which
PyTorch's fused kernels lack). Both get the same start vectors and tolerances. Each timing builds
its operator from scratch (ours caches the forward pass at the first product).

Run:  python examples/spectra.py [--quick] [--out DIR] [--layers 2] [--d-model 32] [--heads 4]

``--quick`` (under a minute): the default built-in model (1 layer, d=16, 2 heads), 8 sequences,
W_Q and W_V only, top-3, 24 Lanczos vectors. Outputs in ``--out`` (default ``docs/examples/spectra``): ``densities.png``,
``timings.png``, ``results.json``, ``summary.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from curvlinops import GGNLinearOperator, HessianLinearOperator, LanczosApproximateSpectrumCached, SubmatrixLinearOperator
from scipy.sparse.linalg import LinearOperator, eigsh

import backpack_attention as ba
from backpack_attention import torch_math_attention
from backpack_attention.models import default_problem, torch_twin

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "docs" / "examples" / "spectra"
CURVATURES = ("GGN", "Hessian")
BOTTOM_TOL = 1e-4  # relative to the largest eigenvalue


def layer_operator(impl, curvature, model, twin, loss_func, data, layer, weight):
    """``(operator, context)``: ``impl``'s GGN or Hessian over one weight of an attention layer
    (``weight`` = "in" for ``in_proj_weight``, "out" for ``out_proj_weight``); products must run
    inside ``context``."""
    if impl == "ours":
        attn = model.attention_layers()[layer]
        p = attn.in_proj_weight if weight == "in" else attn.out_proj_weight
        cls = ba.AttentionGGNLinearOperator if curvature == "GGN" else ba.AttentionHessianLinearOperator
        return cls(model, loss_func, [p], data, check_deterministic=False), contextlib.nullcontext
    mha = twin.attention_layers()[layer].mha
    p = mha.in_proj_weight if weight == "in" else mha.out_proj.weight
    cls = GGNLinearOperator if curvature == "GGN" else HessianLinearOperator
    with torch_math_attention():
        return cls(twin, loss_func, [p], data, check_deterministic=False), torch_math_attention


def block_operator(impl, curvature, model, twin, loss_func, data, layer, block):
    """``(SubmatrixLinearOperator of the block, context)``: W_Q, W_K, W_V (all heads) live in
    ``in_proj_weight``, W_O in ``out_proj_weight``; the same positions in both models."""
    attn = model.attention_layers()[layer]
    weight = "out" if block == "W_O" else "in"
    idx = ba.param_index(attn, block)
    if weight == "out":  # param_index counts from the start of attn.parameters()
        idx = idx - attn.in_proj_weight.numel() - (attn.in_proj_bias.numel() if attn.in_proj_bias is not None else 0)
    op, ctx = layer_operator(impl, curvature, model, twin, loss_func, data, layer, weight)
    idx = idx.tolist()
    return SubmatrixLinearOperator(op, idx, idx), ctx


def measure(impl, curvature, model, twin, loss_func, data, layer, block, *, k, ncv, tol, boundaries=None,
            num_repeats=1, seed=0) -> dict:
    """Top-k (and for the Hessian the bottom) eigenvalues and a density of one block, timed."""
    r = {}
    t0 = time.perf_counter()
    op, ctx = block_operator(impl, curvature, model, twin, loss_func, data, layer, block)
    n = op.shape[0]
    v0 = np.random.default_rng(seed).standard_normal(n)
    with ctx():
        A = op.to_scipy(dtype=np.float64)
        top = eigsh(A, k=k, which="LA", v0=v0, tol=tol, return_eigenvectors=False)
        r["top"] = sorted(top.tolist(), reverse=True)
        if curvature == "Hessian":
            # smallest eigenvalue of A + s I (s = the largest eigenvalue), minus s, to BOTTOM_TOL * s:
            # a boundary for the density. (A PSD block such as a last layer's (V, V) has a dense
            # cluster of tiny eigenvalues that eigsh cannot resolve at a relative tolerance.)
            s = r["top"][0]
            B = LinearOperator(A.shape, matvec=lambda v: A.matvec(v) + s * v, dtype=np.float64)
            r["bottom"] = float(eigsh(B, k=1, which="SA", v0=v0, tol=BOTTOM_TOL, return_eigenvectors=False)[0]) - s
        r["eigsh_seconds"] = time.perf_counter() - t0
        lo, hi = boundaries if boundaries is not None else (r.get("bottom", 0.0), r["top"][0])
        t1 = time.perf_counter()
        torch.manual_seed(seed)
        np.random.seed(seed)
        op2, _ = block_operator(impl, curvature, model, twin, loss_func, data, layer, block)
        grid, rho = LanczosApproximateSpectrumCached(op2, ncv=min(ncv, n), boundaries=(lo, hi)).approximate_spectrum(
            num_repeats=num_repeats, num_points=400, kappa=3.0)
        r["density_seconds"] = time.perf_counter() - t1
    r["grid"], r["density"] = grid.tolist(), rho.tolist()
    r["size"] = n
    return r


def product_seconds(impl, model, twin, loss_func, data, layer, repeats=5) -> dict:
    """Median time of one GGN and one Hessian product on a layer's ``in_proj_weight`` (after a
    warm-up product, which builds our cache)."""
    out = {}
    for curvature in CURVATURES:
        op, ctx = layer_operator(impl, curvature, model, twin, loss_func, data, layer, "in")
        v = torch.randn(op.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        with ctx():
            op @ v
            ts = []
            for _ in range(repeats):
                t = time.perf_counter()
                op @ v
                ts.append(time.perf_counter() - t)
        out[curvature] = float(np.median(ts))
    return out


def run(args, log=print) -> dict:
    kw = {} if args.quick else dict(num_layers=args.layers, d_model=args.d_model, num_heads=args.heads)
    model, loss_func, (X, y) = default_problem(seed=args.seed, num_sequences=args.sequences, **kw)
    twin = torch_twin(model)
    data = [(X, y)]
    blocks = ("W_Q", "W_V") if args.quick else ("W_Q", "W_K", "W_V", "W_O")
    layers = len(model.attention_layers())
    with torch.no_grad(), torch_math_attention():
        gap = (model(X) - twin(X)).abs().max().item()
    log(f"model: {layers} layer(s), d_model {model.embed.embedding_dim}, "
        f"{model.attention_layers()[0].num_heads} heads, {len(X)} sequences; max |ours - twin| output {gap:.1e}")
    res = {"config": {"layers": layers, "d_model": model.embed.embedding_dim,
                      "heads": model.attention_layers()[0].num_heads, "sequences": len(X), "k": args.k,
                      "ncv": args.ncv, "tol": args.tol, "num_repeats": args.repeats, "seed": args.seed,
                      "quick": args.quick}, "output_gap": gap, "rows": [], "products": {}}
    for layer in range(layers):
        res["products"][str(layer)] = {impl: product_seconds(impl, model, twin, loss_func, data, layer)
                                       for impl in ("ours", "curvlinops")}
        p = res["products"][str(layer)]
        log(f"layer {layer + 1}: one product on in_proj_weight, ours / curvlinops: GGN "
            f"{p['ours']['GGN'] * 1e3:.1f} / {p['curvlinops']['GGN'] * 1e3:.1f} ms, Hessian "
            f"{p['ours']['Hessian'] * 1e3:.1f} / {p['curvlinops']['Hessian'] * 1e3:.1f} ms")
        for block in blocks:
            for curvature in CURVATURES:
                kwargs = dict(k=args.k, ncv=args.ncv, tol=args.tol, num_repeats=args.repeats, seed=args.seed)
                ours = measure("ours", curvature, model, twin, loss_func, data, layer, block, **kwargs)
                bounds = (ours.get("bottom", 0.0), ours["top"][0])
                theirs = measure("curvlinops", curvature, model, twin, loss_func, data, layer, block,
                                 boundaries=bounds, **kwargs)
                ref = np.asarray(theirs["top"])
                rel = float(np.max(np.abs(np.asarray(ours["top"]) - ref)) / np.max(np.abs(ref)))
                row = {"layer": layer, "block": block, "curvature": curvature, "size": ours["size"],
                       "ours": ours, "curvlinops": theirs, "top_rel_diff": rel}
                dens_o, dens_t = np.asarray(ours["density"]), np.asarray(theirs["density"])
                row["density_rel_diff"] = float(np.max(np.abs(dens_o - dens_t)) / np.max(np.abs(dens_o)))
                res["rows"].append(row)
                log(f"layer {layer + 1} {block:>3} {curvature:>7} (n={ours['size']}): top "
                    + ", ".join(f"{v:.4g}" for v in ours["top"])
                    + (f"; min {ours['bottom']:.4g}" if "bottom" in ours else "")
                    + f" | rel. diff to curvlinops {rel:.1e} | eigsh {ours['eigsh_seconds']:.2f} s vs "
                    f"{theirs['eigsh_seconds']:.2f} s, density {ours['density_seconds']:.2f} s vs "
                    f"{theirs['density_seconds']:.2f} s")
    return res


def figures(res: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["rows"]
    layers = sorted({r["layer"] for r in rows})
    blocks = list(dict.fromkeys(r["block"] for r in rows))
    fig, axes = plt.subplots(len(layers) * 2, len(blocks), figsize=(3.6 * len(blocks), 2.8 * 2 * len(layers)),
                             squeeze=False)
    for r in rows:
        ax = axes[2 * layers.index(r["layer"]) + CURVATURES.index(r["curvature"]), blocks.index(r["block"])]
        ax.semilogy(r["ours"]["grid"], np.maximum(r["ours"]["density"], 1e-12), "C0-", lw=1.5, label="ours")
        ax.semilogy(r["curvlinops"]["grid"], np.maximum(r["curvlinops"]["density"], 1e-12), "C1--", lw=1,
                    label="curvlinops")
        for v in r["ours"]["top"]:
            ax.axvline(v, color="C3", lw=0.6, alpha=0.6)
        ax.set_ylim(1e-6, None)
        ax.set_title(f"layer {r['layer'] + 1} {r['block']}: {r['curvature']} (n={r['size']})", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("Lanczos spectral densities per block (red: top eigenvalues from eigsh)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "densities.png", dpi=70)
    plt.close(fig)

    labels = [f"L{r['layer'] + 1} {r['block']} {r['curvature'][0]}" for r in rows]
    x = np.arange(len(rows))
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 0.55 * len(rows) * 2), 3.8))
    for ax, key, title in ((axes[0], "eigsh_seconds", "eigsh (top-k, + bottom for the Hessian)"),
                           (axes[1], "density_seconds", "Lanczos density")):
        ax.bar(x - 0.2, [r["ours"][key] for r in rows], 0.4, label="ours")
        ax.bar(x + 0.2, [r["curvlinops"][key] for r in rows], 0.4, label="curvlinops (nn.MultiheadAttention)")
        ax.set_xticks(x, labels, rotation=60, fontsize=7, ha="right")
        ax.set_ylabel("seconds")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "timings.png", dpi=100)
    plt.close(fig)


def summary(res: dict, command: str, seconds: float, cpu: float) -> str:
    c = res["config"]
    rows = res["rows"]
    so = sum(r["ours"]["eigsh_seconds"] for r in rows)
    sc = sum(r["curvlinops"]["eigsh_seconds"] for r in rows)
    do = sum(r["ours"]["density_seconds"] for r in rows)
    dc = sum(r["curvlinops"]["density_seconds"] for r in rows)
    worst = max(r["top_rel_diff"] for r in rows)
    lines = [
        "# Spectra of the attention curvature blocks: ours and curvlinops'",
        "",
        f"Generated by `{command}` in {seconds:.0f} s wall-clock, {cpu:.0f} s CPU (torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), {platform.machine()}, 1-min load average {os.getloadavg()[0]:.1f} "
        f"on {os.cpu_count()} cores at the end). Do not edit: rerun the example.",
        "",
        f"Built-in model (`default_problem`): {c['layers']} layer(s), d_model {c['d_model']}, {c['heads']} heads, "
        f"{c['sequences']} addition sequences, cross-entropy on the answer digits, float64. eigsh: top-{c['k']} "
        f"(tol {c['tol']:g}); density: `LanczosApproximateSpectrumCached(ncv={c['ncv']})`, "
        f"{c['num_repeats']} repeat(s). curvlinops runs on the `torch_twin` (nn.MultiheadAttention, math SDPA "
        f"kernel). Outputs of the two models differ by {res['output_gap']:.1e}.",
        "",
        "## Headline",
        "",
        f"* Largest relative difference between our top eigenvalues and curvlinops': **{worst:.1e}**; "
        f"between the spectral densities (same start vectors): {max(r['density_rel_diff'] for r in rows):.1e}.",
        f"* Total eigsh time: ours {so:.1f} s, curvlinops {sc:.1f} s (**{sc / so:.1f}×**); "
        f"density time: ours {do:.1f} s, curvlinops {dc:.1f} s (**{dc / do:.1f}×**).",
        "",
        "One product on a layer's `in_proj_weight` (median of 5, forward pass cached):",
        "",
        "| layer | GGN ours | GGN curvlinops | Hessian ours | Hessian curvlinops |",
        "|---|---|---|---|---|",
    ]
    for layer, p in res["products"].items():
        lines.append(f"| {int(layer) + 1} | {p['ours']['GGN'] * 1e3:.1f} ms | {p['curvlinops']['GGN'] * 1e3:.1f} ms | "
                     f"{p['ours']['Hessian'] * 1e3:.1f} ms | {p['curvlinops']['Hessian'] * 1e3:.1f} ms |")
    lines += ["", "## Per block", "",
              "| layer | block | curvature | size | top eigenvalues (ours) | min (Hessian, ±1e-4 λmax) | rel. diff of top | "
              "eigsh ours | eigsh curvlinops | density ours | density curvlinops |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        o, t = r["ours"], r["curvlinops"]
        top = ", ".join(f"{v:.4g}" for v in o["top"])
        bottom = f"{o['bottom']:.3g}" if "bottom" in o else "–"
        lines.append(f"| {r['layer'] + 1} | {r['block']} | {r['curvature']} | {r['size']} | {top} | {bottom} | "
                     f"{r['top_rel_diff']:.1e} | {o['eigsh_seconds']:.2f} s | {t['eigsh_seconds']:.2f} s | "
                     f"{o['density_seconds']:.2f} s | {t['density_seconds']:.2f} s |")
    lines += ["", "![densities](densities.png)", "", "![timings](timings.png)", ""]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 layer, d=16, 8 sequences, W_Q and W_V (< 1 min)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default: %(default)s)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=32)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--sequences", type=int, default=None, help="default 64; --quick 8")
    parser.add_argument("--k", type=int, default=5, help="top eigenvalues per block")
    parser.add_argument("--ncv", type=int, default=48, help="Lanczos vectors of the density")
    parser.add_argument("--repeats", type=int, default=1, help="Lanczos runs averaged per density")
    parser.add_argument("--tol", type=float, default=1e-8, help="eigsh tolerance")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1, the same for both implementations)")
    args = parser.parse_args(argv)
    args.sequences = args.sequences or (8 if args.quick else 64)
    if args.quick:
        args.k, args.ncv, args.tol = min(args.k, 3), min(args.ncv, 24), max(args.tol, 1e-6)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0, cpu0 = time.perf_counter(), time.process_time()
    res = run(args)
    figures(res, out)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    res["seconds"], res["cpu_seconds"] = seconds, cpu
    command = "python examples/spectra.py" + (" --quick" if args.quick else "")
    (out / "summary.md").write_text(summary(res, command, seconds, cpu))
    for r in res["rows"]:  # the figure has both densities; results.json keeps ours (5 digits) and the gap
        for impl in ("ours", "curvlinops"):
            d = r[impl]
            if impl == "ours":
                d["grid"] = [float(f"{v:.5g}") for v in d["grid"]]
                d["density"] = [float(f"{v:.5g}") for v in d["density"]]
            else:
                d.pop("grid"), d.pop("density")
    (out / "results.json").write_text(json.dumps(res, indent=1))
    print(f"wrote {out}/summary.md, results.json, densities.png, timings.png in {seconds:.0f} s")
    return res


if __name__ == "__main__":
    main()
