"""Report section ``gradient_norms``: gradient norms per Q/K/V/O block, layer and head."""

from __future__ import annotations

import math

from backpack_attention.report.framework import (
    Figure, ReportContext, SectionResult, fmt, layout_of, md_table, register_section,
)


def _gradient_norms(ctx: ReportContext):
    """``{layer: {block: [norm per head]}}`` (``b_O``: one entry)."""
    out = []
    for att in ctx.attention_layers:
        layout = layout_of(att)
        g = ctx.flat_attention_gradient(att)
        norms = {}
        for name in layout.block_names():
            heads = [None] if name == "b_O" else range(layout.num_heads)
            norms[name] = [float(g[layout.param_index(name, h)].norm()) for h in heads]
        out.append(norms)
    return out


@register_section("gradient_norms", "Gradient norms per attention block", order=30)
def gradient_norms(ctx: ReportContext) -> SectionResult:
    norms = ctx.cached("gradient_norms", lambda: _gradient_norms(ctx))
    att = ctx.attention_layers[0]
    H = att.num_heads
    loss, grads = ctx.loss_and_gradients()
    total = math.sqrt(sum(float(g.square().sum()) for g in grads.values()))
    lines = [f"Euclidean norm of the gradient of the loss ({fmt(loss)}) restricted to each block, per "
             f"layer and head (whole-model gradient norm {fmt(total)}).", ""]
    header = ["layer", "block"] + [f"head {h}" for h in range(H)] + ["all heads"]
    rows = []
    for i, layer in enumerate(norms):
        for name, vals in layer.items():
            all_heads = math.sqrt(sum(v * v for v in vals))
            cells = [fmt(vals[0])] + [""] * (H - 1) if name == "b_O" else [fmt(v) for v in vals]
            rows.append([i, f"`{name}`", *cells, fmt(all_heads)])
    lines.append(md_table(header, rows))
    if ctx.options.attention == "softmax" and att.bias:
        worst = max(max(layer["b_K"]) for layer in norms)
        lines += ["", f"`b_K` gets no gradient in softmax attention (a row shift of the scores does "
                  f"not change the softmax; docs/math.md §5.2): largest `b_K` gradient norm here {fmt(worst)}."]
    figures = []
    if ctx.options.plots:
        figures.append(Figure("gradient_norms.png", "Gradient norm per Q/K/V/O weight block, layer and head",
                              lambda: _plot_gradient_norms(norms, H)))
    return SectionResult("\n".join(lines), figures)


def _plot_gradient_norms(norms, H):
    from matplotlib.figure import Figure as MplFigure

    blocks = ["W_Q", "W_K", "W_V", "W_O"]
    n_layers = len(norms)
    fig = MplFigure(figsize=(1.5 + 2.8 * n_layers, 3.2), layout="constrained")
    axes = fig.subplots(1, n_layers, squeeze=False, sharey=True)[0]
    width = 0.8 / H
    for i, (ax, layer) in enumerate(zip(axes, norms)):
        for h in range(H):
            xs = [b + (h - (H - 1) / 2) * width for b in range(len(blocks))]
            ax.bar(xs, [layer[name][h] for name in blocks], width=width, label=f"head {h}")
        ax.set_xticks(range(len(blocks)), blocks)
        ax.set_title(f"layer {i}")
        ax.set_yscale("log")
    axes[0].set_ylabel("gradient norm")
    if H > 1:
        axes[-1].legend(fontsize="small")
    return fig
