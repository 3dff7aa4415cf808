r"""Preconditioning the co-occurrence task: per-block damping of attention-aware KFAC vs one global damping.

The task and model are those of ``examples/cooccurrence_phases.py`` (Yang, Kailkhura, Wang & Liang,
NeurIPS 2024; imported from there, not copied): 60 sequences of 5 one-hot tokens (d = 64), a
one-layer, one-head attention with ``W_Q, W_K, W_V`` (``in_proj_weight``) and a linear MLP ``W``,
logistic loss, the theory's initialisation × 0.3. At initialisation the curvature of the Q/K
blocks is orders of magnitude below that of V and W. The hypothesis tested (docs/kfac.md, "Damping
and the inverse"): a preconditioner with one global damping δ takes a near-Newton step in the
nearly flat Q/K directions, ``‖Δ‖ ≈ lr·‖g‖/δ``, while a damping large enough for those directions
over-damps V and the MLP, so per-block damping should train where a global δ diverges. The
example trains the same model with

* full-batch gradient descent (the paper's lr) and Adam;
* generic KFAC (``AttentionKFACLinearOperator(kfac_approx="expand")``, what every
  ``nn.Linear``-based library computes) with one global scalar damping, small and large;
* attention-aware KFAC (``kfac_approx="attention"``) with the same global damping (a control),
  with ``damping="heuristic"`` (per block, relative to each block's own mean eigenvalue) and with a
  per-block dict that damps the Q and K blocks more than V and the MLP;
* attention-aware EKFAC (``AttentionEKFACLinearOperator``) with the heuristic and the dict;
* generic KFAC with the same per-block dict (a control: damping vs recipe).

and, as a stability map, the four KFAC variants {generic, attention-aware} × {global δ, per-block
dict} on a grid of step sizes and dampings (``GRID_LRS`` × ``GRID_DAMPINGS``, ``--grid-steps`` steps each).
The headline setting of the training curves (``KFAC_LR``, ``GLOBAL_DAMPING``) was picked from that grid
**after** running it, as a grid point where generic and attention-aware KFAC behave differently;
the grid is part of the output so that how narrow that is can be seen.

Every KFAC/EKFAC run uses the type-2 Fisher (= GGN for this loss) of the full batch, the update
``θ ← θ - lr (K + δ)^{-1} ∇L`` with the same lr, and **recomputes the Kronecker factors (and EKFAC's
eigenvalue corrections) and the inverse every ``--refresh`` steps** (default 10) from the current
parameters (``compute_kronecker_factors()``); in between the last inverse is reused.

A run **diverges** at the first step whose loss is not finite or exceeds ``DIVERGE_FACTOR`` times
the loss at step 0, whose parameters are not finite, or whose curvature computation fails; the run
stops there. Recorded per run: the loss at every step (logged every step up to step 100, then every
10 steps), the step at which all 60 sequences are first classified correctly (T1), the final or
last finite loss, and the distance travelled (path length, the sum of the step norms) by the
Q/K weights ``(W_Q, W_K)`` and by the V/MLP weights ``(W_V, W)``, plus their distances from the
initialisation.

Run:  python examples/preconditioning.py [--quick] [--steps 300] [--grid-steps 100] [--refresh 10]
      [--seed 0] [--only KEYS] [--out DIR]

``--quick`` (under a minute) trains 40 steps per method and one grid point (30 steps per cell).
Outputs in ``--out`` (default ``docs/examples/preconditioning``): ``losses.png``,
``distances.png``, ``results.json``, ``summary.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cooccurrence_phases import (  # noqa: E402  (the task and model of Yang et al.)
    COUNTS, D_TOKENS, M, M1, N_SEQ, SEQ_LEN, CooccurrenceModel, cooccurrence_data,
)

import backpack_attention as ba  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "docs" / "examples" / "preconditioning"
DIVERGE_FACTOR = 100.0
#: The headline KFAC step size and global damping (picked from the grid, see the module docstring),
#: the larger damping of the Q and K blocks in the per-block dict, and a large global damping.
KFAC_LR, GLOBAL_DAMPING, QK_DAMPING, GLOBAL_LARGE = 0.01, 0.03, 0.1, 0.1


def per_block(default: float) -> dict:
    """The per-block dict: Q and K damped by ``QK_DAMPING``, V and the MLP by ``default``."""
    return {"Q": QK_DAMPING, "K": QK_DAMPING, "default": default}


PER_BLOCK = per_block(GLOBAL_DAMPING)
#: The stability map (full run; --quick: the first lr and the dampings of QUICK_GRID_DAMPINGS).
GRID_LRS, GRID_DAMPINGS, QUICK_GRID_DAMPINGS = (0.01, 0.1), (0.01, 0.02, 0.03, 0.05, 0.1), (0.03,)
GRID_METHODS = (("expand", "global"), ("expand", "per-block"), ("attention", "global"), ("attention", "per-block"))

#: (key, label, kind, kfac_approx, damping, lr). "kind": gd, adam, kfac, ekfac.
METHODS = (
    ("gd", "GD", "gd", None, None, 0.01),
    ("adam", "Adam", "adam", None, None, 1e-3),
    ("expand_global", "KFAC expand, global δ", "kfac", "expand", GLOBAL_DAMPING, KFAC_LR),
    ("expand_global_large", "KFAC expand, global δ (large)", "kfac", "expand", GLOBAL_LARGE, KFAC_LR),
    ("attention_global", "KFAC attention, global δ", "kfac", "attention", GLOBAL_DAMPING, KFAC_LR),
    ("attention_heuristic", "KFAC attention, heuristic", "kfac", "attention", "heuristic", KFAC_LR),
    ("attention_per_block", "KFAC attention, per-block dict", "kfac", "attention", PER_BLOCK, KFAC_LR),
    ("ekfac_heuristic", "EKFAC attention, heuristic", "ekfac", "attention", "heuristic", KFAC_LR),
    ("ekfac_per_block", "EKFAC attention, per-block dict", "ekfac", "attention", PER_BLOCK, KFAC_LR),
    ("expand_per_block", "KFAC expand, per-block dict", "kfac", "expand", PER_BLOCK, KFAC_LR),
)
#: The acceptance comparison: generic globally damped KFAC vs attention-aware per-block damping.
GENERIC, AWARE = "expand_global", ("attention_per_block", "ekfac_per_block")
BLOCKS = ("W_Q", "W_K", "W_V", "W")


class ColumnOutput(nn.Module):
    """The co-occurrence model with its logit as a column ``[N, 1]``: the KFAC operators flatten the
    output of ``BCEWithLogitsLoss`` with the classes last, so one logit per sequence must be a column."""

    def __init__(self, model: CooccurrenceModel):
        super().__init__()
        self.model = model

    def forward(self, tokens):
        return self.model(tokens).unsqueeze(-1)


def _blocks(model: CooccurrenceModel):
    Wq, Wk, Wv = model.attn.in_proj_weight.detach().split(M)
    return {"W_Q": Wq, "W_K": Wk, "W_V": Wv, "W": model.W.weight.detach()}


def _finite(x):
    return float(x) if x is not None and math.isfinite(float(x)) else None


def _damping_text(d):
    if d is None:
        return "–"
    if isinstance(d, dict):
        return ", ".join(f"{k}: {v:g}" for k, v in d.items())
    return d if isinstance(d, str) else f"{d:g}"


# ---------------------------------------------------------------------------------------------
# one training run
# ---------------------------------------------------------------------------------------------
def train(method, *, steps: int, refresh: int, seed: int, init_scale: float, log=print) -> dict:
    key, label, kind, approx, damping, lr = method
    tokens, y, types = cooccurrence_data(seed)
    base = CooccurrenceModel(seed, init_scale)
    model = ColumnOutput(base)
    loss_func = nn.BCEWithLogitsLoss()
    Y = y[:, None]
    data = [(tokens, Y)]
    params = base.trained_parameters()
    sign = 2 * y - 1
    init = {b: w.clone() for b, w in _blocks(base).items()}
    prev = {b: w.clone() for b, w in init.items()}
    path = {"QK": 0.0, "VW": 0.0}
    hist = {"step": [], "loss": [], "path_QK": [], "path_VW": [], "dist": {b: [] for b in BLOCKS}}
    op = inv = None
    if kind in ("kfac", "ekfac"):
        cls = ba.AttentionEKFACLinearOperator if kind == "ekfac" else ba.AttentionKFACLinearOperator
        op = cls(model, loss_func, params, data, kfac_approx=approx, fisher_type="type-2", check_deterministic=False)
    adam = torch.optim.Adam(params, lr=lr) if kind == "adam" else None
    refreshes = []
    T1 = diverged_at = reason = None
    loss0 = None
    t0 = time.perf_counter()
    for step in range(steps + 1):
        out = model(tokens)
        loss = loss_func(out, Y)
        lv = loss.item()
        if loss0 is None:
            loss0 = lv
        finite_params = all(bool(torch.isfinite(p).all()) for p in params)
        if not math.isfinite(lv) or not finite_params or lv > DIVERGE_FACTOR * loss0:
            diverged_at = step
            reason = ("non-finite loss" if not math.isfinite(lv) else "non-finite parameters" if not finite_params
                      else f"loss {lv:.3g} > {DIVERGE_FACTOR:g} × loss at step 0")
        if T1 is None and diverged_at is None and bool((sign * out.detach()[:, 0] > 0).all()):
            T1 = step
        logged = step <= 100 or step % 10 == 0 or step == steps or diverged_at is not None
        if logged:
            hist["step"].append(step)
            hist["loss"].append(_finite(lv))
            hist["path_QK"].append(_finite(path["QK"]))
            hist["path_VW"].append(_finite(path["VW"]))
            for b, w in _blocks(base).items():
                hist["dist"][b].append(_finite((w - init[b]).norm()))
        if diverged_at is not None or step == steps:
            break
        grads = torch.autograd.grad(loss, params)
        if kind == "gd":
            upd = [lr * g for g in grads]
        elif kind == "adam":
            for p, g in zip(params, grads):
                p.grad = g
            adam.step()
            adam.zero_grad(set_to_none=True)
            upd = None
        else:
            try:
                if step % refresh == 0:
                    op.compute_kronecker_factors()
                    inv = op.inverse(damping)
                    if step == 0:
                        refreshes.append(_curvature_record(op, inv))
                d = inv @ [g.detach() for g in grads]
            except Exception as e:  # eigh/linalg failure on blown-up factors: a divergence
                diverged_at, reason = step, f"curvature computation failed ({type(e).__name__}: {str(e)[:80]})"
                break
            upd = [lr * x for x in d]
        with torch.no_grad():
            if upd is not None:
                for p, u in zip(params, upd):
                    p.sub_(u)
        blocks = _blocks(base)
        dq = math.sqrt(sum(float((blocks[b] - prev[b]).square().sum()) for b in ("W_Q", "W_K")))
        dv = math.sqrt(sum(float((blocks[b] - prev[b]).square().sum()) for b in ("W_V", "W")))
        path["QK"] += dq if math.isfinite(dq) else float("inf")
        path["VW"] += dv if math.isfinite(dv) else float("inf")
        prev = {b: w.clone() for b, w in blocks.items()}
    seconds = time.perf_counter() - t0
    finite_losses = [v for v in hist["loss"] if v is not None]
    last = len(hist["step"]) - 1
    last_finite = max(i for i, v in enumerate(hist["loss"]) if v is not None)
    res = {
        "key": key, "label": label, "kind": kind, "kfac_approx": approx,
        "damping": damping, "lr": lr, "steps": steps, "refresh": refresh if op is not None else None,
        "diverged_at": diverged_at, "diverge_reason": reason, "T1": T1,
        "loss0": loss0, "final_loss": hist["loss"][last] if diverged_at is None else None,
        "last_finite_loss": hist["loss"][last_finite], "last_finite_step": hist["step"][last_finite],
        "min_loss": min(finite_losses),
        "path_QK": _finite(path["QK"]), "path_VW": _finite(path["VW"]),
        "dist_end": {b: hist["dist"][b][last] for b in BLOCKS},
        "curvature_at_0": refreshes[0] if refreshes else None,
        "seconds": seconds, "hist": hist,
    }
    pq, pv = res["path_QK"], res["path_VW"]
    res["path_ratio"] = pq / pv if pq is not None and pv else None
    status = f"diverged at step {diverged_at} ({reason})" if diverged_at is not None else "did not diverge"
    log(f"{label:<34} δ={_damping_text(damping):<28} {status}; loss "
        f"{res['loss0']:.4f} -> {res['last_finite_loss']:.4g} (step {res['last_finite_step']}), T1 {T1}, "
        f"path Q/K {res['path_QK'] if pq is None else f'{pq:.3g}'} V/MLP "
        f"{res['path_VW'] if pv is None else f'{pv:.3g}'} [{seconds:.1f} s]")
    return res


def _curvature_record(op, inv) -> dict:
    """Per block kind at a refresh: the block's curvature scale (mean eigenvalue of the KFAC block,
    or of EKFAC's corrections) and the damping the inverse used."""
    rec = {}
    corr = op.corrections() if isinstance(op, ba.AttentionEKFACLinearOperator) else None
    for b in op.blocks():
        p, q = b.shape
        scale = float(corr[b.name].mean()) if corr is not None else float(
            b.out_factor.trace() * b.in_factor.trace() / (p * q))
        kind = {"linear": "W"}.get(b.group, f"W_{b.group}")
        rec[kind] = {"scale": scale, "damping": inv.damping[b.name]}
    return rec


