"""Report section ``phases``: how the attention curvature changes during a short training run.

The headline of ``examples/cooccurrence_phases.py`` (Yang et al.) and ``examples/attention_entropy.py``
(JoMA) on the built-in model: a copy of the report's model is trained with Adam for a few steps on
the report's data, and at checkpoints the exact diagonal Hessian blocks of each attention layer on
the first 8 sequences (``hessian_blocks``, all heads) give

* the Q/K-vs-V Gauss–Newton ratio ``‖GGN_QQ‖_F / ‖GGN_VV‖_F`` (and the same for K): how far the
  query/key curvature sits below the value curvature, and how fast it catches up;
* ``‖H_functional‖_F / ‖GGN‖_F`` of the (W_Q, W_Q) and (W_K, W_K) blocks: functional- (> 1) or
  Gauss–Newton-dominated (< 1);
* the mean entropy of the attention rows (nats).

The report's model itself is not changed. :func:`training_phases` also works outside the report.
"""

from __future__ import annotations

import copy
from typing import Dict, Sequence

import torch
from torch import nn

from backpack_attention import MultiheadSelfAttention, hessian_blocks
from backpack_attention.report.framework import Figure, ReportContext, SectionResult, md_table, register_section

STEPS = 100
CHECKPOINTS = (0, 25, 100)
CURVATURE_SEQUENCES = 8  # the blocks are measured on the first 8 sequences (report runtime: a few seconds)
LR = 1e-2
BLOCKS = ("W_Q", "W_K", "W_V")
FIGURE_NAME = "training_phases.png"


def attention_entropy(model: nn.Module, module: MultiheadSelfAttention, X) -> float:
    """Mean over sequences, heads and query positions of the entropy of ``module``'s attention rows."""
    seen = {}

    def hook(m, args, kwargs):
        seen["args"] = (args[0].detach(),) + tuple(args[1:])
        seen["kwargs"] = dict(kwargs)

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(X)
            A = module.attention_weights(*seen["args"], **seen["kwargs"])
    finally:
        handle.remove()
    return float(-torch.special.xlogy(A, A).sum(-1).mean())


def measure(model: nn.Module, loss_func, X, y, curvature_sequences: int = CURVATURE_SEQUENCES) -> Dict:
    """Loss on ``(X, y)``, and per attention layer the block norms and the attention entropy on the first
    ``curvature_sequences`` sequences, of ``model`` now."""
    with torch.no_grad():
        loss = float(loss_func(model(X), y))
    Xc, yc = X[:curvature_sequences], y[:curvature_sequences]
    layers = []
    for module in [m for m in model.modules() if isinstance(m, MultiheadSelfAttention)]:
        hb = hessian_blocks(model, loss_func, module, [(Xc, yc)])
        norms = {}
        for b in BLOCKS:
            blk = hb[(b, None), (b, None)]
            norms[b] = {"outer": blk.outer.norm().item(), "functional": blk.functional.norm().item()}
        # entropy of probability rows only (linear attention has raw scores, no distribution)
        entropy = attention_entropy(model, module, Xc) if module.attention == "softmax" else None
        layers.append({"blocks": norms, "entropy": entropy})
    return {"loss": loss, "layers": layers}


def training_phases(model: nn.Module, loss_func, X, y, *, steps: int = STEPS,
                    checkpoints: Sequence[int] = CHECKPOINTS, lr: float = LR,
                    curvature_sequences: int = CURVATURE_SEQUENCES) -> Dict:
    """Train a copy of ``model`` (Adam, step size ``lr``, full batch ``(X, y)``) for ``steps`` steps and
    :func:`measure` it at ``checkpoints`` (curvature on the first ``curvature_sequences`` sequences).
    ``model`` is not changed.

    Returns ``{"steps", "lr", "rows": [{"step", "loss", "layers": [{"blocks": {block: {"outer",
    "functional"}}, "entropy"}]}]}`` with one row per checkpoint.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    bad = [c for c in checkpoints if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c <= steps]
    if bad or not checkpoints:
        raise ValueError(f"checkpoints must be ints in [0, steps={steps}] (at least one), got {list(checkpoints)}")
    if isinstance(curvature_sequences, bool) or not isinstance(curvature_sequences, int) or curvature_sequences <= 0:
        raise ValueError(f"curvature_sequences must be a positive int, got {curvature_sequences!r}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    model = copy.deepcopy(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    marks = set(checkpoints)
    rows = []
    for step in range(steps + 1):
        if step in marks:
            rows.append({"step": step, **measure(model, loss_func, X, y, curvature_sequences)})
        if step == steps:
            break
        opt.zero_grad(set_to_none=True)
        loss_func(model(X), y).backward()
        opt.step()
    return {"steps": steps, "lr": lr, "curvature_sequences": min(curvature_sequences, len(X)), "rows": rows}


def ratios(layer: Dict) -> Dict[str, float]:
    """``Q/V``, ``K/V`` (Gauss–Newton norms) and ``Q f/o``, ``K f/o`` (functional over outer) of one layer."""
    b = layer["blocks"]
    return {"Q/V": b["W_Q"]["outer"] / b["W_V"]["outer"], "K/V": b["W_K"]["outer"] / b["W_V"]["outer"],
            "Q f/o": b["W_Q"]["functional"] / b["W_Q"]["outer"], "K f/o": b["W_K"]["functional"] / b["W_K"]["outer"]}


def _entropy(layer: Dict) -> str:
    return "–" if layer["entropy"] is None else f"{layer['entropy']:.3f}"


def phases_markdown(res: Dict) -> str:
    rows = res["rows"]
    first, last = rows[0], rows[-1]
    table = []
    for r in rows:
        for i, layer in enumerate(r["layers"]):
            q = ratios(layer)
            table.append([r["step"], i + 1, f"{r['loss']:.4f}", _entropy(layer), f"{q['Q/V']:.3g}",
                          f"{q['K/V']:.3g}", f"{q['Q f/o']:.3g}", f"{q['K f/o']:.3g}"])
    lines = [
        f"A copy of the model is trained with Adam (step size {res['lr']:g}, full batch, {res['steps']} steps) on "
        "the report's data (loss on all sequences); at each checkpoint the exact diagonal Hessian blocks of every "
        f"attention layer on the first {res['curvature_sequences']} sequences "
        "(`hessian_blocks`, all heads) give the Q/K-vs-V Gauss–Newton ratio ‖GGN_QQ‖_F / ‖GGN_VV‖_F, the "
        "functional-to-Gauss–Newton ratio ‖H_f‖_F / ‖GGN‖_F of the query and key blocks and the mean entropy "
        "of the attention rows (nats). `examples/cooccurrence_phases.py` and `examples/attention_entropy.py` "
        "study the same quantities over long runs.",
        "",
        md_table(["step", "layer", "loss", "attention entropy", "GGN Q/V", "GGN K/V", "Q: ‖H_f‖/‖GGN‖",
                  "K: ‖H_f‖/‖GGN‖"], table),
        "",
    ]
    for i, (a, b) in enumerate(zip(first["layers"], last["layers"])):
        qa, qb = ratios(a), ratios(b)
        lines.append(
            f"Layer {i + 1}, step {first['step']} → {last['step']}: the Q-vs-V GGN ratio changed by a factor "
            f"**{qb['Q/V'] / qa['Q/V']:.3g}** (K: {qb['K/V'] / qa['K/V']:.3g}), ‖H_f‖/‖GGN‖ of Q from "
            f"{qa['Q f/o']:.3g} to {qb['Q f/o']:.3g} (K: {qa['K f/o']:.3g} to {qb['K f/o']:.3g}), the attention "
            f"entropy from {_entropy(a)} to {_entropy(b)}; loss {first['loss']:.4f} → {last['loss']:.4f}."
        )
    return "\n".join(lines)


def phases_figure(res: Dict):
    """Ratios against the step, one line per layer and quantity (a matplotlib Figure)."""
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=(10, 3.6))
    axes = fig.subplots(1, 2)
    steps = [max(r["step"], 0.5) for r in res["rows"]]
    nl = len(res["rows"][0]["layers"])
    for i in range(nl):
        q = [ratios(r["layers"][i]) for r in res["rows"]]
        for key, ax, ls in (("Q/V", axes[0], "-"), ("K/V", axes[0], "--"), ("Q f/o", axes[1], "-"), ("K f/o", axes[1], "--")):
            vals = [v[key] for v in q]
            if all(v > 0 for v in vals):  # log axes: a part that is exactly zero (linear attention) is left out
                ax.plot(steps, vals, ls, marker="o", ms=3, color=f"C{i}", label=f"layer {i + 1} {key}")
    axes[0].set_title("Gauss–Newton: Q/K block vs V block (Frobenius)")
    axes[1].set_title("Q/K blocks: functional / Gauss–Newton (Frobenius)")
    axes[1].axhline(1.0, color="k", lw=0.8)
    for ax in axes:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("Adam step (0 drawn at 0.5)")
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


@register_section("phases", "Training phases: Q/K curvature catching up (Yang et al., JoMA)", order=47)
def phases(ctx: ReportContext) -> SectionResult:
    res = ctx.cached("phases", lambda: training_phases(ctx.model, ctx.loss_func, ctx.X, ctx.y))
    return SectionResult(phases_markdown(res), [Figure(FIGURE_NAME, "curvature ratios during training",
                                                       lambda: phases_figure(res))])
