"""Report section ``growth``: block heterogeneity and growth exponents (the paper's Fig. 1 and 3).

The study itself is :mod:`backpack_attention.report.heterogeneity`.
"""

from __future__ import annotations

from backpack_attention.report.framework import Figure, ReportContext, SectionResult, register_section
from backpack_attention.report.heterogeneity import growth_summary, sweep_figure


@register_section("growth", "Block heterogeneity and growth exponents (the paper's Fig. 1 and 3)", order=45)
def growth(ctx: ReportContext) -> SectionResult:
    md, results = ctx.cached("growth", lambda: growth_summary(num_sequences=8, seed=ctx.options.seed))
    return SectionResult(md, [Figure("hessian_growth.png", "block norms vs embedding scale", lambda: sweep_figure(results))])
