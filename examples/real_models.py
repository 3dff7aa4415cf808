r"""Whole-model curvature of real transformers: HuggingFace GPT-2 and BERT, timm's ViT.

Three models people study, built from tiny configs with random weights (nothing is downloaded),
in float64, converted in place by ``backpack_attention.convert_attention`` (their SDPA call goes
to the package's closed-form attention core; parameters, ``state_dict`` keys and outputs stay):

* ``gpt2``: ``transformers.GPT2LMHeadModel``, next-token cross-entropy over all positions;
* ``bert``: ``transformers.BertForSequenceClassification``, right-padded sequences with a padding
  ``attention_mask``, cross-entropy on the labels;
* ``vit``: ``timm``'s ``VisionTransformer``, image classification.

For each, on ALL parameters (embeddings, LayerNorms, attention, MLPs, heads; exact cross terms):

* the top Hessian and GGN eigenvalues (``scipy.sparse.linalg.eigsh`` on ``op.to_scipy()``, fixed
  ``v0``) of ``ba.AttentionHessianLinearOperator`` / ``ba.AttentionGGNLinearOperator``;
* the top Hessian eigenvalue of the W_Q and W_V blocks of each attention layer: an operator over
  that layer's attention weights (W_Q, W_K, W_V, W_O), cut to the block by curvlinops'
  ``SubmatrixLinearOperator``; blocks of up to 256 rows are decomposed densely (one batched
  product with the identity's columns, then ``eigvalsh``), larger ones by ``eigsh``;
* Hutchinson estimates of the Hessian and GGN traces (curvlinops' ``hutchinson_trace``, the same
  Rademacher probes for both sides: a fixed seed);

side by side with curvlinops' own ``HessianLinearOperator`` / ``GGNLinearOperator`` on the
*unconverted* model in its eager attention (HuggingFace ``attn_implementation="eager"``, timm
``fused_attn=False``), run under ``sdpa_kernel(SDPBackend.MATH)`` with the
``nn.MultiheadAttention`` fast path off: what a curvlinops user runs today. Times include building
the operators (ours also builds its per-batch cache on the first product).

LayerNorm: curvlinops' Hessian differentiates forward-over-reverse (``jvp`` of ``jacrev``), which
is wrong through ``layer_norm`` weights in torch 2.13/2.14 (docs/operators.md). The example
applies both Hessians and a double-backward reference (reverse over reverse on the unconverted
model, which is right) to the same random vectors and prints the relative error of the rows of
the LayerNorm weights and of all other rows. The GGN has no such problem: there both agree to
rounding.

Run:  python examples/real_models.py [--quick] [--out DIR] [--models gpt2 bert vit]

Full (under 2 minutes on 2 CPU cores): 2-layer models, width 32, 4 heads, about 20k parameters
each. ``--quick`` (under 30 s): width 8, 2 heads, about 1.5k parameters, the blocks of the first
layer only, fewer probes. One torch thread by default (``--threads``): the models are tiny, and
more threads only add synchronisation (on a loaded machine, a lot of it). Outputs in ``--out``
(default ``docs/examples/real_models``): ``summary.md``, ``results.json`` and
``block_eigenvalues.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, eigsh
from torch import nn

import backpack_attention as ba
from backpack_attention._compat import (CURVLINOPS_VERSION, SubmatrixLinearOperator, curvlinops_operator,
                                        hutchinson_trace)
from backpack_attention import torch_math_attention
from backpack_attention.adapters import converted_modules

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "docs" / "examples" / "real_models"
MODELS = ("gpt2", "bert", "vit")
BLOCKS = ("W_Q", "W_K", "W_V", "W_O")
#: blocks with at most this many rows are decomposed densely, larger ones by eigsh
DENSE_MAX = 256
DT = torch.float64

# sizes: (width, heads, layers, batch, tokens / image side)
SIZES = {
    False: dict(E=32, heads=4, layers=2, N=8, L=24, img=16, patch=4, vocab=96, probes=32, k=3, tol=1e-8,
                blocks=("W_Q", "W_V")),
    True: dict(E=8, heads=2, layers=2, N=4, L=8, img=8, patch=4, vocab=16, probes=16, k=2, tol=1e-8,
               blocks=("W_Q", "W_V")),
}


class Logits(nn.Module):
    """``X`` -> logits, the tensor the loss takes: HuggingFace models get a dict of inputs and
    return an output object; token logits are returned as ``[N, V, L]`` for cross-entropy."""

    def __init__(self, model: nn.Module, hf: bool, tokens: bool = False):
        super().__init__()
        self.model, self.hf, self.tokens = model, hf, tokens

    def forward(self, X):
        if not self.hf:
            return self.model(X)
        out = self.model(**X).logits
        return out.transpose(1, 2) if self.tokens else out


@dataclass
class Problem:
    """One model: ``ref`` (unconverted, eager attention: for curvlinops and the double-backward
    reference) and ``ours`` (converted copy, same weights), both ``Logits`` wrappers."""

    name: str
    title: str
    ref: nn.Module
    ours: nn.Module
    loss_func: nn.Module
    data: list
    batch_size_fn: Optional[Callable]
    #: per layer: (label, parameter names (attention weights), {block: flat indices into their concatenation})
    layers: List[tuple] = field(default_factory=list)
    #: names of the LayerNorm weights
    norm_weights: List[str] = field(default_factory=list)
    converted: List[tuple] = field(default_factory=list)

    def params(self, which: str, names=None) -> List[torch.Tensor]:
        ps = dict(getattr(self, which).named_parameters())
        return list(ps.values()) if names is None else [ps[n] for n in names]

    def kwargs(self) -> dict:
        return {} if self.batch_size_fn is None else {"batch_size_fn": self.batch_size_fn}


def _perturb_norms(model: nn.Module, seed: int) -> None:
    """Non-trivial LayerNorm weights and biases (a trained model's are not 1 and 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm) and m.weight is not None:
                m.weight.add_(0.3 * torch.randn(m.weight.shape, generator=g, dtype=m.weight.dtype))
                m.bias.add_(0.3 * torch.randn(m.bias.shape, generator=g, dtype=m.bias.dtype))


def _dict_batch_size(X) -> int:
    return next(iter(X.values())).shape[0]


def _fused_blocks(E: int, transposed: bool) -> Dict[str, torch.Tensor]:
    """Flat indices of W_Q, W_K, W_V in a fused qkv weight followed by the output weight [E, E]:
    ``[3E, E]`` (nn.Linear, rows q|k|v) or ``[E, 3E]`` (HF Conv1D, columns q|k|v)."""
    idx = torch.arange(3 * E * E)
    out = {}
    for b, name in enumerate(("W_Q", "W_K", "W_V")):
        if transposed:  # [E, 3E]: entry (i, j) at i * 3E + j, block b holds columns bE..(b+1)E
            out[name] = idx.view(E, 3 * E)[:, b * E:(b + 1) * E].reshape(-1)
        else:
            out[name] = idx[b * E * E:(b + 1) * E * E]
    out["W_O"] = 3 * E * E + torch.arange(E * E)
    return out


def _split_blocks(E: int) -> Dict[str, torch.Tensor]:
    """Separate query, key, value and output weights, each [E, E], concatenated."""
    return {b: i * E * E + torch.arange(E * E) for i, b in enumerate(BLOCKS)}


def build(name: str, quick: bool = False, seed: int = 0) -> Problem:
    """The model ``name`` (``gpt2``, ``bert``, ``vit``) with its data, converted and unconverted."""
    s = SIZES[quick]
    E, H, nl, N, L = s["E"], s["heads"], s["layers"], s["N"], s["L"]
    g = torch.Generator().manual_seed(seed + 100)
    torch.manual_seed(seed)
    if name in ("gpt2", "bert"):
        import transformers

        transformers.logging.set_verbosity_error()
    if name == "gpt2":
        import transformers

        cfg = transformers.GPT2Config(n_layer=nl, n_embd=E, n_head=H, vocab_size=s["vocab"], n_positions=L,
                                      n_inner=2 * E, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
        base = transformers.GPT2LMHeadModel(cfg)
        ids = torch.randint(0, s["vocab"], (N, L + 1), generator=g)
        X, y = {"input_ids": ids[:, :-1]}, ids[:, 1:]  # next-token prediction at every position
        tokens, loss = True, nn.CrossEntropyLoss()
        layers = [(f"layer {i + 1}", [f"model.transformer.h.{i}.attn.c_attn.weight",
                                      f"model.transformer.h.{i}.attn.c_proj.weight"], _fused_blocks(E, True))
                  for i in range(nl)]
        title = f"GPT-2 LM (transformers.GPT2LMHeadModel), {nl} layers, d={E}, {H} heads, N={N}, L={L}, next-token CE"
    elif name == "bert":
        import transformers

        cfg = transformers.BertConfig(num_hidden_layers=nl, hidden_size=E, num_attention_heads=H,
                                      intermediate_size=2 * E, vocab_size=s["vocab"], max_position_embeddings=L,
                                      type_vocab_size=1, num_labels=3, hidden_dropout_prob=0.0,
                                      attention_probs_dropout_prob=0.0, pad_token_id=0)
        base = transformers.BertForSequenceClassification(cfg)
        lengths = torch.randint(L // 2, L + 1, (N,), generator=g)
        lengths[0] = L
        mask = (torch.arange(L)[None] < lengths[:, None]).long()  # right padding
        ids = torch.randint(1, s["vocab"], (N, L), generator=g) * mask
        X, y = {"input_ids": ids, "attention_mask": mask}, torch.randint(0, 3, (N,), generator=g)
        tokens, loss = False, nn.CrossEntropyLoss()
        pre = "model.bert.encoder.layer"
        layers = [(f"layer {i + 1}", [f"{pre}.{i}.attention.self.query.weight", f"{pre}.{i}.attention.self.key.weight",
                                      f"{pre}.{i}.attention.self.value.weight",
                                      f"{pre}.{i}.attention.output.dense.weight"], _split_blocks(E))
                  for i in range(nl)]
        title = (f"BERT classifier (transformers.BertForSequenceClassification), {nl} layers, d={E}, {H} heads, "
                 f"N={N}, L≤{L} with padding mask, 3 classes")
    elif name == "vit":
        from timm.models.vision_transformer import VisionTransformer

        base = VisionTransformer(img_size=s["img"], patch_size=s["patch"], in_chans=3, embed_dim=E, depth=nl,
                                 num_heads=H, mlp_ratio=2.0, num_classes=5)
        X = torch.randn(N, 3, s["img"], s["img"], generator=g).to(DT)
        y = torch.randint(0, 5, (N,), generator=g)
        tokens, loss = False, nn.CrossEntropyLoss()
        layers = [(f"layer {i + 1}", [f"model.blocks.{i}.attn.qkv.weight", f"model.blocks.{i}.attn.proj.weight"],
                   _fused_blocks(E, False)) for i in range(nl)]
        title = (f"ViT classifier (timm VisionTransformer), {nl} layers, d={E}, {H} heads, N={N}, "
                 f"{s['img']}×{s['img']} images, patch {s['patch']} ({(s['img'] // s['patch']) ** 2 + 1} tokens), 5 classes")
    else:
        raise ValueError(f"unknown model {name!r}; choose from {MODELS}")
    base = base.to(DT).eval()
    _perturb_norms(base, seed)
    hf = name != "vit"
    ref_model = copy.deepcopy(base)  # eager attention: what works with forward-mode AD today
    if hf:
        ref_model.set_attn_implementation("eager")
    else:
        for blk in ref_model.blocks:
            blk.attn.fused_attn = False
    ours_model = ba.convert_attention(copy.deepcopy(base))
    ref, ours = Logits(ref_model, hf, tokens), Logits(ours_model, hf, tokens)
    norm_weights = [f"{n}.weight" for n, m in ours.named_modules() if isinstance(m, nn.LayerNorm)]
    return Problem(name, title, ref, ours, loss, [(X, y)], _dict_batch_size if hf else None, layers, norm_weights,
                   converted_modules(ours_model))


# ---------------------------------------------------------------------------------------------
# measurements
# ---------------------------------------------------------------------------------------------
def _timed(f):
    t = time.perf_counter()
    out = f()
    return out, time.perf_counter() - t


def _top(op, k: int, tol: float, seed: int = 0):
    """Top-k (largest algebraic) eigenvalues, descending, and the number of products used."""
    A = op.to_scipy()
    count = [0]

    def matvec(x):
        count[0] += 1
        return A.matvec(x)

    B = LinearOperator(A.shape, matvec=matvec, dtype=A.dtype)
    v0 = np.random.default_rng(seed).standard_normal(A.shape[0])
    vals = eigsh(B, k=k, which="LA", v0=v0, tol=tol, return_eigenvectors=False)
    return np.sort(vals)[::-1].tolist(), count[0]


def _block_top(sub, tol: float):
    """Top eigenvalue of a block: dense (one batched product with the identity's columns, then
    ``eigvalsh``) up to ``DENSE_MAX`` rows, ``eigsh`` beyond. Returns (value, products, method)."""
    n = sub.shape[0]
    if n <= DENSE_MAX:
        M = sub @ torch.eye(n, dtype=sub.dtype)
        return torch.linalg.eigvalsh((M + M.T) / 2)[-1].item(), n, "dense"
    (top,), mv = _top(sub, 1, tol)
    return top, mv, "eigsh"


def _ours(kind, p: Problem, params):
    cls = ba.AttentionHessianLinearOperator if kind == "hessian" else ba.AttentionGGNLinearOperator
    return cls(p.ours, p.loss_func, params, p.data, check_deterministic=False, **p.kwargs())


def _theirs(kind, p: Problem, params):
    with torch_math_attention():
        return curvlinops_operator(kind, p.ref, p.loss_func, params, p.data, check_deterministic=False, **p.kwargs())


def _both(kind, p: Problem, names, compute):
    """``compute(op)`` on our operator (converted model) and on curvlinops' (unconverted, math kernel),
    each timed including the operator's construction."""
    res = {}
    for side, make, which in (("ours", _ours, "ours"), ("curvlinops", _theirs, "ref")):
        t = time.perf_counter()
        op = make(kind, p, p.params(which, names))
        with (torch_math_attention() if side == "curvlinops" else contextlib.nullcontext()):
            res[side] = compute(op)
        res[f"t_{side}"] = time.perf_counter() - t
    return res


def hvp_double_backward(p: Problem, V: torch.Tensor) -> torch.Tensor:
    """``H @ V`` of the empirical risk on the unconverted model by double backward (reverse over
    reverse: right through LayerNorm), one batched backward pass through the gradient graph."""
    params = p.params("ref")
    (X, y), = p.data
    with torch_math_attention():
        grads = torch.autograd.grad(p.loss_func(p.ref(X), y), params, create_graph=True)
        flat = torch.cat([t.reshape(-1) for t in grads])
        rows = torch.autograd.grad(flat, params, V.T.contiguous(), is_grads_batched=True, allow_unused=True)
    return torch.cat([torch.zeros(V.shape[1], q.numel(), dtype=V.dtype) if r is None else r.reshape(V.shape[1], -1)
                      for r, q in zip(rows, params)], dim=1).T


def _rows(p: Problem, names) -> torch.Tensor:
    out, i = [], 0
    for n, q in p.ours.named_parameters():
        if n in names:
            out.append(torch.arange(i, i + q.numel()))
        i += q.numel()
    return torch.cat(out)


def _rel(a, b) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def study(p: Problem, quick: bool, log=print) -> dict:
    s = SIZES[quick]
    k, tol = s["k"], s["tol"]
    P = sum(q.numel() for q in p.params("ours"))
    res = {"name": p.name, "title": p.title, "P": P, "converted": p.converted,
           "layernorm_weights": sum(q.numel() for q in p.params("ours", p.norm_weights))}
    (X, y), = p.data
    with torch_math_attention():  # same function
        res["output_rel_diff"] = _rel(p.ours(X).detach(), p.ref(X).detach())

    def gradient():
        torch.autograd.grad(p.loss_func(p.ours(X), y), p.params("ours"))

    gradient()
    res["t_gradient"] = min(_timed(gradient)[1] for _ in range(3))

    # whole model: top eigenvalues, Hutchinson traces
    for kind in ("hessian", "ggn"):
        r = _both(kind, p, None, lambda op: _top(op, k, tol))
        res[f"top_{kind}"] = {"ours": r["ours"][0], "curvlinops": r["curvlinops"][0], "mv_ours": r["ours"][1],
                              "mv_curvlinops": r["curvlinops"][1], "t_ours": r["t_ours"], "t_curvlinops": r["t_curvlinops"]}
        log(f"  {p.name}: top {kind} eigenvalues ours {np.round(r['ours'][0], 6)} ({r['t_ours']:.1f} s), "
            f"curvlinops {np.round(r['curvlinops'][0], 6)} ({r['t_curvlinops']:.1f} s)")

    def trace(op):
        torch.manual_seed(1234)  # the same Rademacher probes for both sides
        return hutchinson_trace(op, s["probes"]).item()

    for kind in ("hessian", "ggn"):
        r = _both(kind, p, None, trace)
        res[f"trace_{kind}"] = {"ours": r["ours"], "curvlinops": r["curvlinops"], "probes": s["probes"],
                                "t_ours": r["t_ours"], "t_curvlinops": r["t_curvlinops"]}
    log(f"  {p.name}: Hutchinson traces ({s['probes']} probes): Hessian ours {res['trace_hessian']['ours']:.6g}, "
        f"curvlinops {res['trace_hessian']['curvlinops']:.6g}; GGN ours {res['trace_ggn']['ours']:.6g}, "
        f"curvlinops {res['trace_ggn']['curvlinops']:.6g}")

    # attention blocks: top Hessian eigenvalue of W_Q and W_V of each layer
    res["blocks"] = []
    for label, names, blocks in (p.layers[:1] if quick else p.layers):
        blocks = {b: blocks[b] for b in s["blocks"]}
        for side, make, which in (("ours", _ours, "ours"), ("curvlinops", _theirs, "ref")):
            t0 = time.perf_counter()
            op = make("hessian", p, p.params(which, names))
            for b, idx in blocks.items():
                with (torch_math_attention() if side == "curvlinops" else contextlib.nullcontext()):
                    sub = SubmatrixLinearOperator(op, idx.tolist(), idx.tolist())
                    top, mv, method = _block_top(sub, tol)
                row = next((r for r in res["blocks"] if r["layer"] == label and r["block"] == b), None)
                if row is None:
                    row = {"layer": label, "block": b, "size": len(idx), "method": method}
                    res["blocks"].append(row)
                row[side] = top
                row[f"mv_{side}"] = mv
            layer_rows = [r for r in res["blocks"] if r["layer"] == label]
            layer_rows[0][f"t_layer_{side}"] = time.perf_counter() - t0
    log(f"  {p.name}: block eigenvalues " + ", ".join(
        f"{r['layer'].split()[-1]}:{r['block']} {r['ours']:.4g}/{r['curvlinops']:.4g}" for r in res["blocks"]))

    # LayerNorm rows: H @ V against double backward
    V = torch.randn(P, 4, dtype=DT, generator=torch.Generator().manual_seed(7))
    HV_db, t_db = _timed(lambda: hvp_double_backward(p, V))
    HV_ours, t_o = _timed(lambda: _ours("hessian", p, p.params("ours")) @ V)
    HV_cl, t_c = _timed(lambda: _run_theirs_mv("hessian", p, V))
    GV_ours = _ours("ggn", p, p.params("ours")) @ V
    GV_cl = _run_theirs_mv("ggn", p, V)
    ln = _rows(p, set(p.norm_weights))
    other = torch.ones(P, dtype=torch.bool)
    other[ln] = False
    res["layernorm"] = {
        "rows": len(ln), "t_double_backward": t_db, "t_ours": t_o, "t_curvlinops": t_c,
        "ours_ln": _rel(HV_ours[ln], HV_db[ln]), "curvlinops_ln": _rel(HV_cl[ln], HV_db[ln]),
        "ours_other": _rel(HV_ours[other], HV_db[other]), "curvlinops_other": _rel(HV_cl[other], HV_db[other]),
        "curvlinops_vs_ours_ln": _rel(HV_cl[ln], HV_ours[ln]),
        "ggn_curvlinops_vs_ours": _rel(GV_cl, GV_ours),
    }
    r = res["layernorm"]
    log(f"  {p.name}: LayerNorm-weight rows of H v vs double backward: ours {r['ours_ln']:.1e}, "
        f"curvlinops {r['curvlinops_ln']:.1e} (other rows: {r['ours_other']:.1e} / {r['curvlinops_other']:.1e})")
    return res


def _run_theirs_mv(kind, p: Problem, V):
    op = _theirs(kind, p, p.params("ref"))
    with torch_math_attention():
        return op @ V


# ---------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------
def _vals(v) -> str:
    return ", ".join(f"{x:.6g}" for x in v)


def _rel_list(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.abs(a - b).max() / np.abs(b).max())


def table(results: List[dict]) -> str:
    lines = ["| model | quantity | ours (converted model) | curvlinops (unconverted, math kernel) | rel. difference "
             "| time ours | time curvlinops | speed-up |", "|" + "---|" * 8]
    for r in results:
        m = r["name"]
        for kind, lab in (("hessian", "Hessian"), ("ggn", "GGN")):
            t = r[f"top_{kind}"]
            lines.append(f"| {m} | top-{len(t['ours'])} {lab} eigenvalues, all {r['P']} params ({t['mv_ours']} / "
                         f"{t['mv_curvlinops']} products) | {_vals(t['ours'])} | {_vals(t['curvlinops'])} | "
                         f"{_rel_list(t['curvlinops'], t['ours']):.1e} | {t['t_ours']:.2f} s | {t['t_curvlinops']:.2f} s "
                         f"| {t['t_curvlinops'] / t['t_ours']:.1f}× |")
        for kind, lab in (("hessian", "Hessian"), ("ggn", "GGN")):
            t = r[f"trace_{kind}"]
            lines.append(f"| {m} | Hutchinson {lab} trace ({t['probes']} probes, same seed) | {t['ours']:.6g} | "
                         f"{t['curvlinops']:.6g} | {abs(t['curvlinops'] - t['ours']) / abs(t['ours']):.1e} | "
                         f"{t['t_ours']:.2f} s | {t['t_curvlinops']:.2f} s | {t['t_curvlinops'] / t['t_ours']:.1f}× |")
        layers = {}
        for b in r["blocks"]:
            layers.setdefault(b["layer"], []).append(b)
        for label, rows in layers.items():
            to, tc = rows[0]["t_layer_ours"], rows[0]["t_layer_curvlinops"]
            lines.append(f"| {m} | top Hessian eigenvalue of {label}'s {', '.join(b['block'] for b in rows)} blocks "
                         f"({rows[0]['size']} rows each, {rows[0]['method']}) | {_vals([b['ours'] for b in rows])} | "
                         f"{_vals([b['curvlinops'] for b in rows])} | "
                         f"{max(abs(b['curvlinops'] - b['ours']) / abs(b['ours']) for b in rows):.1e} | "
                         f"{to:.2f} s | {tc:.2f} s | {tc / to:.1f}× |")
        ln = r["layernorm"]
        lines.append(f"| {m} | LayerNorm-weight rows of H·V ({ln['rows']} rows, 4 columns): rel. error vs double "
                     f"backward | {ln['ours_ln']:.1e} | **{ln['curvlinops_ln']:.1e}** | {ln['curvlinops_vs_ours_ln']:.1e} "
                     f"| {ln['t_ours']:.2f} s | {ln['t_curvlinops']:.2f} s | {ln['t_curvlinops'] / ln['t_ours']:.1f}× |")
        lines.append(f"| {m} | all other rows of H·V: rel. error vs double backward | {ln['ours_other']:.1e} | "
                     f"{ln['curvlinops_other']:.1e} | | | | |")
    return "\n".join(lines)


def figure(results: List[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.4), squeeze=False)
    for ax, r in zip(axes[0], results):
        labels = [f"{b['layer'].split()[-1]}:{b['block'][2]}" for b in r["blocks"]]
        x = np.arange(len(labels))
        ax.bar(x, [b["ours"] for b in r["blocks"]], color="C0", label="ours (converted)")
        ax.plot(x, [b["curvlinops"] for b in r["blocks"]], "x", color="C3", ms=8, label="curvlinops (math kernel)")
        ax.set_xticks(x, labels, fontsize=8)
        vals = [b[k] for b in r["blocks"] for k in ("ours", "curvlinops")]
        ax.set_yscale("log" if min(vals) > 0 else "symlog")
        ax.set_title(r["name"], fontsize=10)
        ax.set_xlabel("layer:block")
    axes[0][0].set_ylabel("top Hessian eigenvalue of the block")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Attention weight blocks of the whole-model Hessian", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(results: List[dict], seconds: float, cpu: float, command: str, quick: bool) -> str:
    load = f", load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores" if hasattr(os, "getloadavg") else ""
    ln = [r["layernorm"]["curvlinops_ln"] for r in results]
    eig = [_rel_list(r["top_hessian"]["curvlinops"], r["top_hessian"]["ours"]) for r in results]
    agree = max([r["layernorm"]["ours_ln"] for r in results] + [r["layernorm"]["ours_other"] for r in results])
    lines = [
        "# Whole-model curvature of GPT-2, BERT and a timm ViT",
        "",
        f"Generated by `{command}` in {seconds:.0f} s wall, {cpu:.0f} s CPU (torch {torch.__version__}, curvlinops "
        f"{CURVLINOPS_VERSION}, torch threads: {torch.get_num_threads()}, {platform.machine()}{load}). "
        "Do not edit: rerun the example.",
        "",
        "Random weights from tiny configs, float64, LayerNorm weights and biases perturbed (a trained model's are not "
        "1 and 0). *Ours*: `ba.AttentionHessianLinearOperator` / `ba.AttentionGGNLinearOperator` on the model after "
        "`ba.convert_attention` (fused SDPA forward, closed-form attention derivatives). *curvlinops*: its "
        "`HessianLinearOperator` / `GGNLinearOperator` on the unconverted model with eager attention under "
        "`sdpa_kernel(SDPBackend.MATH)`. Eigenvalues: `eigsh(op.to_scipy(), which=\"LA\")`, the same `v0` and "
        f"`tol={SIZES[quick]['tol']:g}`; attention blocks: an operator over the layer's attention weights cut by "
        f"`SubmatrixLinearOperator`, decomposed densely up to {DENSE_MAX} rows, by `eigsh` beyond. Hutchinson: "
        "curvlinops' `hutchinson_trace`, the same Rademacher probes for both. Times include building the operators (and our cache). The double-backward "
        "reference (reverse over reverse on the unconverted model) is right through LayerNorm; curvlinops' Hessian "
        "(forward over reverse) is not in torch 2.13/2.14 (docs/operators.md): its LayerNorm-weight rows (bold) are "
        "off, and with them its eigenvalues and trace.",
        "",
    ]
    for r in results:
        lines.append(f"- **{r['name']}**: {r['title']}; {r['P']} parameters ({r['layernorm_weights']} LayerNorm "
                     f"weights); converted: {', '.join(f'`{n}`' for n, _ in r['converted'])}; outputs equal the "
                     f"unconverted model's to {r['output_rel_diff']:.0e}; one gradient {r['t_gradient'] * 1e3:.1f} ms.")
    lines += [
        "",
        f"Reading: our Hessian products equal double backward to {agree:.0e} on every row. curvlinops' Hessian is "
        f"right outside the LayerNorm weights and off by {min(ln):.0%}–{max(ln):.0%} on their rows; that moves its "
        f"top eigenvalues by up to {max(eig):.0e} (relative) and its trace estimate. The GGN (first derivatives "
        "only) and the attention blocks (no LayerNorm rows) agree to rounding. Speed-ups are per eigensolve or "
        "estimate at the same number of products.",
        "", table(results), "", "![blocks](block_eigenvalues.png)", ""]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny models, first layer's blocks only (< 30 s)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default: %(default)s)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: the models are tiny, more threads only synchronise)")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _main(args)
    finally:
        torch.set_num_threads(threads)


def _main(args):
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0, c0 = time.perf_counter(), time.process_time()
    results = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*is deprecated")
        for name in args.models:
            print(f"{name}:", flush=True)
            results.append(study(build(name, quick=args.quick), args.quick, log=lambda m: print(m, flush=True)))
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    print()
    print(table(results))
    command = "python examples/real_models.py" + (" --quick" if args.quick else "")
    if list(args.models) != list(MODELS):
        command += " --models " + " ".join(args.models)
    (out / "summary.md").write_text(summary(results, seconds, cpu, command, args.quick))
    (out / "results.json").write_text(json.dumps({"quick": args.quick, "seconds": seconds, "cpu_seconds": cpu, "models": results},
                                                 indent=1, default=str))
    figure(results, out / "block_eigenvalues.png")
    print(f"\nwrote {out}/summary.md, results.json, block_eigenvalues.png in {seconds:.0f} s ({cpu:.0f} s CPU)")
    return {"quick": args.quick, "seconds": seconds, "cpu_seconds": cpu, "models": {r["name"]: r for r in results}}


if __name__ == "__main__":
    main()
