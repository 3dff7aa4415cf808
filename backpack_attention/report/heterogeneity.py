r"""Block heterogeneity of the attention Hessian and its growth with the input scale (docs/math.md §6.1).

The paper's central finding (Ormaniec, Dangel & Singh, ICLR 2025): the query/key blocks of the
attention Hessian are orders of magnitude smaller than the value block at small input scale,
because they grow as :math:`\sigma^6` (outer) and :math:`\sigma^5` (functional) while the value
block grows as :math:`\sigma^2`. Linear attention removes the difference (all outer blocks
:math:`\sigma^6` for one layer). This module measures that on the built-in model with exact
closed-form blocks (no Hutchinson estimates): the embeddings are rescaled to standard deviation
:math:`\sigma`, weights and targets stay fixed, and log-log slopes of the Frobenius norms are fitted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from backpack_attention import hessian_blocks
from backpack_attention.models import default_problem

#: Exponents the paper states (softmax) and docs/math.md §6.1 derives (linear attention, one layer).
EXPECTED = {
    "softmax": {("W_Q", "outer"): 6, ("W_Q", "functional"): 5, ("W_Q", "full"): 5,
                ("W_K", "outer"): 6, ("W_K", "functional"): 5, ("W_K", "full"): 5,
                ("W_V", "outer"): 2, ("W_V", "full"): 2},
    "linear": {("W_Q", "outer"): 6, ("W_Q", "full"): 6, ("W_K", "outer"): 6, ("W_K", "full"): 6,
               ("W_V", "outer"): 6, ("W_V", "full"): 6},
}
PARTS = ("outer", "functional", "full")


@dataclass
class SweepResult:
    """Frobenius norms ``norms[(block, part)]`` (one per sigma) and fitted log-log ``slopes``."""

    attention: str
    sigmas: np.ndarray
    norms: dict = field(default_factory=dict)
    slopes: dict = field(default_factory=dict)

    def table(self) -> str:
        """Markdown table of measured vs expected exponents."""
        rows = ["| block | part | measured slope | expected |", "|---|---|---|---|"]
        for (block, part), s in self.slopes.items():
            exp = EXPECTED.get(self.attention, {}).get((block, part), "–")
            rows.append(f"| {block} | {part} | {s:.2f} | {exp} |")
        return "\n".join(rows)


def _rescale_embeddings(model, base, sigma: float) -> None:
    with torch.no_grad():
        model.embed.weight.copy_(sigma * base[0])
        model.pos.weight.copy_(sigma * base[1])


def scale_sweep(sigmas: Sequence[float], *, attention: str = "softmax", num_sequences: int = 32,
                seed: int = 0, layer: int = 0, head: int = 0, blocks=("W_Q", "W_K", "W_V"),
                progressbar: bool = True, **model_kwargs) -> SweepResult:
    """Exact block norms of one attention layer of the built-in model over input scales ``sigmas``.

    Args:
        sigmas: embedding standard deviations (positive, increasing).
        attention: ``"softmax"`` or ``"linear"``.
        num_sequences, seed: built-in data and model seed. layer, head: which block.
        blocks: within-head diagonal blocks to measure (``W_Q``, ``W_K``, ``W_V``).
        model_kwargs: passed to :func:`~backpack_attention.models.default_problem`
            (default: 1 layer, d=16, 1 head — the paper's setting, ``d_head = d_model``).

    Returns:
        :class:`SweepResult` with norms per (block, part) and slopes fitted over all ``sigmas``.
    """
    sigmas = np.asarray(sigmas, dtype=float)
    if sigmas.ndim != 1 or len(sigmas) < 2 or not np.all(sigmas > 0):
        raise ValueError(f"sigmas must be at least two positive numbers, got {sigmas.tolist()}")
    kw = dict(num_heads=1, attention=attention)
    kw.update(model_kwargs)
    model, loss_func, data = default_problem(seed=seed, num_sequences=num_sequences, **kw)
    if not 0 <= layer < len(model.blocks):
        raise ValueError(f"layer must be in range({len(model.blocks)}), got {layer}")
    torch.manual_seed(seed + 1)
    base = (torch.randn_like(model.embed.weight), torch.randn_like(model.pos.weight))
    module = model.blocks[layer].attn
    result = SweepResult(attention, sigmas, {(b, p): [] for b in blocks for p in PARTS})
    for sigma in tqdm(sigmas, desc=f"sigma sweep ({attention})", disable=not progressbar):
        _rescale_embeddings(model, base, float(sigma))
        hb = hessian_blocks(model, loss_func, module, data)
        for b in blocks:
            blk = hb[(b, head), (b, head)]
            for p in PARTS:
                result.norms[(b, p)].append(blk.part(p).norm().item())
    result.norms = {k: np.asarray(v) for k, v in result.norms.items()}
    for (b, p), v in result.norms.items():
        # A part that is zero up to rounding (e.g. the V functional block) has no slope.
        if np.all(np.isfinite(v)) and np.all(v > 1e-10 * result.norms[(b, "full")]):
            result.slopes[(b, p)] = float(np.polyfit(np.log(sigmas), np.log(v), 1)[0])
    return result


def heterogeneity_at_init(*, num_sequences: int = 32, seed: int = 0, **model_kwargs) -> dict:
    """Median |entry| and Frobenius norm of the (Q,Q) and (V,V) blocks of the built-in model at init."""
    kw = dict(num_heads=1)
    kw.update(model_kwargs)
    model, loss_func, data = default_problem(seed=seed, num_sequences=num_sequences, **kw)
    hb = hessian_blocks(model, loss_func, model.blocks[0].attn, data)
    out = {}
    for b in ("W_Q", "W_K", "W_V"):
        blk = hb[(b, 0), (b, 0)]
        out[b] = {"median_abs": blk.full.abs().median().item(), "fro_full": blk.full.norm().item(),
                  "fro_outer": blk.outer.norm().item(), "fro_functional": blk.functional.norm().item()}
    return out


def sweep_figure(results: Sequence[SweepResult]):
    """Log-log plot of block norms vs sigma, one panel per attention kind (a matplotlib Figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4), squeeze=False)
    for ax, res in zip(axes[0], results):
        for (b, p), v in res.norms.items():
            if p == "functional" and (b, p) not in res.slopes:
                continue
            label = f"{b} {p}" + (f" (slope {res.slopes[(b, p)]:.2f})" if (b, p) in res.slopes else "")
            ax.loglog(res.sigmas, v, marker="o", ms=3, ls="-" if p == "full" else "--" if p == "outer" else ":", label=label)
        ax.set_xlabel(r"embedding scale $\sigma$")
        ax.set_ylabel("Frobenius norm of block")
        ax.set_title(f"{res.attention} attention")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_sweeps(results: Sequence[SweepResult], path) -> Path:
    """Save :func:`sweep_figure` to ``path``; returns the path."""
    import matplotlib.pyplot as plt

    fig = sweep_figure(results)
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def growth_summary(*, num_sequences: int = 8, seed: int = 0, num_sigmas: int = 4, progressbar: bool = False):
    """``(markdown, results)``: heterogeneity at init and growth exponents on sigma in [1e-3, 1e-2]."""
    init = heterogeneity_at_init(num_sequences=num_sequences, seed=seed)
    sigmas = np.logspace(-3, -2, num_sigmas)
    results = [scale_sweep(sigmas, attention=a, num_sequences=num_sequences, seed=seed, progressbar=progressbar)
               for a in ("softmax", "linear")]
    q, v = init["W_Q"], init["W_V"]
    lines = [
        "The paper's setting on the built-in task (1 layer, d=16, 1 head, "
        f"{num_sequences} sequences, cross-entropy on the answer digits, embedding std 0.2), exact "
        "closed-form blocks:",
        "",
        "| block | median abs entry | Frobenius (full) | Frobenius (outer) | Frobenius (functional) |",
        "|---|---|---|---|---|",
    ]
    for b, s_ in init.items():
        lines.append(f"| ({b},{b}) | {s_['median_abs']:.2e} | {s_['fro_full']:.2e} | {s_['fro_outer']:.2e} "
                     f"| {s_['fro_functional']:.2e} |")
    lines += [
        "",
        f"The query block's median entry is {q['median_abs'] / v['median_abs']:.1e} times the value block's; "
        f"its functional part is {q['fro_functional'] / q['fro_outer']:.1f} times its outer (GGN) part.",
        "",
        f"Growth exponents: log-log slopes of the block norms over embedding scales sigma in [1e-3, 1e-2] "
        f"({num_sigmas} points; expected values from the paper and docs/math.md §6.1):",
        "",
    ]
    for res in results:
        lines += [f"**{res.attention} attention**", "", res.table(), ""]
    return "\n".join(lines), results
