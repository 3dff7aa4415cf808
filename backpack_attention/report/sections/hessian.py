"""Report section ``hessian_blocks``: closed-form Hessian block norms per layer and head, and a heat map."""

from __future__ import annotations

import torch

from backpack_attention import hessian_blocks
from backpack_attention.report.framework import (
    Figure, ReportContext, SectionResult, fmt, layout_of, md_table, register_section,
)

#: Layers whose whole attention Hessian has more parameters than this get no heat map.
MAX_HEATMAP_PARAMS = 4000


def _layer_blocks(ctx: ReportContext):
    return ctx.cached(
        "hessian_blocks",
        lambda: [hessian_blocks(ctx.model, ctx.loss_func, m, ctx.data) for m in ctx.attention_layers],
    )


@register_section("hessian_blocks", "Attention Hessian blocks (closed form)", order=40)
def hessian_block_norms(ctx: ReportContext) -> SectionResult:
    rows = []
    for i, hb in enumerate(_layer_blocks(ctx)):
        for name in ("W_Q", "W_K", "W_V", "W_O"):
            for h in range(hb.H):
                b = hb[(name, h), (name, h)]
                rows.append([i, name, h, fmt(b.outer.norm()), fmt(b.functional.norm()), fmt(b.full.norm()),
                             fmt(b.full.abs().median())])
    md = (
        "Exact diagonal blocks of each attention layer's loss Hessian, per head, split into the outer "
        "(Gauss-Newton) and functional parts (`backpack_attention.hessian_blocks`; Frobenius norms). "
        "The functional part includes the curvature of the network above the layer.\n\n"
        + md_table(["layer", "block", "head", "outer", "functional", "full", "median abs entry"], rows)
    )
    figures = []
    module = ctx.attention_layers[0]
    P = sum(p.numel() for p in module.parameters())
    if P <= MAX_HEATMAP_PARAMS:
        figures.append(Figure("hessian_heatmap.png", "log10 |H| of layer 0, head 0 (Q, K, V, O weights)",
                              lambda: _heatmap(_layer_blocks(ctx)[0], module)))
    else:
        md += f"\n\n(No heat map: layer 0 has {P} attention parameters, more than {MAX_HEATMAP_PARAMS}.)"
    return SectionResult(md, figures)


def _heatmap(hb, module):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layout = layout_of(module)
    names = ("W_Q", "W_K", "W_V", "W_O")
    idx = torch.cat([layout.param_index(n, head=0) for n in names])
    H = hb.block(idx, idx).full.abs()
    fig, ax = plt.subplots(figsize=(6, 5))
    im = ax.imshow(torch.log10(H + 1e-12).cpu().numpy(), cmap="viridis", interpolation="nearest")
    edges, ticks, pos = [], [], 0
    for n in names:
        size = len(layout.param_index(n, head=0))
        ticks.append(pos + size / 2)
        pos += size
        edges.append(pos - 0.5)
    for e in edges[:-1]:
        ax.axhline(e, color="w", lw=0.5)
        ax.axvline(e, color="w", lw=0.5)
    ax.set_xticks(ticks, names)
    ax.set_yticks(ticks, names)
    fig.colorbar(im, ax=ax, label="log10 |H|")
    ax.set_title("Hessian of layer 0, head 0: weights of Q, K, V, O")
    fig.tight_layout()
    return fig
