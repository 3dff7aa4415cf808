"""Report section ``spectra``: extreme eigenvalues of each attention block (Lanczos on the exact operators).

The eigenvalues come from the library function
:func:`backpack_attention.spectra.attention_block_eigenvalues`; :func:`report_section` packages
them (Markdown table and figure) and also works outside the report, on a plain dict.
"""

from __future__ import annotations

import os
from typing import Dict

from backpack_attention.operators import PARTS
from backpack_attention.report.framework import Figure, ReportContext, SectionResult, register_section
from backpack_attention.spectra import DEFAULT_BLOCKS, attention_block_eigenvalues, format_table, plot_block_spectra

FIGURE_NAME = "attention_block_spectra.png"


def report_section(context) -> Dict:
    """Markdown and figure of the "attention block spectra" section of ``backpack-attention report``.

    Args:
        context: either a dict or a :class:`~backpack_attention.report.ReportContext`.

            * dict keys: ``model``, ``loss_func``, ``data`` (required; as for
              :func:`~backpack_attention.spectra.attention_block_eigenvalues`), ``out_dir`` (directory
              for the figure, created if needed; ``None``/absent = do not save), and optional ``k``
              (default 5), ``layers``, ``blocks`` (default Q, K, V, O), ``per_head`` (default
              ``False``, to keep the table short), ``parts``, ``which`` (default ``("LA", "SA")``),
              ``operator_kwargs`` (dict for the operator, e.g. ``{"check_deterministic": False}``).
            * a ``ReportContext`` (attributes ``model``, ``loss_func``, ``data``): the defaults above.
              No figure is saved; use the returned ``draw``.

    Returns:
        A dict with ``markdown`` (str: intro, figure link, table), ``figures`` (list of saved paths),
        ``figure_name`` (``"attention_block_spectra.png"``), ``draw`` (a function returning the
        matplotlib figure, e.g. for the report's ``Figure(name, caption, draw)``) and ``rows``.
    """
    if not isinstance(context, dict):
        context = {"model": context.model, "loss_func": context.loss_func, "data": context.data}
    missing = [key for key in ("model", "loss_func", "data") if key not in context]
    if missing:
        raise ValueError(f"context is missing {missing}; required keys: model, loss_func, data (and out_dir to save)")
    rows = attention_block_eigenvalues(
        context["model"], context["loss_func"], context["data"], context.get("k", 5),
        layers=context.get("layers"), blocks=context.get("blocks", DEFAULT_BLOCKS),
        per_head=context.get("per_head", False), parts=context.get("parts", PARTS),
        which=context.get("which", ("LA", "SA")), progress=False, **context.get("operator_kwargs", {}),
    )

    def draw():
        return plot_block_spectra(rows, title="Attention curvature blocks: extreme eigenvalues")

    figures = []
    if context.get("out_dir") is not None:
        os.makedirs(context["out_dir"], exist_ok=True)
        path = os.path.join(context["out_dir"], FIGURE_NAME)
        fig = draw()
        fig.savefig(path, dpi=120)
        import matplotlib.pyplot as plt

        plt.close(fig)
        figures.append(path)
    md = (
        "Extreme eigenvalues (largest `LA`, smallest `SA`) of each attention layer's Q, K, V and O blocks, "
        "for the outer-product part (GGN), the functional part (Hessian − GGN) and the full Hessian, "
        "computed matrix-free with `AttentionHessianLinearOperator` (dense for small blocks, `eigsh` "
        "otherwise). The functional (V, V) and (W_O, W_O) blocks are exactly zero.\n\n"
        + (f"![attention block spectra]({FIGURE_NAME})\n\n" if figures else "")
        + format_table(rows) + "\n"
    )
    return {"markdown": md, "figures": figures, "figure_name": FIGURE_NAME, "draw": draw, "rows": rows}


@register_section("spectra", "Attention block spectra (Lanczos on the exact operators)", order=60)
def spectra(ctx: ReportContext) -> SectionResult:
    sec = report_section(ctx)
    return SectionResult(sec["markdown"], [Figure(sec["figure_name"], "extreme eigenvalues per block", sec["draw"])])
