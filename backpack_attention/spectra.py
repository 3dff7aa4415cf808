"""Eigenvalues of attention curvature blocks: per layer, per block (Q, K, V, O), per head, per part.

:func:`attention_block_eigenvalues` runs, for each attention layer, one
:class:`~backpack_attention.operators.AttentionHessianLinearOperator` over that layer's
parameters (its per-batch cache is shared by all blocks, heads and parts of the layer) and takes
``SubmatrixLinearOperator`` views of the blocks given by :func:`~backpack_attention.param_index`.
Eigenvalues come from a dense eigendecomposition for small blocks and from ``scipy.sparse.linalg.eigsh``
(implicitly restarted Lanczos, fully re-orthogonalised) otherwise. :func:`format_table` and
:func:`plot_block_spectra` turn its rows into a Markdown table and a figure. The report section
that packages them is :mod:`backpack_attention.report.sections.spectra` (application code).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from scipy.sparse.linalg import ArpackNoConvergence, eigsh
from torch import nn
from tqdm.auto import tqdm

from backpack_attention._compat import SubmatrixLinearOperator
from backpack_attention.module import BLOCK_NAMES, MultiheadSelfAttention, param_index
from backpack_attention.operators import PARTS, AttentionHessianLinearOperator

DEFAULT_BLOCKS = ("W_Q", "W_K", "W_V", "W_O")


def _attention_layers(model: nn.Module):
    return [(n or "<model>", m) for n, m in model.named_modules() if isinstance(m, MultiheadSelfAttention)]


def _block_eigs(op, n: int, k: int, which: Sequence[str], dense_max: int, tol: float, seed: int,
                dense_fallback_max: int = 2048) -> Dict[str, np.ndarray]:
    """``k`` extreme eigenvalues per entry of ``which`` ("LA": largest, "SA": smallest), sorted descending."""
    k = min(k, n)
    if n <= dense_max or k >= n - 1:
        D = (op @ torch.eye(n, dtype=op.dtype, device=op.device)).detach().cpu().double()
        ev = torch.linalg.eigvalsh(0.5 * (D + D.T)).numpy()
        return {w: np.sort(ev[-k:] if w == "LA" else ev[:k])[::-1] for w in which}
    A = op.to_scipy(dtype=np.float64)
    v0 = np.random.default_rng(seed).standard_normal(n)
    if np.linalg.norm(A.matvec(v0)) == 0.0:  # an exactly zero block (e.g. functional (V, V))
        return {w: np.zeros(k) for w in which}
    out = {}
    for w in which:
        try:
            ev = eigsh(A, k=k, which=w, v0=v0, tol=tol, maxiter=max(20 * n, 1000), return_eigenvectors=False)
        except ArpackNoConvergence:  # e.g. "SA" of a PSD block with a cluster of zero eigenvalues
            if n > dense_fallback_max:
                raise
            return _block_eigs(op, n, k, which, n, tol, seed)
        out[w] = np.sort(ev)[::-1]
    return out


def attention_block_eigenvalues(
    model: nn.Module,
    loss_func,
    data,
    k: int = 5,
    *,
    layers: Optional[Sequence[int]] = None,
    blocks: Sequence[str] = DEFAULT_BLOCKS,
    per_head: bool = True,
    parts: Sequence[str] = PARTS,
    which: Sequence[str] = ("LA",),
    dense_max: int = 512,
    dense_layer_max: int = 4096,
    tol: float = 1e-8,
    seed: int = 0,
    progress: bool = True,
    **operator_kwargs,
) -> List[Dict]:
    """Top-``k`` eigenvalues of each attention block of each layer, per head and per part.

    Args:
        model, loss_func, data: as for :class:`~backpack_attention.operators.AttentionHessianLinearOperator`.
        k: eigenvalues per block (and per entry of ``which``).
        layers: indices into the model's :class:`MultiheadSelfAttention` modules (in
            ``named_modules`` order); ``None`` = all.
        blocks: names from ``W_Q, W_K, W_V, b_Q, b_K, b_V, W_O, b_O``.
        per_head: add one row per head (``W_O`` of head ``h`` = its ``d_K`` input columns) besides the
            whole block (``head=None``).
        parts: any of ``"outer"`` (GGN), ``"functional"``, ``"full"``.
        which: ``"LA"`` (largest algebraic) and/or ``"SA"`` (smallest algebraic; the functional and full
            parts are indefinite).
        dense_max: blocks of at most this size are decomposed densely (exact); larger ones use ``eigsh``.
        dense_layer_max: layers with at most this many parameters get their whole matrix once per
            part (``P / column_chunk`` vectorised products) and every block is sliced from it and
            decomposed densely: far fewer products than one set per block and head.
        tol: ``eigsh`` relative tolerance for blocks decomposed iteratively (default ``1e-8``; ``0`` =
            machine precision, slower). seed: ``eigsh`` start vector seed.
        progress: show a tqdm progress bar over the (layer, block, head, part) eigenproblems.
        operator_kwargs: passed to the operator (``check_deterministic``, ``num_data``, ...).

    Returns:
        A list of dicts (one per layer, block, head, part, which) with keys ``layer`` (index),
        ``layer_name``, ``block``, ``head`` (``None`` = all heads), ``part``, ``which``, ``size``,
        ``eigenvalues`` (list of floats, descending).
    """
    if not isinstance(k, int) or k <= 0:
        raise ValueError(f"k must be a positive int, got {k!r}")
    bad = [b for b in blocks if b not in BLOCK_NAMES]
    if bad:
        raise ValueError(f"blocks: {bad} are not block names; accepted: {BLOCK_NAMES}")
    bad = [p for p in parts if p not in PARTS]
    if bad:
        raise ValueError(f"parts: {bad} are not parts; accepted: {PARTS}")
    bad = [w for w in which if w not in ("LA", "SA")]
    if bad:
        raise ValueError(f"which: {bad}; accepted: 'LA', 'SA'")
    all_layers = _attention_layers(model)
    if not all_layers:
        raise ValueError("model contains no backpack_attention.MultiheadSelfAttention (use convert_attention(model))")
    chosen = range(len(all_layers)) if layers is None else list(layers)
    for i in chosen:
        if not (isinstance(i, int) and 0 <= i < len(all_layers)):
            raise ValueError(f"layers: {i!r} is not in range({len(all_layers)})")
    tasks = []  # (layer, block, head, part), in output order
    for li in chosen:
        mod = all_layers[li][1]
        for block in blocks:
            if block.startswith("b_") and not mod.bias:
                continue
            heads = [None] + (list(range(mod.num_heads)) if per_head and block != "b_O" else [])
            tasks += [(li, block, head, part) for head in heads for part in parts]
    # one dense layer matrix per (layer, part) at a time: visit the tasks part by part, report in order
    order = sorted(range(len(tasks)), key=lambda t: (tasks[t][0], parts.index(tasks[t][3]), t))
    rows: List[Dict] = []
    op, op_layer, dense = None, None, {}
    per_task: Dict[int, List[Dict]] = {}
    for t in tqdm(order, desc="attention block eigenvalues", unit="block", disable=not progress):
        li, block, head, part = tasks[t]
        name, mod = all_layers[li]
        if op_layer != li:  # one operator per layer: its batch cache serves all blocks, heads and parts
            op = AttentionHessianLinearOperator(model, loss_func, list(mod.parameters()), data, **operator_kwargs)
            op_layer = li
        idx = param_index(mod, block, head).tolist()
        op.part = part  # the operator's batch cache holds the GGN, Hessian and functional graphs
        if op.shape[0] <= dense_layer_max:
            if (li, part) not in dense:  # the whole layer once per part; blocks are slices of it
                dense = {(li, part): (op @ torch.eye(op.shape[0], dtype=op.dtype, device=op.device)).detach().cpu().double()}
            D = dense[(li, part)][idx][:, idx]
            ev = torch.linalg.eigvalsh(0.5 * (D + D.T)).numpy()
            kk = min(k, len(idx))
            evs = {w: np.sort(ev[-kk:] if w == "LA" else ev[:kk])[::-1] for w in which}
        else:
            evs = _block_eigs(SubmatrixLinearOperator(op, idx, idx), len(idx), k, which, dense_max, tol, seed)
        per_task[t] = [{"layer": li, "layer_name": name, "block": block, "head": head, "part": part,
                        "which": w, "size": len(idx), "eigenvalues": [float(e) for e in ev]}
                       for w, ev in evs.items()]
    for t in range(len(tasks)):
        rows.extend(per_task[t])
    return rows


def format_table(rows: List[Dict], digits: int = 4) -> str:
    """Markdown table of :func:`attention_block_eigenvalues` rows."""
    lines = ["| layer | block | head | part | which | size | eigenvalues |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        ev = ", ".join(f"{e:.{digits}g}" for e in r["eigenvalues"])
        head = "all" if r["head"] is None else r["head"]
        lines.append(f"| {r['layer_name']} | {r['block']} | {head} | {r['part']} | {r['which']} | {r['size']} | {ev} |")
    return "\n".join(lines)


def plot_block_spectra(rows: List[Dict], path: Optional[str] = None, title: Optional[str] = None):
    """Scatter the eigenvalues per (layer, block, head), one panel per part (symlog y axis).

    Returns the matplotlib figure; saves it to ``path`` if given.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    parts = [p for p in PARTS if any(r["part"] == p for r in rows)]
    labels = []
    for r in rows:
        lab = f"L{r['layer']} {r['block']}" + ("" if r["head"] is None else f" h{r['head']}")
        if lab not in labels:
            labels.append(lab)
    fig, axes = plt.subplots(len(parts), 1, figsize=(max(6, 0.35 * len(labels) + 2), 2.6 * len(parts)),
                             squeeze=False, sharex=True)
    for ax, part in zip(axes[:, 0], parts):
        for r in rows:
            if r["part"] != part:
                continue
            lab = f"L{r['layer']} {r['block']}" + ("" if r["head"] is None else f" h{r['head']}")
            x = labels.index(lab)
            ax.scatter([x] * len(r["eigenvalues"]), r["eigenvalues"], s=12,
                       c="C0" if r["which"] == "LA" else "C3", alpha=0.8)
        ax.set_yscale("symlog", linthresh=1e-6)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_ylabel(f"{part}\neigenvalue")
    axes[-1, 0].set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
