r"""Growth of the attention Hessian blocks with the input scale (Ormaniec, Dangel & Singh, ICLR 2025).

The paper's σ-sweep (its Figs. 3, 5-7; docs/math.md §6) on its digit-addition task
(``XXXXX+YYYYY=ZZZZZZ``, generated in code): the token and position embeddings are redrawn as
``σ · N(0, 1)`` while every other weight and the targets stay fixed, and the exact Frobenius
norms of the (W_Q, W_Q) and (W_V, W_V) Hessian blocks of every attention layer are measured,
split into the outer-product (Gauss-Newton) part, the functional part and their sum. The blocks
are the closed forms of ``backpack_attention.hessian_blocks`` (no Hutchinson estimates, one
model seed); log-log slopes are fitted over a window of σ and printed next to the exponents the
paper states (and, for the rows it does not state, the ones docs/math.md §6.1 derives).

Configurations (the paper's notebook setup, d_model=16 instead of 128 for CPU time; 1 head,
``d_head = d_model``, ReLU MLP, TransformerLens init ``0.8/sqrt(d_model)``):

* ``softmax``: softmax attention, no LayerNorm, cross-entropy on the 6 answer digits, 1-3 layers.
  Paper: Q outer σ⁶, Q functional and full σ⁵, V outer and full σ²; V functional ≡ 0 in the last
  layer and ∝ σ³ in earlier ones.
* ``linear``: linear (softmax-free) attention in the same network (attention residual kept):
  every outer block σ⁶, functional ≡ 0 (one layer).
* ``linear-nores``: the paper's linear-attention runs: no residual around attention (the
  notebook's ``residual_scaling=0``; the MLP residual stays), summed squared error against the
  one-hot tokens, 1-3 layers. Outer blocks σ^(2·3^L); functional ≡ 0 in the last layer and
  σ^(3^L) in earlier ones at small σ.
* ``softmax-preln`` / ``linear-preln``: pre-LN (LayerNorm before attention and MLP, final
  LayerNorm), one layer. Paper: flat at small σ; at large σ outer σ⁻², Q functional and full σ⁻¹,
  V σ⁻²; regression over the paper's grid σ ∈ [0.01, 10]: Q full −0.6, Q functional −0.7,
  Q outer −1.2, V −1.2.

Run:  python examples/growth_rates.py [--quick] [--out DIR] [--d-model 16] [--sequences 32]

``--quick`` (under a minute) runs the one-layer softmax and linear configurations on the
small-σ window only. Outputs in ``--out`` (default ``docs/examples/growth_rates``): one figure
per configuration (``growth_<name>.png``), ``slopes.png`` (measured against expected exponents),
``results.json`` (every norm and slope) and ``summary.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import backpack_attention as ba
from backpack_attention.models import default_problem

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "docs" / "examples" / "growth_rates"
BLOCKS = ("W_Q", "W_V")
PARTS = ("outer", "functional", "full")
ZERO = "≡0"  # an exactly (to rounding) zero part: no slope


# ---------------------------------------------------------------------------------------------
# configurations and the exponents the paper states
# ---------------------------------------------------------------------------------------------
def _softmax_expected(layer, num_layers, block, part, window):
    if block == "W_Q":
        return {"outer": 6, "functional": 5, "full": 5}[part]
    if part == "functional":
        return ZERO if layer == num_layers - 1 else 3
    return 2


def _linear_expected(layer, num_layers, block, part, window):
    return ZERO if part == "functional" else 6  # one layer with the attention residual (math.md §6.1)


def _nores_expected(layer, num_layers, block, part, window):
    last = layer == num_layers - 1
    if part == "outer":
        return 2 * 3**num_layers
    if part == "functional":
        return ZERO if last else 3**num_layers
    return 2 * 3**num_layers if last else 3**num_layers


_PRELN_PAPER_GRID = {("W_Q", "full"): -0.6, ("W_Q", "functional"): -0.7, ("W_Q", "outer"): -1.2,
                     ("W_V", "outer"): -1.2, ("W_V", "full"): -1.2}
_PRELN_LARGE = {("W_Q", "outer"): -2, ("W_Q", "functional"): -1, ("W_Q", "full"): -1,
                ("W_V", "outer"): -2, ("W_V", "functional"): -2, ("W_V", "full"): -2}


def _preln_expected(layer, num_layers, block, part, window):
    if window == "small σ":
        return 0
    if window == "large σ":
        return _PRELN_LARGE.get((block, part))
    return _PRELN_PAPER_GRID.get((block, part))


def _nothing_expected(*args):
    return None


NO_LN_GRID = np.logspace(-3, 1, 9)
PRELN_GRID = np.logspace(-2, 2.5, 10)
NORES_GRID = np.logspace(-2, 0, 5)

CONFIGS = {
    "softmax": dict(attention="softmax", norm="none", residual=True, loss="ce", layers=(1, 2, 3),
                    sigmas=NO_LN_GRID, windows={"small σ": (1e-3, 1e-2)}, expected=_softmax_expected,
                    title="softmax attention, no LayerNorm, cross-entropy"),
    "linear": dict(attention="linear", norm="none", residual=True, loss="ce", layers=(1,),
                   sigmas=NO_LN_GRID, windows={"small σ": (1e-3, 1e-2)}, expected=_linear_expected,
                   title="linear attention, no LayerNorm, cross-entropy"),
    "linear-nores": dict(attention="linear", norm="none", residual=False, loss="sse", layers=(1, 2, 3),
                         sigmas=NORES_GRID, windows={"small σ": (1e-2, 1e-1)}, expected=_nores_expected,
                         title="linear attention without attention residual, squared error (the paper's runs)"),
    "softmax-preln": dict(attention="softmax", norm="pre", residual=True, loss="ce", layers=(1,),
                          sigmas=PRELN_GRID,
                          windows={"small σ": (1e-2, 1e-1), "paper grid": (1e-2, 10), "large σ": (30, 320)},
                          expected=_preln_expected, title="softmax attention, pre-LN, cross-entropy"),
    "linear-preln": dict(attention="linear", norm="pre", residual=True, loss="ce", layers=(1,),
                         sigmas=PRELN_GRID,
                         windows={"small σ": (1e-2, 1e-1), "paper grid": (1e-2, 10), "large σ": (30, 320)},
                         expected=_nothing_expected, title="linear attention, pre-LN, cross-entropy (no paper numbers)"),
}

QUICK = {
    "softmax": dict(layers=(1,), sigmas=np.logspace(-3, -2, 3)),
    "linear": dict(layers=(1,), sigmas=np.logspace(-3, -2, 3)),
}


# ---------------------------------------------------------------------------------------------
# the study
# ---------------------------------------------------------------------------------------------
class NoAttentionResidual(nn.Module):
    """The paper's ``residual_scaling=0`` network: ``h = attn(h); h = h + mlp(h)`` per block.

    Wraps a :class:`~backpack_attention.models.TinyTransformer` (no LayerNorm) and reuses its
    parameters; only the residual around attention is dropped.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, X):
        m = self.model
        h = m.embedding(X)
        for block in m.blocks:
            h = block.attn(h)
            h = h + block.mlp(h)
        return m.readout(m.unembed(h))


