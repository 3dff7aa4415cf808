r"""In-context learning as implicit gradient descent: the dual form of linear attention, and the
preconditioner a linear-attention layer learns (Dai et al., "Why Can GPT Learn In-Context?").

Dai, Sun, Dong, Hao, Ma, Sui & Wei (Findings of ACL 2023, arXiv 2212.10559) read softmax-free
attention as a linear layer updated by gradient descent on the demonstrations. This example
checks the algebra and then asks what the "implicit optimiser" learns.

**(a) The dual form, numerically.** For linear attention (``MultiheadSelfAttention(attention="linear")``:
masked raw scores scaled by ``1/sqrt(d_K)``) the output of head ``h`` at a query position ``t``
after demonstrations ``1..m`` is

.. math::
    \mathbf o_t = \sum_{i\le t} \frac{\mathbf q_t^\top\mathbf k_i}{\sqrt{d_K}}\,\mathbf v_i
    = \frac{1}{\sqrt{d_K}}\,(\mathbf W_{\rm ZSL} + \Delta\mathbf W_{\rm ICL})\,\mathbf q_t,\qquad
    \Delta\mathbf W_{\rm ICL} = \sum_{i\le m}\mathbf v_i\mathbf k_i^\top,

with :math:`\mathbf W_{\rm ZSL}` the same sum over the query tokens (``m < i <= t``).
:math:`\Delta\mathbf W_{\rm ICL}` is one gradient-descent step (step size 1) on a linear layer
whose training inputs are the keys and whose back-propagated errors are the values. The example
evaluates both sides on the layer's outputs (after the output projection) in float64, for causal
and bidirectional layers, one and several heads, with biases; the GD step is taken with autograd.

**(b) The preconditioner.** In-context linear regression: ``x ~ N(0, Σ)`` in ``d = 5`` dimensions
(eigenvalues 0.25 … 4 in a random basis), ``y = wᵀx`` with a fresh ``w ~ N(0, I)`` per sequence,
``n`` demonstration tokens ``(x_i, y_i)`` and a query token ``(x_q, 0)``. One linear-attention head
(``E = d + 1``, no biases) whose value/output projections read and write the ``y`` coordinate
(fixed; the reduced parametrisation of Ahn et al., NeurIPS 2023) predicts, at the query,

.. math::
    \hat y = \frac1n\sum_i y_i\,\mathbf x_i^\top\,\Gamma\,\mathbf x_q,\qquad
    \Gamma = n\,\mathbf W_{K,x}^\top\mathbf W_{Q,x}/\sqrt{E}

(plus a ``y_i^2`` term through the key's ``y`` column, which training removes): one
preconditioned GD step from ``w = 0`` on the in-context least-squares loss, whose Hessian is the
demonstrations' covariance ``S = (1/n) Σ x_i x_iᵀ`` — the KFAC input factor of the implicit linear
model. ``W_Q`` and ``W_K`` are trained with Adam on fresh tasks, starting from plain GD
(``Γ ∝ I``); the learned ``Γ`` is compared
(cosine similarity, scale-free relative distance, test loss) with

* ``Γ* = ((1 + 1/n) Σ + tr(Σ)/n · I)⁻¹``, the optimal single-step preconditioner (Ahn et al.);
* ``Σ⁻¹`` and the inverse KFAC input factor of the implicit model (``nn.Linear(d, 1)`` under
  ``AttentionKFACLinearOperator`` on the pooled demonstrations), the Newton preconditioner;
* ``I`` (plain GD).

Run:  python examples/icl_dual_form.py [--quick] [--out DIR] [--ns 10 20 40 80] [--steps N]

``--quick`` (under a minute): the dual-form checks and ``n = 20`` with 600 Adam steps. Outputs in
``--out`` (default ``docs/examples/icl_dual_form``): ``preconditioner.png``, ``results.json``,
``summary.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import backpack_attention as ba

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "docs" / "examples" / "icl_dual_form"
DTYPE = torch.float64


# ---------------------------------------------------------------------------------------------
# (a) the dual form
# ---------------------------------------------------------------------------------------------
def random_linear_attention(embed_dim: int, num_heads: int, *, causal: bool, bias: bool = True, seed: int = 0):
    """A linear-attention layer with random weights and biases (float64)."""
    torch.manual_seed(seed)
    attn = ba.MultiheadSelfAttention(embed_dim, num_heads, bias=bias, causal=causal, attention="linear", dtype=DTYPE)
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0.0, 0.5)
    return attn


def dual_form_output(attn, x: torch.Tensor, num_demos: int, *, gd_step: bool = False) -> torch.Tensor:
    """The layer's output at the query positions ``num_demos..L-1`` from the dual form
    ``(W_ZSL + ΔW_ICL) q_t / sqrt(d_K)`` per head, then the output projection.

    ``ΔW_ICL = Σ_{i < num_demos} v_i k_iᵀ``; with ``gd_step=True`` it is instead the result of one
    autograd GD step (step size 1) from ``W = 0`` on ``ℓ(W) = -Σ_i v_iᵀ W k_i`` (inputs ``k_i``,
    back-propagated errors ``v_i``). Returns ``[N, L - num_demos, E]``.
    """
    Q, K, V = attn.project_qkv(x)  # [N, H, L, d_K], biases included
    N, H, L, d = Q.shape
    m = num_demos
    if gd_step:
        W = torch.zeros(N, H, d, d, dtype=x.dtype, requires_grad=True)
        loss = -torch.einsum("nhie,nhef,nhif->", V[:, :, :m], W, K[:, :, :m])
        (g,) = torch.autograd.grad(loss, W)
        dW = (W - 1.0 * g).detach()
    else:
        dW = torch.einsum("nhie,nhif->nhef", V[:, :, :m], K[:, :, :m])
    outs = []
    for t in range(m, L):
        last = t + 1 if attn.causal else L  # the query tokens this position sees
        W_zsl = torch.einsum("nhie,nhif->nhef", V[:, :, m:last], K[:, :, m:last])
        o = torch.einsum("nhef,nhf->nhe", W_zsl + dW, Q[:, :, t]) / math.sqrt(d)  # [N, H, d_K]
        merged = o.reshape(N, H * d)  # heads side by side, as the layer concatenates them
        out = merged @ attn.out_proj_weight.T
        if attn.out_proj_bias is not None:
            out = out + attn.out_proj_bias
        outs.append(out)
    return torch.stack(outs, dim=1).detach()


def dual_form_checks(seed: int = 0) -> list:
    """Relative max error of the dual form against the layer's outputs, over several configurations."""
    rows = []
    configs = [(8, 1, True), (8, 2, True), (8, 2, False), (12, 3, True)]
    for k, (E, H, causal) in enumerate(configs):
        attn = random_linear_attention(E, H, causal=causal, seed=seed + k)
        gen = torch.Generator().manual_seed(seed + 100 + k)
        x = torch.randn(4, 6 + 3, E, generator=gen, dtype=DTYPE)  # 6 demonstrations, 3 query tokens
        with torch.no_grad():
            ref = attn(x)[:, 6:]
        scale = ref.abs().max().item()
        row = {"embed_dim": E, "heads": H, "causal": causal, "demos": 6, "queries": 3}
        for key, gd in (("sum of outer products", False), ("one GD step (autograd)", True)):
            row[key] = (dual_form_output(attn, x, 6, gd_step=gd) - ref).abs().max().item() / scale
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# (b) the learned preconditioner
# ---------------------------------------------------------------------------------------------
def covariance(d: int, seed: int):
    """``(Σ, Σ^{1/2})`` with eigenvalues geometric from 0.25 to 4 in a random orthonormal basis."""
    gen = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=DTYPE))
    ev = torch.tensor(np.geomspace(0.25, 4.0, d), dtype=DTYPE)
    return U @ torch.diag(ev) @ U.T, U @ torch.diag(ev.sqrt()) @ U.T