def stability_grid(lrs, dampings, *, steps: int, refresh: int, seed: int, init_scale: float, log=print) -> list:
    """One cell per (lr, δ, recipe, damping style) of ``GRID_METHODS``: the divergence step or None."""
    cells = []
    for lr in lrs:
        for d in dampings:
            for approx, style in GRID_METHODS:
                damping = d if style == "global" else per_block(d)
                r = train((f"{approx}_{style}", f"KFAC {approx}, {style}", "kfac", approx, damping, lr), steps=steps,
                          refresh=refresh, seed=seed, init_scale=init_scale, log=lambda s: None)
                cells.append({"lr": lr, "damping": d, "kfac_approx": approx, "style": style,
                              **{k: r[k] for k in ("diverged_at", "diverge_reason", "last_finite_loss", "T1", "path_QK",
                                                   "path_VW", "seconds")}})
            log(f"grid lr {lr:g} δ {d:g}: " + ", ".join(
                f"{c['kfac_approx']}/{c['style']} " + ("stable" if c["diverged_at"] is None else f"div@{c['diverged_at']}")
                for c in cells[-len(GRID_METHODS):]))
    return cells


# ---------------------------------------------------------------------------------------------
# analysis and output
# ---------------------------------------------------------------------------------------------
def _outcome(r) -> str:
    return "did not diverge" if r["diverged_at"] is None else f"diverged at step {r['diverged_at']}"


