r"""Attention entropy and Q/K curvature of a one-layer language model across Adam step sizes (JoMA).

Tian, Wang, Zhang, Chen & Du, "JoMA: Demystifying Multilayer Transformers via JOint Dynamics of
MLP and Attention" (ICLR 2024) track the entropy of the attention rows of language models during
training: it drops from the uniform value as attention becomes sparse, and at a large learning
rate the first layer collapses to one-hot attention (entropy ≈ 0) with a worse validation loss.
This example trains a one-layer causal language model built on the package's
``MultiheadSelfAttention`` (``backpack_attention.models.TinyTransformer``, pre-LN, GELU MLP,
learned positions, token readout, float64) at a healthy and at larger Adam step sizes and records

* the attention entropy: the mean over held-out sequences and query positions ``i`` of
  :math:`-\sum_j A_{ij}\log A_{ij}` (the uniform causal reference is the mean of
  :math:`\log i`, ``i = 1..L``), every ``--eval-every`` steps, with the validation loss;
* at checkpoints, the exact (W_Q, W_Q) and (W_K, W_K) Hessian blocks of the attention layer from
  ``backpack_attention.hessian_blocks`` on a fixed batch of held-out sequences: the Frobenius
  norms of their outer-product (Gauss–Newton) and functional parts and the ratio
  ``‖functional‖_F / ‖outer‖_F``, plus the (W_V, W_V) Gauss–Newton norm for scale.

The text is the help texts that ship with CPython (``pydoc_data.topics``; nothing is downloaded),
lower-cased, whitespace collapsed, character-level with the most frequent characters as the
vocabulary and one ``<unk>`` for the rest. Batches are random windows of the training split
(the first 90% of the text); the entropy, the validation loss and the curvature use the last 10%.
The optimiser follows JoMA's code (Adam, constant step size, gradient clipping at norm 0.5).

Whether a large step size collapses the attention is measured here, not assumed: the summary
reports the final entropy and the validation loss of every run.

Run:  python examples/attention_entropy.py [--quick] [--out DIR] [--lrs 1e-3 1e-2 1e-1] [--steps N]

``--quick`` (under a minute): step sizes 1e-3 and 1e-1, 200 steps each, curvature at steps 0 and 200 only.
Outputs in ``--out`` (default ``docs/examples/attention_entropy``): ``entropy.png``,
``curvature.png``, ``results.json`` and ``summary.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch import nn

import backpack_attention as ba
from backpack_attention.models import TinyTransformer

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "docs" / "examples" / "attention_entropy"
BLOCKS = ("W_Q", "W_K", "W_V")
COLLAPSE = 0.1  # nats: "collapsed" means a final mean entropy below this (JoMA's collapsed rows read 0.00)


# ---------------------------------------------------------------------------------------------
# data: CPython's help texts, character level
# ---------------------------------------------------------------------------------------------
def corpus_text() -> str:
    """The help texts shipped with CPython, in key order, lower-cased, whitespace collapsed."""
    from pydoc_data.topics import topics

    text = "\n".join(topics[k] for k in sorted(topics)).lower()
    return " ".join(text.split())


def build_vocab(text: str, size: int):
    """``(chars, encode)``: the ``size - 1`` most frequent characters (sorted) and ``<unk>`` last."""
    if size < 2:
        raise ValueError(f"vocabulary size must be at least 2, got {size}")
    chars = sorted(c for c, _ in Counter(text).most_common(size - 1))
    index = {c: i for i, c in enumerate(chars)}
    unk = len(chars)

    def encode(s: str) -> torch.Tensor:
        return torch.tensor([index.get(c, unk) for c in s], dtype=torch.long)

    return chars + ["<unk>"], encode


def windows(tokens: torch.Tensor, num: int, length: int, generator) -> tuple:
    """``num`` random windows of ``length + 1`` tokens: inputs ``[num, length]``, targets shifted by one."""
    start = torch.randint(0, len(tokens) - length - 1, (num,), generator=generator)
    w = torch.stack([tokens[s:s + length + 1] for s in start.tolist()])
    return w[:, :-1], w[:, 1:]


def uniform_entropy(length: int) -> float:
    """Mean entropy of uniform causal attention rows: the mean of ``log i``, ``i = 1..length``."""
    return float(np.mean(np.log(np.arange(1, length + 1))))


# ---------------------------------------------------------------------------------------------
# measurements
# ---------------------------------------------------------------------------------------------
def attention_matrices(model: TinyTransformer, X: torch.Tensor) -> torch.Tensor:
    """The attention matrices ``[N, H, L, L]`` of the (only) layer on ``X`` (zeros on masked keys)."""
    attn = model.blocks[0].attn
    seen = {}

    def hook(module, args):
        seen["x"] = args[0].detach()  # the layer's input (after the first LayerNorm)

    handle = attn.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            model(X)
            return attn.attention_weights(seen["x"])
    finally:
        handle.remove()


def attention_entropy(model: TinyTransformer, X: torch.Tensor) -> float:
    """Mean over sequences, heads and query positions of the entropy of the attention rows (nats)."""
    A = attention_matrices(model, X)
    return float(-torch.special.xlogy(A, A).sum(-1).mean())


def one_hot_fraction(model: TinyTransformer, X: torch.Tensor) -> float:
    """Fraction of attention rows at query positions 2..L (position 1 sees one key) whose largest
    weight is 1 to within 1e-12: rows the softmax has saturated."""
    A = attention_matrices(model, X)[..., 1:, :]
    return float((A.amax(-1) >= 1.0 - 1e-12).double().mean())


def block_curvature(model, loss_func, data) -> dict:
    """Frobenius norms of the outer and functional parts of the (W_Q, W_Q), (W_K, W_K) and (W_V, W_V)
    blocks (all heads) of the attention layer, exact (``hessian_blocks``)."""
    hb = ba.hessian_blocks(model, loss_func, model.blocks[0].attn, data)
    out = {}
    for b in BLOCKS:
        blk = hb[(b, None), (b, None)]
        outer, functional = blk.outer.norm().item(), blk.functional.norm().item()
        # a saturated (one-hot) softmax has a zero Jacobian: the Q/K GGN can be exactly 0 (no ratio)
        out[b] = {"outer": outer, "functional": functional, "ratio": functional / outer if outer > 0 else None}
    return out


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------
def make_model(vocab: int, length: int, d_model: int, seed: int) -> TinyTransformer:
    torch.manual_seed(seed)
    return TinyTransformer(vocab, d_model, num_heads=1, num_layers=1, max_len=length, causal=True, norm="pre",
                           activation="gelu", readout="token", dtype=torch.float64)


def train(lr: float, *, train_tokens, val, curv_data, vocab, length, d_model, batch, steps, eval_every,
          checkpoints, seed, log=print) -> dict:
    """Adam (constant ``lr``, clipping 0.5) from the seed's initialisation; entropy, validation loss
    and block curvature along the way."""
    model = make_model(vocab, length, d_model, seed)
    loss_func = nn.CrossEntropyLoss()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed + 1)  # the same batches for every step size
    hist = {"step": [], "entropy": [], "one_hot": [], "val_loss": [], "train_loss": []}
    curv = []
    t_curv = 0.0
    t0 = time.perf_counter()
    train_loss = None  # no step taken yet
    for step in range(steps + 1):
        if step % eval_every == 0 or step == steps or step in checkpoints:
            with torch.no_grad():
                val_loss = loss_func(model(val[0]), val[1]).item()
            hist["step"].append(step)
            hist["entropy"].append(attention_entropy(model, val[0]))
            hist["one_hot"].append(one_hot_fraction(model, val[0]))
            hist["val_loss"].append(val_loss)
            hist["train_loss"].append(train_loss)
        if step in checkpoints:
            tc = time.perf_counter()
            c = block_curvature(model, loss_func, curv_data)
            t_curv += time.perf_counter() - tc
            curv.append({"step": step, "entropy": hist["entropy"][-1], "val_loss": hist["val_loss"][-1], "blocks": c})
            log(f"lr {lr:g} step {step:>5}: entropy {hist['entropy'][-1]:.3f}, val loss {val_loss:.3f} | "
                + " ".join(f"{b} outer {c[b]['outer']:.2e} func/outer {_r(c[b]['ratio'])}" for b in ("W_Q", "W_K"))
                + f" | W_V outer {c['W_V']['outer']:.2e}")
        if step == steps:
            break
        X, y = windows(train_tokens, batch, length, gen)
        loss = loss_func(model(X), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        train_loss = loss.item()
    return {"lr": lr, "hist": hist, "curvature": curv, "seconds": time.perf_counter() - t0, "seconds_curvature": t_curv}


def analyse(runs: list, uniform: float) -> dict:
    """Headline numbers per step size (no thresholds from the paper: what the runs show)."""
    out = {}
    for r in runs:
        h, c = r["hist"], r["curvature"]
        e = np.asarray(h["entropy"])
        imin = int(np.argmin(e))
        first, last = c[0]["blocks"], c[-1]["blocks"]
        out[f"{r['lr']:g}"] = {
            "entropy at 0": float(e[0]), "entropy min": float(e[imin]), "entropy min step": h["step"][imin],
            "entropy at end": float(e[-1]), "entropy at end / uniform": float(e[-1] / uniform),
            "bounce (end - min)": float(e[-1] - e[imin]),
            "collapsed": bool(e[-1] < COLLAPSE), "one-hot rows at end": h["one_hot"][-1],
            "val loss min": float(np.min(h["val_loss"])), "val loss at end": float(h["val_loss"][-1]),
            "W_Q func/outer at 0": first["W_Q"]["ratio"], "W_K func/outer at 0": first["W_K"]["ratio"],
            "W_Q func/outer at end": last["W_Q"]["ratio"], "W_K func/outer at end": last["W_K"]["ratio"],
            "W_Q/W_V outer at 0": first["W_Q"]["outer"] / first["W_V"]["outer"],
            "W_K/W_V outer at 0": first["W_K"]["outer"] / first["W_V"]["outer"],
            "W_Q/W_V outer at end": last["W_Q"]["outer"] / last["W_V"]["outer"],
            "W_K/W_V outer at end": last["W_K"]["outer"] / last["W_V"]["outer"],
        }
    return out


# ---------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------
def _r(x) -> str:
    """A ratio, or a dash where the GGN part is exactly zero."""
    return "– (GGN = 0)" if x is None else f"{x:.3g}"


def _pos(x) -> float:
    """``x`` for a log axis: NaN (not drawn) for a missing or zero value."""
    return float("nan") if x is None or x <= 0 else x


def plot(res: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, uniform = res["runs"], res["uniform_entropy"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for k, r in enumerate(runs):
        s = np.maximum(np.asarray(r["hist"]["step"], dtype=float), 1.0)
        axes[0].plot(s, r["hist"]["entropy"], color=f"C{k}", label=f"Adam lr {r['lr']:g}")
        axes[1].plot(s, r["hist"]["val_loss"], color=f"C{k}", label=f"Adam lr {r['lr']:g}")
    axes[0].axhline(uniform, color="k", ls="--", lw=1, label=f"uniform causal attention ({uniform:.3f})")
    axes[0].axhline(COLLAPSE, color="gray", ls=":", lw=1, label=f"collapse threshold ({COLLAPSE})")
    axes[0].set_ylabel("mean attention entropy (nats)")
    axes[0].set_title("attention entropy on held-out text")
    axes[1].set_ylabel("validation cross-entropy (nats/char)")
    axes[1].set_title("validation loss")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("Adam step (0 drawn at 1)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "entropy.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for k, r in enumerate(runs):
        s = np.maximum(np.asarray([c["step"] for c in r["curvature"]], dtype=float), 1.0)
        for b, ls in (("W_Q", "-"), ("W_K", "--")):
            axes[0].plot(s, [_pos(c["blocks"][b]["ratio"]) for c in r["curvature"]], color=f"C{k}", ls=ls, marker="o",
                         ms=3, label=f"lr {r['lr']:g}, {b}")
            axes[1].plot(s, [_pos(c["blocks"][b]["outer"] / c["blocks"]["W_V"]["outer"]) for c in r["curvature"]],
                         color=f"C{k}", ls=ls, marker="o", ms=3, label=f"lr {r['lr']:g}, {b}")
    axes[0].axhline(1.0, color="k", lw=0.8)
    axes[0].set_title(r"Q/K Hessian blocks: $\|H_{functional}\|_F / \|H_{outer}\|_F$")
    axes[1].set_title(r"Q/K vs V: $\|GGN_{block}\|_F / \|GGN_{VV}\|_F$")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("Adam step (0 drawn at 1)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curvature.png", dpi=110)
    plt.close(fig)


def summary(res: dict, command: str) -> str:
    a, cfg = res["analysis"], res["config"]
    lrs = [f"{r['lr']:g}" for r in res["runs"]]
    lines = [
        "# Attention entropy and Q/K curvature of a one-layer language model (JoMA, Tian et al.)",
        "",
        f"Generated by `{command}` in {res['seconds']:.0f} s wall-clock, {res['cpu_seconds']:.0f} s CPU "
        f"(torch {torch.__version__}, {res['threads']} thread(s), {platform.machine()}, 1-min load average "
        f"{res['load_average']:.1f} on {os.cpu_count()} cores at the end). Do not edit: rerun the example.",
        "",
        f"Text: CPython's `pydoc_data.topics`, {cfg['num_chars']} characters, vocabulary {cfg['vocab']} "
        f"(the {cfg['vocab'] - 1} most frequent characters and `<unk>`, which covers "
        f"{100 * cfg['unk_fraction']:.2f}% of the text); 90% train, 10% held out. Model: "
        f"`TinyTransformer`, 1 layer, d_model {cfg['d_model']}, 1 head, pre-LN, GELU, learned positions, "
        f"causal, float64, seed {cfg['seed']}. Adam (constant step size, clipping 0.5), batches of "
        f"{cfg['batch']} random windows of L = {cfg['length']} characters, {cfg['steps']} steps per step size. "
        f"Entropy and validation loss on {cfg['val_sequences']} held-out windows every {cfg['eval_every']} steps; "
        f"Hessian blocks (`hessian_blocks`, exact) on {cfg['curv_sequences']} held-out windows at steps "
        f"{', '.join(map(str, cfg['checkpoints']))}. Uniform causal attention has entropy "
        f"**{res['uniform_entropy']:.3f}** nats; *collapsed* below means a final entropy under {COLLAPSE} nats.",
        "",
        "## Headline",
        "",
        "| quantity | " + " | ".join(f"lr {lr}" for lr in lrs) + " |",
        "|---|" + "---|" * len(lrs),
    ]
    rows = [("entropy at step 0 (nats)", "entropy at 0", ".3f"), ("minimum entropy", "entropy min", ".3f"),
            ("... at step", "entropy min step", "d"), ("**entropy at the end**", "entropy at end", ".3f"),
            ("end / uniform", "entropy at end / uniform", ".3f"), ("end − minimum", "bounce (end - min)", ".3f"),
            ("**collapsed** (end < 0.1 nats)", "collapsed", "yn"),
            ("rows one-hot to 1e-12 at the end (query positions 2..L)", "one-hot rows at end", ".3f"),
            ("validation loss, minimum", "val loss min", ".3f"), ("**validation loss at the end**", "val loss at end", ".3f"),
            ("‖H_f‖_F / ‖GGN‖_F of (W_Q, W_Q) at step 0", "W_Q func/outer at 0", ".3g"),
            ("... of (W_K, W_K) at step 0", "W_K func/outer at 0", ".3g"),
            ("**‖H_f‖_F / ‖GGN‖_F of (W_Q, W_Q) at the end**", "W_Q func/outer at end", ".3g"),
            ("**... of (W_K, W_K) at the end**", "W_K func/outer at end", ".3g"),
            ("‖GGN_QQ‖_F / ‖GGN_VV‖_F at step 0", "W_Q/W_V outer at 0", ".3g"),
            ("‖GGN_KK‖_F / ‖GGN_VV‖_F at step 0", "W_K/W_V outer at 0", ".3g"),
            ("‖GGN_QQ‖_F / ‖GGN_VV‖_F at the end", "W_Q/W_V outer at end", ".3g"),
            ("‖GGN_KK‖_F / ‖GGN_VV‖_F at the end", "W_K/W_V outer at end", ".3g")]
    for label, key, f in rows:
        vals = [a[lr][key] for lr in lrs]
        cells = [("yes" if v else "no") if f == "yn" else "– (GGN = 0)" if v is None else format(v, f) for v in vals]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "## Figures", "", "![entropy](entropy.png)", "", "![curvature](curvature.png)", "",
              "## Block curvature at every checkpoint", "",
              "Frobenius norms of the outer-product (GGN) and functional parts of the diagonal blocks "
              "(all heads) of the attention layer.", "",
              "| lr | step | entropy | val loss | GGN W_Q | H_f W_Q | GGN W_K | H_f W_K | GGN W_V | H_f W_V |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        for c in r["curvature"]:
            b = c["blocks"]
            lines.append(f"| {r['lr']:g} | {c['step']} | {c['entropy']:.3f} | {c['val_loss']:.3f} | "
                         + " | ".join(f"{b[k]['outer']:.3g} | {b[k]['functional']:.3g}" for k in BLOCKS) + " |")
    lines += ["", "Run times: " + ", ".join(f"lr {r['lr']:g} {r['seconds']:.0f} s (curvature {r['seconds_curvature']:.0f} s)"
                                            for r in res["runs"]) + ".", ""]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="200 steps per step size, curvature at 0 and 200 (< 1 min)")
    parser.add_argument("--steps", type=int, default=None, help="Adam steps per step size (default 3000; --quick 200)")
    parser.add_argument("--lrs", type=float, nargs="+", default=None,
                        help="Adam step sizes (default 1e-3 1e-2 1e-1; --quick 1e-3 1e-1)")
    parser.add_argument("--d-model", type=int, default=16)
    parser.add_argument("--length", type=int, default=16, help="window length L (default 16)")
    parser.add_argument("--vocab", type=int, default=48, help="vocabulary size incl. <unk> (default 48)")
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: the fastest for this small model, and safe when "
                             "other jobs share the cores)")
    args = parser.parse_args(argv)
    for name in ("d_model", "length", "vocab", "batch", "threads"):
        if getattr(args, name) <= 0:
            parser.error(f"argument --{name.replace('_', '-')}: must be positive, got {getattr(args, name)}")
    lrs = args.lrs or ([1e-3, 1e-1] if args.quick else [1e-3, 1e-2, 1e-1])
    if any(not (lr > 0 and math.isfinite(lr)) for lr in lrs):
        parser.error(f"argument --lrs: step sizes must be positive and finite, got {lrs}")
    torch.set_num_threads(args.threads)
    steps = args.steps or (200 if args.quick else 3000)
    if steps <= 0:
        parser.error(f"argument --steps: must be positive, got {steps}")
    checkpoints = [0, steps] if args.quick else sorted({s for s in (0, 100, 300, 1000) if s < steps} | {steps})
    eval_every = 10 if args.quick else 25
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0, cpu0 = time.perf_counter(), time.process_time()

    text = corpus_text()
    chars, encode = build_vocab(text, args.vocab)
    tokens = encode(text)
    split = int(0.9 * len(tokens))
    train_tokens, val_tokens = tokens[:split], tokens[split:]
    gen = torch.Generator().manual_seed(args.seed + 12345)
    val = windows(val_tokens, 64, args.length, gen)
    curv_data = [windows(val_tokens, 8, args.length, gen)]
    config = {"num_chars": len(text), "vocab": len(chars), "unk_fraction": float((tokens == len(chars) - 1).double().mean()),
              "d_model": args.d_model, "length": args.length, "batch": args.batch, "steps": steps,
              "eval_every": eval_every, "checkpoints": checkpoints, "val_sequences": val[0].shape[0],
              "curv_sequences": curv_data[0][0].shape[0], "seed": args.seed, "quick": args.quick,
              "lrs": lrs}
    uniform = uniform_entropy(args.length)
    print(f"{len(text)} characters, vocabulary {len(chars)}; uniform causal entropy {uniform:.3f} nats")
    runs = [train(lr, train_tokens=train_tokens, val=val, curv_data=curv_data, vocab=len(chars), length=args.length,
                  d_model=args.d_model, batch=args.batch, steps=steps, eval_every=eval_every,
                  checkpoints=set(checkpoints), seed=args.seed) for lr in lrs]
    res = {"config": config, "uniform_entropy": uniform, "runs": runs, "analysis": analyse(runs, uniform)}
    plot(res, out)
    res["seconds"] = time.perf_counter() - t0
    res["cpu_seconds"] = time.process_time() - cpu0
    res["threads"], res["load_average"] = torch.get_num_threads(), os.getloadavg()[0]
    command = "python examples/attention_entropy.py" + (" --quick" if args.quick else "")
    defaults = dict(steps=None, lrs=None, d_model=16, length=16, vocab=48, batch=20, seed=0)
    changed = [k for k, v in defaults.items() if getattr(args, k) != v]
    for k in changed:
        v = getattr(args, k)
        command += f" --{k.replace('_', '-')} " + (" ".join(f"{x:g}" for x in v) if isinstance(v, list) else str(v))
    (out / "summary.md").write_text(summary(res, command))
    (out / "results.json").write_text(json.dumps(res, separators=(",", ":")))
    print()
    for lr, v in res["analysis"].items():
        print(f"lr {lr}: entropy {v['entropy at 0']:.3f} -> min {v['entropy min']:.3f} (step {v['entropy min step']}) "
              f"-> {v['entropy at end']:.3f} at the end ({'collapsed' if v['collapsed'] else 'not collapsed'}); "
              f"val loss min {v['val loss min']:.3f}, end {v['val loss at end']:.3f}; "
              f"||H_f||/||GGN|| Q {_r(v['W_Q func/outer at 0'])} -> {_r(v['W_Q func/outer at end'])}, "
              f"K {_r(v['W_K func/outer at 0'])} -> {_r(v['W_K func/outer at end'])}; "
              f"one-hot rows at the end {v['one-hot rows at end']:.3f}")
    print(f"wrote {out}/summary.md, results.json, entropy.png, curvature.png in {res['seconds']:.0f} s")
    return res


if __name__ == "__main__":
    main()