def build_problem(config: dict, num_layers: int, *, d_model: int, num_sequences: int, seed: int):
    """``(model, model_func, loss_func, data)`` of one configuration (float64)."""
    model, loss_func, (X, y) = default_problem(
        seed=seed, num_sequences=num_sequences, d_model=d_model, num_heads=1, num_layers=num_layers,
        attention=config["attention"], norm=config["norm"])
    model_func = model if config["residual"] else NoAttentionResidual(model)
    if config["loss"] == "sse":
        # the notebook's MSE: summed over the 6 answer positions' logits, target = one-hot of the
        # same-position (unshifted) input token
        loss_func = nn.MSELoss(reduction="sum")
        y = nn.functional.one_hot(X[:, -6:], model.unembed.out_features).to(torch.float64).transpose(1, 2)
    return model, model_func, loss_func, (X, y)


def sweep(config: dict, num_layers: int, sigmas, *, d_model: int = 16, num_sequences: int = 32, seed: int = 0,
          check_operator: float = 0.0) -> dict:
    """Frobenius norms of the (Q,Q) and (V,V) blocks of every layer over the embedding scales ``sigmas``.

    Returns ``{"norms": {layer: {block: {part: [one per sigma]}}}, "operator_v_functional_max": ...}``.
    For the sigmas up to ``check_operator`` the last layer's functional (V,V) block is also applied
    as a matrix by :class:`~backpack_attention.AttentionHessianLinearOperator` (``part="functional"``)
    and its largest absolute entry recorded.
    """
    model, model_func, loss_func, data = build_problem(config, num_layers, d_model=d_model,
                                                       num_sequences=num_sequences, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    base = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in (model.embed.weight, model.pos.weight)]
    norms = {layer: {b: {p: [] for p in PARTS} for b in BLOCKS} for layer in range(num_layers)}
    op_max = []
    for sigma in sigmas:
        with torch.no_grad():
            model.embed.weight.copy_(sigma * base[0])
            model.pos.weight.copy_(sigma * base[1])
        for layer in range(num_layers):
            attn = model.blocks[layer].attn
            hb = ba.hessian_blocks(model_func, loss_func, attn, data)
            for b in BLOCKS:
                blk = hb[(b, 0), (b, 0)]
                for p in PARTS:
                    norms[layer][b][p].append(blk.part(p).norm().item())
        if check_operator and sigma <= check_operator:
            attn = model.blocks[-1].attn
            op = ba.AttentionHessianLinearOperator(model_func, loss_func, [attn.in_proj_weight], [data],
                                                   part="functional", check_deterministic=False)
            idx = ba.param_index(attn, "W_V", 0)  # in_proj_weight comes first: same positions
            E = torch.zeros(op.shape[1], len(idx), dtype=op.dtype)
            E[idx, torch.arange(len(idx))] = 1.0
            op_max.append((op @ E)[idx].abs().max().item())
    return {"norms": norms, "operator_v_functional_max": op_max}