def sample_tasks(num: int, n: int, sigma_sqrt: torch.Tensor, gen):
    """Token sequences ``[num, n + 1, d + 1]`` (demonstrations ``(x_i, y_i)``, query ``(x_q, 0)``) and ``y_q``."""
    d = sigma_sqrt.shape[0]
    w = torch.randn(num, d, generator=gen, dtype=DTYPE)
    X = torch.randn(num, n + 1, d, generator=gen, dtype=DTYPE) @ sigma_sqrt
    y = torch.einsum("nld,nd->nl", X, w)
    Z = torch.cat([X, y[..., None]], dim=-1)
    Z[:, -1, -1] = 0.0
    return Z, y[:, -1]


def make_lsa(d: int, seed: int, alpha: float = 0.3):
    """One linear-attention head on ``E = d + 1`` (no biases), initialised at plain gradient descent:
    ``W_{Q,x} = W_{K,x} = alpha · I`` (so ``Γ ∝ I``), the ``y`` rows and columns of ``W_Q``, ``W_K`` zero;
    ``W_V`` reads the ``y`` coordinate, ``W_O = I``. Returns the layer and the gradient mask (1 on
    ``W_Q``, ``W_K``)."""
    E = d + 1
    torch.manual_seed(seed)
    attn = ba.MultiheadSelfAttention(E, 1, bias=False, causal=True, attention="linear", dtype=DTYPE)
    mask = torch.zeros_like(attn.in_proj_weight)
    mask[: 2 * E] = 1.0
    with torch.no_grad():
        attn.in_proj_weight.zero_()
        attn.in_proj_weight[:d, :d] = alpha * torch.eye(d, dtype=DTYPE)  # W_Q, x part
        attn.in_proj_weight[E:E + d, :d] = alpha * torch.eye(d, dtype=DTYPE)  # W_K, x part
        attn.in_proj_weight[2 * E + d, d] = 1.0  # value = y_i in the last coordinate
        attn.out_proj_weight.copy_(torch.eye(E, dtype=DTYPE))
    attn.out_proj_weight.requires_grad_(False)
    return attn, mask