def grid_facts(grid: list) -> dict:
    """From the stability map: in how many (grid point, recipe) pairs the per-block dict and the global δ
    differ in outcome (diverged or not), and the points where one recipe is stable and the other diverges."""
    stable = {(c["lr"], c["damping"], c["kfac_approx"], c["style"]): c["diverged_at"] is None for c in grid}
    points = sorted({(c["lr"], c["damping"]) for c in grid})
    pairs = [(lr, d, a) for lr, d in points for a in ("expand", "attention")]
    return {
        "pairs": len(pairs),
        "style changes outcome": sum(stable[(lr, d, a, "global")] != stable[(lr, d, a, "per-block")]
                                     for lr, d, a in pairs),
        "attention stable, expand diverges": [[lr, d] for lr, d in points if stable[(lr, d, "attention", "global")]
                                              and not stable[(lr, d, "expand", "global")]],
        "expand stable, attention diverges": [[lr, d] for lr, d in points if stable[(lr, d, "expand", "global")]
                                              and not stable[(lr, d, "attention", "global")]],
    }


def analyse(runs: dict, grid: list) -> dict:
    """The acceptance line and what the controls show (all from the runs and the map)."""
    g = runs[GENERIC]
    acc = {"generic": GENERIC, "generic diverged at": g["diverged_at"],
           "aware": {k: runs[k]["diverged_at"] for k in AWARE}}
    checks = {f"generic KFAC ({g['label']} {_damping_text(g['damping'])}) diverges": g["diverged_at"] is not None}
    for k in AWARE:
        r = runs[k]
        checks[f"{r['label']} ({_damping_text(r['damping'])}) does not diverge in {r['steps']} steps at the same lr"] = (
            r["diverged_at"] is None)
    acc["checks"] = checks
    acc["holds"] = all(checks.values())
    controls = []
    for k in ("attention_global", "expand_per_block", "attention_heuristic", "ekfac_heuristic", "expand_global_large"):
        if k in runs:
            r = runs[k]
            controls.append(f"{r['label']} ({_damping_text(r['damping'])}): {_outcome(r)}")
    if g["diverged_at"] is not None and g["path_QK"] is not None and g["path_VW"] is not None:
        controls.append(f"up to its divergence the generic run moved the Q/K weights a path length of "
                        f"{g['path_QK']:.3g} and the V/MLP weights {g['path_VW']:.3g}")
    if grid:
        f = acc["grid facts"] = grid_facts(grid)
        pts = lambda lst: ", ".join(f"({lr:g}, {d:g})" for lr, d in lst) or "no grid point"  # noqa: E731
        controls.append(f"in the stability map the per-block dict and the global δ give a different outcome in "
                        f"{f['style changes outcome']} of {f['pairs']} (grid point, recipe) pairs; the attention-aware "
                        f"recipe is stable where the generic one diverges at (lr, δ) = "
                        f"{pts(f['attention stable, expand diverges'])}, the reverse at "
                        f"{pts(f['expand stable, attention diverges'])}")
    acc["controls"] = controls
    return acc


