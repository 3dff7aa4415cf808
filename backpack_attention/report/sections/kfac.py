"""Report section ``kfac``: how far KFAC and EKFAC are from the exact GGN of each attention layer.

The numbers are :func:`backpack_attention.kfac_quality` on the report's model, one call per attention
layer (docs/kfac.md): relative Frobenius errors per block and head of the attention-aware KFAC,
the generic KFAC-expand, the attention-aware EKFAC and the best single Kronecker product, and the
angle between the damped KFAC- and exact-GGN-preconditioned gradients.
"""

from __future__ import annotations

from typing import List

from backpack_attention.kfac_quality import METHODS, KFACQuality, kfac_quality
from backpack_attention.report.framework import Figure, ReportContext, SectionResult, fmt, md_table, register_section

#: Column titles of the methods of :data:`backpack_attention.kfac_quality.METHODS`.
TITLES = {"attention": "KFAC attention", "expand": "KFAC expand", "ekfac": "EKFAC attention",
          "best_kronecker": "best Kronecker product"}
FIGURE_NAME = "kfac_errors.png"
#: The section uses the first this many sequences of the report's data (dense [P, P] matrices; a few seconds).
KFAC_SEQUENCES = 8


def section_data(ctx: ReportContext):
    """The section's data: ``[(X, y)]`` with the first :data:`KFAC_SEQUENCES` sequences of the report's."""
    return [(ctx.X[:KFAC_SEQUENCES], ctx.y[:KFAC_SEQUENCES])]


def layer_quality(ctx: ReportContext) -> List[KFACQuality]:
    """:func:`~backpack_attention.kfac_quality` of every attention layer of the report's model on
    :func:`section_data` (cached)."""
    return ctx.cached("kfac_quality", lambda: [kfac_quality(ctx.model, ctx.loss_func, m, section_data(ctx))
                                               for m in ctx.attention_layers])


@register_section("kfac", "KFAC and EKFAC against the exact GGN", order=50)
def kfac(ctx: ReportContext) -> SectionResult:
    results = layer_quality(ctx)
    rows = []
    for i, q in enumerate(results):
        for (block, head), errs in q.errors.items():
            rows.append([i, block, "all" if head is None else head]
                        + [fmt(errs[m]) if m in errs else "–" for m in METHODS])
    angles = md_table(["layer", "damping"] + [TITLES[m] for m in METHODS if m != "best_kronecker"],
                      [[i, fmt(q.damping)] + [fmt(q.angles[m]) for m in METHODS if m in q.angles]
                       for i, q in enumerate(results)])
    md = (
        "Relative Frobenius error ‖K_b − G_b‖_F / ‖G_b‖_F of Kronecker-factored approximations K of each "
        "attention layer's exact GGN G (closed-form blocks), per block b and head (`all`: the block of all "
        "heads; `layer`: the layer's whole GGN, where the block-diagonal KFAC also drops the couplings between "
        f"blocks), from `backpack_attention.kfac_quality` on the first {section_data(ctx)[0][0].shape[0]} of the report's "
        "sequences "
        "(type-2 Fisher, weight and bias in one block). "
        "*KFAC attention* is `AttentionKFACLinearOperator(kfac_approx=\"attention\")`, *KFAC expand* the "
        "generic weight-sharing recipe of `nn.Linear`-based libraries, *EKFAC attention* "
        "`AttentionEKFACLinearOperator`, and the *best Kronecker product* (Van Loan–Pitsianis) the floor of any "
        "single Kronecker product of that block.\n\n"
        + md_table(["layer", "block", "head"] + [TITLES[m] for m in METHODS], rows)
        + "\n\nAngle (degrees) between the damped KFAC- and exact-GGN-preconditioned gradients of each layer, "
        "∠((K + δI)⁻¹g, (G + δI)⁻¹g), with δ = 1e-3 × the mean eigenvalue of G:\n\n" + angles
    )
    return SectionResult(md, [Figure(FIGURE_NAME, "relative Frobenius error of KFAC per block (all heads)",
                                     lambda: _figure(results))])


def _figure(results: List[KFACQuality]):
    import numpy as np
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=(4.2 * len(results) + 1.5, 3.6))
    axes = fig.subplots(1, len(results), squeeze=False)[0]
    for i, (ax, q) in enumerate(zip(axes, results)):
        keys = [k for k in q.errors if k[1] is None]  # all-heads blocks and the whole layer
        x = np.arange(len(keys))
        width = 0.8 / len(METHODS)
        for j, m in enumerate(METHODS):
            vals = [q.errors[k].get(m, np.nan) for k in keys]
            ax.bar(x + (j - (len(METHODS) - 1) / 2) * width, vals, width, label=TITLES[m])
        ax.set_xticks(x, [k[0] for k in keys])
        ax.set_yscale("log")
        ax.set_title(f"layer {i}")
        ax.set_ylabel("relative Frobenius error")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig
