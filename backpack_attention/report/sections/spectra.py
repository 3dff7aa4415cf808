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


def curvlinops_agreement(model, loss_func, data, blocks=("W_Q", "W_V")) -> str:
    """Markdown: the largest eigenvalue of the first attention layer's ``blocks`` (GGN and Hessian),
    from this package's operators and from curvlinops' ``GGNLinearOperator`` /
    ``HessianLinearOperator`` on ``torch_twin(model)`` (``nn.MultiheadAttention``, math kernel), each
    block cut out by curvlinops' ``SubmatrixLinearOperator`` and decomposed densely."""
    import torch

    from backpack_attention import MultiheadSelfAttention, param_index, torch_math_attention
    from backpack_attention._compat import SubmatrixLinearOperator, curvlinops_operator
    from backpack_attention.models import torch_twin
    from backpack_attention.operators import AttentionGGNLinearOperator, AttentionHessianLinearOperator

    attn = next(m for m in model.modules() if isinstance(m, MultiheadSelfAttention))
    if attn.attention != "softmax":
        return "(No curvlinops comparison: `nn.MultiheadAttention` has no linear attention.)\n"
    twin = torch_twin(model)
    mha = next(m for m in twin.modules() if isinstance(m, torch.nn.MultiheadAttention))
    ours = {"GGN": AttentionGGNLinearOperator, "Hessian": AttentionHessianLinearOperator}
    lines = ["| block | curvature | ours | curvlinops (`nn.MultiheadAttention`) | relative difference |",
             "|---|---|---|---|---|"]
    for block in blocks:
        idx = param_index(attn, block).tolist()  # W_Q, W_V: rows of in_proj_weight, the first parameter
        eye = torch.eye(len(idx), dtype=attn.in_proj_weight.dtype)
        for name, cls in ours.items():
            op = SubmatrixLinearOperator(cls(model, loss_func, [attn.in_proj_weight], data), idx, idx)
            a = torch.linalg.eigvalsh(op @ eye)[-1].item()
            with torch_math_attention():
                ref = curvlinops_operator(name.lower(), twin, loss_func,
                                          [mha.in_proj_weight], data)
                b = torch.linalg.eigvalsh(SubmatrixLinearOperator(ref, idx, idx) @ eye)[-1].item()
            diff = abs(a - b) / max(abs(b), 1e-300)
            lines.append(f"| {block} (layer 1) | {name} | {a:.6g} | {b:.6g} | {diff:.1e} |")
    return ("Cross-check: the largest eigenvalue of two blocks of the first layer, from our operators "
            "and from curvlinops' own on the same model built with `nn.MultiheadAttention` (the "
            "headline of `examples/spectra.py`; blocks decomposed densely):\n\n" + "\n".join(lines) + "\n")


@register_section("spectra", "Attention block spectra (Lanczos on the exact operators)", order=60)
def spectra(ctx: ReportContext) -> SectionResult:
    sec = report_section(ctx)
    markdown = sec["markdown"] + "\n" + curvlinops_agreement(ctx.model, ctx.loss_func, ctx.data)
    return SectionResult(markdown, [Figure(sec["figure_name"], "extreme eigenvalues per block", sec["draw"])])