def fit_slope(sigmas, values, window, full_values=None):
    """Log-log slope over the sigmas in ``window``; :data:`ZERO` if the part is zero to rounding."""
    sigmas, values = np.asarray(sigmas), np.asarray(values)
    ref = np.asarray(full_values) if full_values is not None else values
    sel = (sigmas >= window[0] * (1 - 1e-9)) & (sigmas <= window[1] * (1 + 1e-9))
    if sel.sum() < 2:
        return None
    if np.all(values[sel] <= 1e-12 * np.maximum(ref[sel], np.finfo(float).tiny)):
        return ZERO
    return float(np.polyfit(np.log(sigmas[sel]), np.log(values[sel]), 1)[0])


def study(names, *, quick=False, d_model=16, num_sequences=32, seed=0, log=print) -> dict:
    """Run the configurations ``names``; returns a JSON-ready dict with norms, slopes and expectations."""
    out = {"d_model": d_model, "num_sequences": num_sequences, "seed": seed, "quick": quick, "configs": {}}
    for name in names:
        cfg = dict(CONFIGS[name])
        if quick:
            cfg.update(QUICK[name])
        res = {"title": cfg["title"], "sigmas": [float(s) for s in cfg["sigmas"]],
               "windows": {k: list(v) for k, v in cfg["windows"].items()}, "runs": {}}
        for L in cfg["layers"]:
            t0 = time.perf_counter()
            check = name == "softmax" and L == 1
            sw = sweep(cfg, L, cfg["sigmas"], d_model=d_model, num_sequences=num_sequences, seed=seed,
                       check_operator=cfg["windows"]["small σ"][1] if check else 0.0)
            run = {"seconds": time.perf_counter() - t0, "layers": {}}
            if check:
                run["operator_v_functional_max"] = sw["operator_v_functional_max"]
            for layer in range(L):
                rows = []
                for b in BLOCKS:
                    for p in PARTS:
                        vals = sw["norms"][layer][b][p]
                        for wname, window in cfg["windows"].items():
                            if quick and not (window[1] <= max(cfg["sigmas"]) * 1.01):
                                continue
                            slope = fit_slope(cfg["sigmas"], vals, window, sw["norms"][layer][b]["full"])
                            rows.append({"block": b, "part": p, "window": wname, "slope": slope,
                                         "paper": cfg["expected"](layer, L, b, p, wname)})
                run["layers"][str(layer)] = {"norms": sw["norms"][layer], "slopes": rows}
            res["runs"][str(L)] = run
            log(f"\n[{name}] {cfg['title']}: {L} layer(s) ({run['seconds']:.1f} s)")
            log(slope_table(run, L))
            if check:
                log(f"operator functional (V,V) block of the last layer, max |entry| over sigmas: "
                    f"{max(sw['operator_v_functional_max'])!r}")
        out["configs"][name] = res
    return out