def predict(attn, Z: torch.Tensor) -> torch.Tensor:
    """The layer's output at the query position, ``y`` coordinate."""
    return attn(Z)[:, -1, -1]


def effective_gamma(attn, n: int) -> torch.Tensor:
    """``Γ = n W_{K,x}ᵀ W_{Q,x} / sqrt(E)`` (the ``ŷ = (1/n) Σ y_i x_iᵀ Γ x_q`` convention)."""
    E = attn.embed_dim
    d = E - 1
    W = attn.in_proj_weight.detach()
    return n * W[E:2 * E, :d].T @ W[:E, :d] / math.sqrt(E)


def gamma_predict(Gamma: torch.Tensor, Z: torch.Tensor) -> torch.Tensor:
    """``ŷ = (1/n) Σ_i y_i x_iᵀ Γ x_q``."""
    X, y = Z[:, :-1, :-1], Z[:, :-1, -1]
    h = torch.einsum("nid,ni->nd", X, y) / X.shape[1]
    return torch.einsum("nd,de,ne->n", h, Gamma, Z[:, -1, :-1])


def optimal_gamma(Sigma: torch.Tensor, n: int) -> torch.Tensor:
    d = Sigma.shape[0]
    return torch.linalg.inv((1 + 1 / n) * Sigma + torch.trace(Sigma) / n * torch.eye(d, dtype=DTYPE))


def kfac_input_factor(Z: torch.Tensor) -> tuple:
    """``(A, S)``: the KFAC input factor of the implicit in-context model ``nn.Linear(d, 1)`` fitted to
    the pooled demonstrations of ``Z`` (``AttentionKFACLinearOperator``, MSE, type-2), and their
    empirical second moment ``S`` computed directly."""
    X = Z[:, :-1, :-1].reshape(-1, Z.shape[-1] - 1)
    y = Z[:, :-1, -1].reshape(-1, 1)
    lin = nn.Linear(X.shape[1], 1, bias=False, dtype=DTYPE)
    op = ba.AttentionKFACLinearOperator(lin, nn.MSELoss(), [lin.weight], [(X, y)])
    (name,) = op.block_names()
    _, A = op.factors()[name]
    return A.detach(), X.T @ X / X.shape[0]


def cosine(A: torch.Tensor, B: torch.Tensor) -> float:
    return float((A * B).sum() / (A.norm() * B.norm()))


def scaled_distance(A: torch.Tensor, B: torch.Tensor) -> float:
    """``min_c ‖c A - B‖_F / ‖B‖_F`` (scale-free)."""
    c = (A * B).sum() / (A * A).sum()
    return float((c * A - B).norm() / B.norm())