def grid_table(cells: list) -> str:
    heads = [f"{a}, {s}" for a, s in GRID_METHODS]
    lines = ["| lr | δ | " + " | ".join(heads) + " |", "|---|---|" + "---|" * len(heads)]
    keys = sorted({(c["lr"], c["damping"]) for c in cells})
    for lr, d in keys:
        row = {(c["kfac_approx"], c["style"]): c for c in cells if (c["lr"], c["damping"]) == (lr, d)}
        lines.append(f"| {lr:g} | {d:g} | " + " | ".join(
            "stable" if row[m]["diverged_at"] is None else f"step {row[m]['diverged_at']}" for m in GRID_METHODS) + " |")
    return "\n".join(lines)


def plot(runs: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {k: dict(color=f"C{i}", ls="-" if i < 7 else "--") for i, (k, *_rest) in enumerate(METHODS)}
    early = 60
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.4))
    for k, r in runs.items():
        h = r["hist"]
        st = np.asarray(h["step"], dtype=float)
        lo = np.asarray([np.nan if v is None else v for v in h["loss"]])
        lab = f"{r['label']} ({_damping_text(r['damping'])})" if r["damping"] is not None else f"{r['label']} (lr {r['lr']:g})"
        for ax, sel in ((axes[0], st <= early), (axes[1], np.ones_like(st, dtype=bool))):
            x = st[sel] if ax is axes[0] else np.maximum(st[sel], 0.5)
            ax.plot(x, lo[sel], lw=1.3, label=lab, **styles[k])
            if r["diverged_at"] is not None and r["last_finite_step"] <= (early if ax is axes[0] else math.inf):
                xd = r["last_finite_step"] if ax is axes[0] else max(r["last_finite_step"], 0.5)
                ax.plot([xd], [r["last_finite_loss"]], "x", ms=9, mew=2, color=styles[k]["color"])
    axes[0].set_xlabel("step")
    axes[0].set_title(f"first {early} steps (× = last step before divergence)")
    axes[1].set_xscale("log")
    axes[1].set_xlabel("step (0 drawn at 0.5)")
    axes[1].set_title("all steps")
    for ax in axes:
        ax.set_yscale("log")
        ax.set_ylabel("logistic loss")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.savefig(out / "losses.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(17, 5.4))
    for k, r in runs.items():
        h = r["hist"]
        st = np.maximum(np.asarray(h["step"], dtype=float), 0.5)
        pq = np.asarray(h["path_QK"], dtype=float)
        pv = np.asarray(h["path_VW"], dtype=float)
        ok = st >= 1
        lab = f"{r['label']} ({_damping_text(r['damping'])})" if r["damping"] is not None else r["label"]
        axes[0].plot(st[ok], pq[ok], lw=1.3, label=lab, **styles[k])
        axes[1].plot(st[ok], pv[ok], lw=1.3, **styles[k])
        with np.errstate(divide="ignore", invalid="ignore"):
            axes[2].plot(st[ok], pq[ok] / pv[ok], lw=1.3, **styles[k])
    axes[0].set_title(r"path length of $(W_Q, W_K)$")
    axes[1].set_title(r"path length of $(W_V, W)$")
    axes[2].set_title("Q/K path / V-MLP path")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("step")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.savefig(out / "distances.png", dpi=110)
    plt.close(fig)


def _g(x, fmt=".4g"):
    return "–" if x is None else format(x, fmt)


def summary(runs: dict, acc: dict, grid: list, cfg: dict, command: str, seconds: float) -> str:
    lines = [
        "# Preconditioning the co-occurrence task: per-block vs global damping",
        "",
        f"Generated by `{command}` in {seconds:.0f} s wall-clock, {cfg['cpu_seconds']:.0f} s CPU "
        f"(torch {torch.__version__}, {cfg['threads']} thread(s), {platform.machine()}, 1-min load average "
        f"{cfg['load_average']:.1f} on {os.cpu_count()} cores at the end). Do not edit: rerun the example.",
        "",
        f"Task and model of `examples/cooccurrence_phases.py`: n = {N_SEQ} sequences "
        f"({'/'.join(map(str, COUNTS))} both / μ1 only / μ2 only / neither) of L = {SEQ_LEN} one-hot tokens "
        f"(d = {D_TOKENS}), m = {M}, m1 = {M1}, logistic loss, init scale {cfg['init_scale']} × theory, seed "
        f"{cfg['seed']}; {cfg['steps']} full-batch steps per method. KFAC/EKFAC: type-2 Fisher, "
        f"update θ ← θ − lr (K + δ)⁻¹ ∇L, Kronecker factors (and EKFAC's corrections) and the "
        f"inverse recomputed every {cfg['refresh']} steps. A run *diverges* at the first step whose loss is "
        f"non-finite or above {cfg['diverge_factor']:g} × its step-0 loss, whose parameters are non-finite, or "
        "whose curvature computation fails; it stops there.",
        "",
        f"**How the setting was chosen.** The KFAC step size lr = {cfg['kfac_lr']:g} and the global damping "
        f"δ = {cfg['global_damping']:g} of the runs below were picked *after* running the stability map at the end "
        "of this page, as a grid point where the generic and the attention-aware KFAC behave differently; "
        "the per-block dict gives Q and K "
        f"δ = {cfg['qk_damping']:g} and everything else the global δ. Read the acceptance line together "
        "with the map and the controls.",
        "",
        "## Acceptance",
        "",
        "| check | holds |",
        "|---|---|",
    ]
    lines += [f"| {k} | {'yes' if v else '**no**'} |" for k, v in acc["checks"].items()]
    if acc.get("controls"):
        lines += ["", "Controls (same lr and δ, one ingredient swapped): " + "; ".join(acc["controls"]) + "."]
    lines += [
        "",
        "## Runs",
        "",
        "Path lengths are sums of step norms (until the run stopped); *final loss* is the loss after the last "
        "step of a run that did not diverge, *last finite loss* the loss at the last step before a divergence.",
        "",
        "| method | lr | damping δ | diverged at step | final loss | last finite loss | min loss | T1 | "
        "Q/K path | V/MLP path | Q/K ÷ V/MLP |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k, r in runs.items():
        div = "did not diverge" if r["diverged_at"] is None else str(r["diverged_at"])
        lines.append(
            f"| {r['label']} | {r['lr']:g} | {_damping_text(r['damping'])} | {div} | {_g(r['final_loss'])} | "
            f"{_g(r['last_finite_loss'])} | {_g(r['min_loss'])} | {_g(r['T1'], 'd')} | {_g(r['path_QK'], '.3g')} | "
            f"{_g(r['path_VW'], '.3g')} | {_g(r['path_ratio'], '.3g')} |")
    div_reasons = [(r["label"], _damping_text(r["damping"]), r["diverged_at"], r["diverge_reason"])
                   for r in runs.values() if r["diverged_at"] is not None]
    if div_reasons:
        lines += ["", "Divergences: " + "; ".join(f"{lab} ({d}) at step {s}: {why}" for lab, d, s, why in div_reasons)
                  + "."]
    lines += [
        "",
        "## Curvature scale and damping per block at step 0",
        "",
        "Curvature scale: the mean eigenvalue of each Kronecker block (EKFAC: of its corrected eigenvalues), "
        "next to the damping δ_b the inverse used; in directions where the curvature is below δ_b a step "
        "moves block b by about lr·‖g_b‖/δ_b.",
        "",
        "| method | " + " | ".join(f"{b} scale | {b} δ" for b in BLOCKS) + " |",
        "|---|" + "---|---|" * len(BLOCKS),
    ]
    for k, r in runs.items():
        c = r["curvature_at_0"]
        if c is None:
            continue
        lines.append(f"| {r['label']} ({_damping_text(r['damping'])}) | "
                     + " | ".join(f"{c[b]['scale']:.3g} | {c[b]['damping']:.3g}" for b in BLOCKS) + " |")
    lines += ["", "## Figures", "", "![losses](losses.png)", "", "![distances](distances.png)", ""]
    if grid:
        lines += [
            "## Stability map",
            "",
            f"KFAC on a grid of step sizes lr and dampings δ, {cfg['grid_steps']} steps per cell: *stable* (did not "
            "diverge) or the step at which the run diverged. *global*: δ for every block; *per-block*: Q and K "
            f"δ = {cfg['qk_damping']:g}, the other blocks δ (at δ = {cfg['qk_damping']:g} the two coincide).",
            "",
            grid_table(grid),
            "",
        ]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="40 steps per method, a one-point grid (< 1 min)")
    parser.add_argument("--steps", type=int, default=None, help="steps per method (default 300; --quick 40)")
    parser.add_argument("--grid-steps", type=int, default=None,
                        help="steps per stability-map cell (default 100; --quick 30; 0: no map)")
    parser.add_argument("--refresh", type=int, default=10, help="recompute the KFAC factors every this many steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init-scale", type=float, default=0.3, help="multiple of the theory's init scales")
    parser.add_argument("--only", default=None, help="comma-separated method keys (default: all)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    if args.refresh < 1:
        parser.error(f"--refresh must be a positive integer, got {args.refresh}")
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be a positive integer, got {args.steps}")
    if args.grid_steps is not None and args.grid_steps < 0:
        parser.error(f"--grid-steps must be >= 0, got {args.grid_steps}")
    methods = METHODS
    if args.only:
        keys = args.only.split(",")
        unknown = sorted(set(keys) - {m[0] for m in METHODS})
        if unknown:
            parser.error(f"--only: unknown methods {unknown}; accepted: {[m[0] for m in METHODS]}")
        methods = [m for m in METHODS if m[0] in keys]
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        steps = args.steps or (40 if args.quick else 300)
        grid_steps = args.grid_steps if args.grid_steps is not None else (30 if args.quick else 100)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        t0, cpu0 = time.perf_counter(), time.process_time()
        kw = dict(refresh=args.refresh, seed=args.seed, init_scale=args.init_scale)
        runs = {m[0]: train(m, steps=steps, **kw) for m in methods}
        grid = []
        if grid_steps:
            lrs, dampings = (GRID_LRS[:1], QUICK_GRID_DAMPINGS) if args.quick else (GRID_LRS, GRID_DAMPINGS)
            grid = stability_grid(lrs, dampings, steps=grid_steps, **kw)
        acc = analyse(runs, grid) if all(k in runs for k in (GENERIC, *AWARE)) else {"checks": {}, "holds": None}
        plot(runs, out)
        seconds = time.perf_counter() - t0
        cfg = {"steps": steps, "grid_steps": grid_steps, "refresh": args.refresh, "seed": args.seed,
               "init_scale": args.init_scale, "quick": args.quick, "kfac_lr": KFAC_LR, "global_damping": GLOBAL_DAMPING,
               "qk_damping": QK_DAMPING, "diverge_factor": DIVERGE_FACTOR,
               "cpu_seconds": time.process_time() - cpu0, "threads": torch.get_num_threads(),
               "load_average": os.getloadavg()[0], "seconds": seconds}
        command = "python examples/preconditioning.py" + (" --quick" if args.quick else "")
        for flag, value, default in (("--steps", args.steps, None), ("--grid-steps", args.grid_steps, None),
                                     ("--refresh", args.refresh, 10), ("--seed", args.seed, 0),
                                     ("--init-scale", args.init_scale, 0.3), ("--only", args.only, None)):
            if value != default:
                command += f" {flag} {value}"
        (out / "summary.md").write_text(summary(runs, acc, grid, cfg, command, seconds))
        result = {"config": cfg, "acceptance": acc, "runs": runs, "grid": grid}
        (out / "results.json").write_text(json.dumps(result, separators=(",", ":"), allow_nan=False))
        print()
        for k, v in acc["checks"].items():
            print(f"[{'ok' if v else 'NO'}] {k}")
        for c in acc.get("controls", []):
            print(f"control: {c}")
        print(f"acceptance holds: {acc['holds']}")
        print(f"wrote {out}/summary.md, results.json, losses.png, distances.png in {seconds:.0f} s")
        return result
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