# ---------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------
def _fmt(x, plot=False):
    if plot and x == ZERO:
        return "zero"
    if x is None:
        return "–"
    if isinstance(x, str):
        return x
    return f"{x:.2f}" if isinstance(x, float) else str(x)


def slope_table(run: dict, num_layers: int) -> str:
    """Markdown table: layer, block, part, window, measured slope, paper exponent."""
    lines = ["| layer | block | part | σ window | measured slope | expected |", "|---|---|---|---|---|---|"]
    for layer, lr in run["layers"].items():
        for r in lr["slopes"]:
            lines.append(f"| {int(layer) + 1} of {num_layers} | {r['block']} | {r['part']} | {r['window']} | "
                         f"{_fmt(r['slope'])} | {_fmt(r['paper'])} |")
    return "\n".join(lines)


def figure_config(name: str, res: dict, path: Path) -> None:
    """One row per (depth, layer), columns Q and V: the three parts vs sigma with slope guides."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(L, layer) for L, run in res["runs"].items() for layer in run["layers"]]
    fig, axes = plt.subplots(len(rows), 2, figsize=(10, 3.2 * len(rows)), squeeze=False)
    sig = np.asarray(res["sigmas"])
    styles = {"outer": ("C0", "--"), "functional": ("C1", ":"), "full": ("C2", "-")}
    first_window = next(iter(res["windows"].values()))
    for (L, layer), ax_row in zip(rows, axes):
        lr = res["runs"][L]["layers"][layer]
        for ax, b in zip(ax_row, BLOCKS):
            for p in ("full", "outer", "functional"):  # functional drawn last (it often lies on full)
                vals = np.asarray(lr["norms"][b][p])
                fit = [r for r in lr["slopes"] if r["block"] == b and r["part"] == p]
                label = (f"{p}: " + " / ".join(_fmt(r["slope"], True) for r in fit)
                         + " (expected " + " / ".join(_fmt(r["paper"], True) for r in fit) + ")")
                color, ls = styles[p]
                pos = vals > 1e-300
                if pos.any() and fit and fit[0]["slope"] != ZERO:
                    ax.loglog(sig[pos], vals[pos], color=color, ls=ls, marker="o", ms=3, label=label,
                              lw=2 if p == "functional" else 1.5)
                else:
                    ax.plot([], [], color=color, ls=ls, label=label)
                # the paper's exponent as a guide through the first point of the first window
                paper = fit[0]["paper"] if fit else None
                if isinstance(paper, (int, float)) and pos.any():
                    i = int(np.argmin(np.abs(np.log(sig) - np.log(first_window[0]))))
                    s = sig[(sig >= first_window[0] * 0.99) & (sig <= first_window[1] * 1.01)]
                    if len(s) > 1 and vals[i] > 0:
                        ax.loglog(s, vals[i] * (s / sig[i]) ** paper, color="k", lw=0.8, alpha=0.5)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"{b} block, layer {int(layer) + 1} of {L}", fontsize=9)
            ax.set_xlabel(r"embedding scale $\sigma$")
            ax.set_ylabel(r"$\|H_{block}\|_F$")
            ax.legend(fontsize=7, title="slope: " + " / ".join(res["windows"]), title_fontsize=7)
    fig.suptitle(f"{name}: {res['title']}\n(thin black: the expected exponent over the {next(iter(res['windows']))} window)",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / (3.2 * len(rows))))
    fig.savefig(path, dpi=80)
    plt.close(fig)


def figure_slopes(results: dict, path: Path) -> None:
    """Every measured slope against the expected exponent (y = x is agreement)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    markers = {"outer": "o", "functional": "s", "full": "^"}
    lo, hi = 0.0, 0.0
    for ci, (name, res) in enumerate(results["configs"].items()):
        for L, run in res["runs"].items():
            for lr in run["layers"].values():
                for r in lr["slopes"]:
                    if isinstance(r["slope"], float) and isinstance(r["paper"], (int, float)):
                        ax.plot(r["paper"], r["slope"], markers[r["part"]], color=f"C{ci}", alpha=0.7, ms=5)
                        lo, hi = min(lo, r["paper"], r["slope"]), max(hi, r["paper"], r["slope"])
        ax.plot([], [], "o", color=f"C{ci}", label=name)
    for p, mk in markers.items():
        ax.plot([], [], mk, color="gray", label=p)
    ax.plot([lo - 1, hi + 1], [lo - 1, hi + 1], "k-", lw=0.8)
    ax.set_xscale("symlog", linthresh=10)
    ax.set_yscale("symlog", linthresh=10)
    ax.set_xlabel("expected exponent (paper; math.md §6.1)")
    ax.set_ylabel("measured log-log slope (exact blocks)")
    ax.set_title("growth exponents of the Q and V Hessian blocks")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def acceptance(results: dict) -> dict:
    """The headline checks: one softmax layer (V outer 2, Q outer 6, Q functional 5, V functional 0)
    and one linear layer (6), at small sigma. Values are the measured slopes."""
    out = {}
    for kind, keys in (("softmax", (("W_V", "outer"), ("W_Q", "outer"), ("W_Q", "functional"), ("W_V", "functional"))),
                       ("linear", (("W_Q", "outer"), ("W_V", "outer"), ("W_Q", "full"), ("W_V", "full")))):
        run = results["configs"].get(kind, {}).get("runs", {}).get("1")
        if run is None:
            continue
        get = {(r["block"], r["part"]): r["slope"] for r in run["layers"]["0"]["slopes"] if r["window"] == "small σ"}
        out[kind] = {f"{b[2]} {p}": get[(b, p)] for b, p in keys}
    return out