def best_scaled_loss(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean squared error of ``c · pred`` with the best scalar ``c``."""
    c = (pred * target).sum() / (pred * pred).sum()
    return float(((c * pred - target) ** 2).mean())


def train_icl(n: int, *, d: int, steps: int, batch: int, lr: float, seed: int, Sigma, sigma_sqrt, log=print) -> dict:
    """Train ``W_Q``, ``W_K`` (Adam, cosine schedule, fresh tasks each step); compare ``Γ``."""
    attn, mask = make_lsa(d, seed)
    opt = torch.optim.Adam([attn.in_proj_weight], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    loss_func = nn.MSELoss()
    gen = torch.Generator().manual_seed(seed + 1000 * n)
    losses = []
    t0 = time.perf_counter()
    for step in range(steps):
        Z, yq = sample_tasks(batch, n, sigma_sqrt, gen)
        loss = loss_func(predict(attn, Z), yq)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        attn.in_proj_weight.grad.mul_(mask)  # V stays fixed (Adam: zero gradient, zero update)
        opt.step()
        sched.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - t0
    test_gen = torch.Generator().manual_seed(seed + 7 + 1000 * n)
    Zt, yt = sample_tasks(8192, n, sigma_sqrt, test_gen)
    A, S = kfac_input_factor(Zt)
    Gamma = effective_gamma(attn, n)
    G_opt, S_inv, A_inv, I = optimal_gamma(Sigma, n), torch.linalg.inv(Sigma), torch.linalg.inv(A), torch.eye(d, dtype=DTYPE)
    with torch.no_grad():
        pred = torch.cat([predict(attn, Zt[i:i + 512]) for i in range(0, len(Zt), 512)])  # memory: [512, n+1, n+1] scores
    E = d + 1
    W = attn.in_proj_weight.detach()
    refs = {"Γ*": G_opt, "Σ⁻¹": S_inv, "KFAC A⁻¹": A_inv, "I": I}
    res = {
        "n": n, "steps": steps, "seconds": seconds, "train_loss_first": losses[0], "train_loss_last_100": float(np.mean(losses[-100:])),
        "loss_curve": [float(np.mean(losses[i:i + 50])) for i in range(0, steps, 50)],
        "Gamma": Gamma.tolist(), "Gamma_opt": G_opt.tolist(),
        "cos": {k: cosine(Gamma, v) for k, v in refs.items()},
        "distance": {k: scaled_distance(Gamma, v) for k, v in refs.items()},
        "cos Γ* vs Σ⁻¹": cosine(G_opt, S_inv), "cos Γ* vs I": cosine(G_opt, I),
        "KFAC factor vs covariance": {"rel diff A vs S (trace-normalised)": float((A / torch.trace(A) - S / torch.trace(S)).norm() / (S / torch.trace(S)).norm()),
                                      "cos A vs Σ": cosine(A, Sigma)},
        "key y-column / key x-part (norm)": float(W[E:2 * E, d].norm() / W[E:2 * E, :d].norm()),
        "test loss": {
            "trained layer": float(((pred - yt) ** 2).mean()),
            "Γ (formula)": float(((gamma_predict(Gamma, Zt) - yt) ** 2).mean()),
            "Γ*": float(((gamma_predict(G_opt, Zt) - yt) ** 2).mean()),
            "c·Σ⁻¹ (best c)": best_scaled_loss(gamma_predict(S_inv, Zt), yt),
            "c·I (best c)": best_scaled_loss(gamma_predict(I, Zt), yt),
            "zero predictor": float((yt ** 2).mean()),
        },
    }
    log(f"n = {n:>3} ({seconds:.1f} s): cos(Γ, Γ*) {res['cos']['Γ*']:.4f}, cos(Γ, Σ⁻¹) {res['cos']['Σ⁻¹']:.4f}, "
        f"cos(Γ, KFAC A⁻¹) {res['cos']['KFAC A⁻¹']:.4f}, cos(Γ, I) {res['cos']['I']:.4f}; test loss trained "
        f"{res['test loss']['trained layer']:.4f}, Γ* {res['test loss']['Γ*']:.4f}, "
        f"c·Σ⁻¹ {res['test loss']['c·Σ⁻¹ (best c)']:.4f}, c·I {res['test loss']['c·I (best c)']:.4f}")
    return res


# ---------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------
def plot(res: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = res["icl"]
    ns = [r["n"] for r in runs]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    ax = axes[0]
    for k, (key, style) in enumerate((("Γ*", "o-"), ("Σ⁻¹", "s-"), ("KFAC A⁻¹", "x--"), ("I", "^-"))):
        ax.plot(ns, [r["cos"][key] for r in runs], style, color=f"C{k}", label=f"cos(Γ learned, {key})")
    ax.plot(ns, [r["cos Γ* vs Σ⁻¹"] for r in runs], ":", color="gray", label="cos(Γ*, Σ⁻¹)")
    ax.set_xscale("log")
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("demonstrations n")
    ax.set_ylabel("cosine similarity")
    ax.set_title("learned preconditioner vs references")
    ax.legend(fontsize=8)
    ax = axes[1]
    keys = ("trained layer", "Γ*", "c·Σ⁻¹ (best c)", "c·I (best c)")
    for k, key in enumerate(keys):
        ax.plot(ns, [r["test loss"][key] for r in runs], "o-", color=f"C{k}", label=key)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("demonstrations n")
    ax.set_ylabel("test MSE at the query")
    ax.set_title("in-context prediction error")
    ax.legend(fontsize=8)
    ax = axes[2]
    r = runs[len(runs) // 2] if len(runs) > 1 else runs[0]
    G = np.asarray(r["Gamma"])
    Go = np.asarray(r["Gamma_opt"])
    c = (G * Go).sum() / (G * G).sum()
    vmax = np.abs(Go).max()
    ax.imshow(np.hstack([c * G, np.full((G.shape[0], 1), np.nan), Go]), cmap="RdBu_r", vmin=-vmax, vmax=vmax)
    ax.set_title(f"n = {r['n']}: c·Γ learned (left) | Γ* (right)")
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(out / "preconditioner.png", dpi=110)
    plt.close(fig)


def summary(res: dict, command: str) -> str:
    cfg = res["config"]
    lines = [
        "# In-context learning as implicit gradient descent: dual form and learned preconditioner (Dai et al.)",
        "",
        f"Generated by `{command}` in {res['seconds']:.0f} s wall-clock, {res['cpu_seconds']:.0f} s CPU "
        f"(torch {torch.__version__}, {res['threads']} thread(s), {platform.machine()}, 1-min load average "
        f"{res['load_average']:.1f} on {os.cpu_count()} cores at the end). Do not edit: rerun the example.",
        "",
        "## (a) The dual form of linear attention",
        "",
        "Largest error of the dual form relative to the largest output entry, on the outputs of "
        "`MultiheadSelfAttention(attention=\"linear\")` (random weights and biases, float64, 4 sequences "
        "of 6 demonstrations and 3 query tokens):",
        "",
        "| E | heads | causal | (W_ZSL + Σ v_i k_iᵀ) q / √d_K | one autograd GD step on the keys/values |",
        "|---|---|---|---|---|",
    ]
    for r in res["dual_form"]:
        lines.append(f"| {r['embed_dim']} | {r['heads']} | {'yes' if r['causal'] else 'no'} | "
                     f"{r['sum of outer products']:.1e} | {r['one GD step (autograd)']:.1e} |")
    lines += [
        "",
        f"Largest over all configurations: **{res['dual_form_max']:.1e}**.",
        "",
        "## (b) The preconditioner learned by linear attention",
        "",
        f"d = {cfg['d']}, Σ with eigenvalues {', '.join(f'{v:g}' for v in cfg['eigenvalues'])} in a random basis, "
        f"w ~ N(0, I); one linear-attention head (E = {cfg['d'] + 1}, no biases, W_V and W_O fixed), W_Q and W_K "
        f"trained with Adam (step size {cfg['lr']:g}, cosine schedule, {cfg['steps']} steps, {cfg['batch']} fresh "
        f"tasks per step, started at plain GD: W_Q,x = W_K,x = 0.3·I, seed {cfg['seed']}). Test set: 8192 fresh tasks per n. Cosine "
        "similarity and scale-free relative distance min_c ‖cΓ − R‖_F / ‖R‖_F of the learned Γ to each reference R; "
        "KFAC A: the input factor of `AttentionKFACLinearOperator` on `nn.Linear(d, 1)` fitted to the "
        "pooled demonstrations of the test tasks.",
        "",
        "| n | cos(Γ, Γ*) | cos(Γ, Σ⁻¹) | cos(Γ, KFAC A⁻¹) | cos(Γ, I) | cos(Γ*, Σ⁻¹) | dist(Γ, Γ*) | dist(Γ, Σ⁻¹) | dist(Γ, I) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["icl"]:
        c, dd = r["cos"], r["distance"]
        lines.append(f"| {r['n']} | {c['Γ*']:.4f} | {c['Σ⁻¹']:.4f} | {c['KFAC A⁻¹']:.4f} | {c['I']:.4f} | "
                     f"{r['cos Γ* vs Σ⁻¹']:.4f} | {dd['Γ*']:.3f} | {dd['Σ⁻¹']:.3f} | {dd['I']:.3f} |")
    lines += ["", "Test mean squared error at the query (c: the best scalar for that direction):", "",
              "| n | trained layer | Γ learned, formula | Γ* | c·Σ⁻¹ | c·I | zero predictor |", "|---|---|---|---|---|---|---|"]
    for r in res["icl"]:
        t = r["test loss"]
        lines.append(f"| {r['n']} | {t['trained layer']:.4f} | {t['Γ (formula)']:.4f} | {t['Γ*']:.4f} | "
                     f"{t['c·Σ⁻¹ (best c)']:.4f} | {t['c·I (best c)']:.4f} | {t['zero predictor']:.3f} |")
    kf = [r["KFAC factor vs covariance"] for r in res["icl"]]
    lines += [
        "",
        "The KFAC input factor of the implicit linear model equals the demonstrations' second moment "
        f"(trace-normalised relative difference at most {max(k['rel diff A vs S (trace-normalised)'] for k in kf):.1e}) "
        f"and is close to Σ (cosine at least {min(k['cos A vs Σ'] for k in kf):.6f}). The key's y column, which "
        "adds a y_i² term the target does not have, ends at "
        f"{max(r['key y-column / key x-part (norm)'] for r in res['icl']):.2g} (largest over n) of the norm of the key's x part.",
        "",
        "![preconditioner](preconditioner.png)",
        "",
        "Training time per n: " + ", ".join(f"n = {r['n']}: {r['seconds']:.0f} s" for r in res["icl"]) + ".",
        "",
    ]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="dual form and n = 20 with 600 steps (< 1 min)")
    parser.add_argument("--ns", type=int, nargs="+", default=None, help="demonstration counts (default 10 20 40 80; --quick 20)")
    parser.add_argument("--steps", type=int, default=None, help="Adam steps per n (default 1500; --quick 600)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--d", type=int, default=5, help="input dimension (default 5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: the fastest for these small layers, and safe when "
                             "other jobs share the cores)")
    args = parser.parse_args(argv)
    ns = args.ns or ([20] if args.quick else [10, 20, 40, 80])
    steps = args.steps or (600 if args.quick else 1500)
    for name, v in (("ns", min(ns)), ("steps", steps), ("batch", args.batch), ("d", args.d), ("threads", args.threads)):
        if v <= 0:
            parser.error(f"argument --{name}: must be positive, got {v}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        parser.error(f"argument --lr: must be positive and finite, got {args.lr}")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0, cpu0 = time.perf_counter(), time.process_time()

    dual = dual_form_checks(args.seed)
    dual_max = max(max(r["sum of outer products"], r["one GD step (autograd)"]) for r in dual)
    print(f"(a) dual form of linear attention: largest relative error {dual_max:.1e}")
    Sigma, sigma_sqrt = covariance(args.d, args.seed)
    eig = torch.linalg.eigvalsh(Sigma)
    print("(b) in-context linear regression, learned preconditioner:")
    icl = [train_icl(n, d=args.d, steps=steps, batch=args.batch, lr=args.lr, seed=args.seed, Sigma=Sigma,
                     sigma_sqrt=sigma_sqrt) for n in ns]
    res = {"config": {"d": args.d, "eigenvalues": [round(float(v), 6) for v in eig], "ns": ns, "steps": steps,
                      "batch": args.batch, "lr": args.lr, "seed": args.seed, "quick": args.quick},
           "dual_form": dual, "dual_form_max": dual_max, "icl": icl}
    plot(res, out)
    res["seconds"] = time.perf_counter() - t0
    res["cpu_seconds"] = time.process_time() - cpu0
    res["threads"], res["load_average"] = torch.get_num_threads(), os.getloadavg()[0]
    command = "python examples/icl_dual_form.py" + (" --quick" if args.quick else "")
    for name, default in (("ns", None), ("steps", None), ("batch", 256), ("lr", 1e-2), ("d", 5), ("seed", 0)):
        v = getattr(args, name)
        if v != default:
            command += f" --{name} " + (" ".join(map(str, v)) if isinstance(v, list) else f"{v:g}")
    (out / "summary.md").write_text(summary(res, command))
    (out / "results.json").write_text(json.dumps(res, indent=1))
    print(f"wrote {out}/summary.md, results.json, preconditioner.png in {res['seconds']:.0f} s")
    return res


if __name__ == "__main__":
    main()