def write_summary(results: dict, out: Path, seconds: float, command: str) -> str:
    acc = acceptance(results)
    lines = [
        "# Growth rates of the attention Hessian blocks (Ormaniec, Dangel & Singh)",
        "",
        f"Generated by `{command}` in {seconds:.0f} s wall-clock, {results['cpu_seconds']:.0f} s CPU (torch {torch.__version__}, "
        f"{results['threads']} thread(s), {platform.machine()}, 1-min load average {results['load_average']:.1f} on "
        f"{os.cpu_count()} cores at the end). Do not edit: rerun the example.",
        "",
        f"Digit-addition task, {results['num_sequences']} sequences, d_model = {results['d_model']}, 1 head, "
        f"model seed {results['seed']}, float64. Exact closed-form blocks (`hessian_blocks`); slopes are "
        "least-squares fits of log ‖block‖_F against log σ over the σ window named in each row. "
        "*Expected*: the exponents the paper states or draws as guides (softmax: Q 6/5/5, V 2; linear "
        "attention: 2·3^L outer), the slopes of its stored results where it draws none (V functional 3 in "
        "non-final layers, pre-LN regression slopes) and the rule-of-thumb derivation of docs/math.md §6.1 "
        "for the rest (functional and full blocks of non-final linear layers: 3^L). `≡0`: zero to rounding.",
        "",
        "## Headline (one layer, small σ)",
        "",
        "| attention | block, part | measured slope | expected |",
        "|---|---|---|---|",
    ]
    paper = {"V outer": 2, "Q outer": 6, "Q functional": 5, "V functional": ZERO, "Q full": 6, "V full": 6}
    for kind, vals in acc.items():
        for k, v in vals.items():
            p = paper[k] if kind == "softmax" else (6 if "functional" not in k else ZERO)
            lines.append(f"| {kind} | {k} | {_fmt(v)} | {_fmt(p)} |")
    one = results["configs"].get("softmax", {}).get("runs", {}).get("1")
    if one and one.get("operator_v_functional_max"):
        lines += ["", "The last layer's functional (V,V) block applied by `AttentionHessianLinearOperator("
                  "part=\"functional\")` to the unit vectors: largest absolute entry over the small-σ window = "
                  f"{max(one['operator_v_functional_max'])!r} (exactly zero). In the closed-form blocks it "
                  "is zero to rounding (the `≡0` rows: below 1e-12 of the full block)."]
    for name, res in results["configs"].items():
        lines += ["", f"## {name}: {res['title']}", "",
                  f"σ grid: {len(res['sigmas'])} points from {res['sigmas'][0]:g} to {res['sigmas'][-1]:g}; "
                  "windows: " + ", ".join(f"{k} [{v[0]:g}, {v[1]:g}]" for k, v in res["windows"].items()) + ".",
                  "", f"![{name}](growth_{name}.png)", ""]
        for L, run in res["runs"].items():
            lines += [f"**{L} layer(s)** ({run['seconds']:.1f} s)", "", slope_table(run, int(L)), ""]
    lines += ["## All slopes against the expected exponents", "", "![slopes](slopes.png)", ""]
    text = "\n".join(lines)
    (out / "summary.md").write_text(text)
    return text


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one-layer softmax and linear, small σ only (< 1 min)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default: %(default)s)")
    parser.add_argument("--configs", nargs="*", default=None, choices=sorted(CONFIGS),
                        help="configurations to run (default: all; --quick: softmax linear)")
    parser.add_argument("--d-model", type=int, default=16, help="model width (default 16)")
    parser.add_argument("--sequences", type=int, default=None, help="addition problems (default 32; --quick 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: the fastest for these small blocks, and safe when "
                             "other jobs share the cores)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = args.configs or (list(QUICK) if args.quick else list(CONFIGS))
    n_seq = args.sequences or (8 if args.quick else 32)
    t0, cpu0 = time.perf_counter(), time.process_time()
    results = study(names, quick=args.quick, d_model=args.d_model, num_sequences=n_seq, seed=args.seed)
    for name, res in results["configs"].items():
        figure_config(name, res, out / f"growth_{name}.png")
    figure_slopes(results, out / "slopes.png")
    seconds = time.perf_counter() - t0
    results["seconds"] = seconds
    results["cpu_seconds"] = time.process_time() - cpu0
    results["threads"], results["load_average"] = torch.get_num_threads(), os.getloadavg()[0]
    results["acceptance"] = acceptance(results)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    command = "python examples/growth_rates.py" + (" --quick" if args.quick else "")
    if args.configs:
        command += " --configs " + " ".join(args.configs)
    if args.d_model != 16 or args.sequences or args.seed:
        command += f" --d-model {args.d_model} --sequences {n_seq} --seed {args.seed}"
    write_summary(results, out, seconds, command)
    print("\nHeadline slopes (one layer, small σ):")
    for kind, vals in results["acceptance"].items():
        print(f"  {kind}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in vals.items()))
    print(f"\nwrote {out}/summary.md, results.json and {len(results['configs']) + 1} figures in {seconds:.0f} s")
    return results


if __name__ == "__main__":
    main()
