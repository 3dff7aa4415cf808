"""Benchmark: one training step (forward + backward) of MultiheadSelfAttention vs nn.MultiheadAttention.

Setup (default): ``E = 256``, 4 heads (``d_K = 64``), float32, CPU, batch ``N = 4``, sequence
lengths ``L`` in {64, 512, 2048}, default initialisation, ``x = randn(N, L, E)`` requiring grad
(a layer inside a network: the input gradient is part of the step). One step is the forward pass
and ``out.backward(G)`` for a fixed random cotangent ``G``; parameter gradients are reset to
``None`` before each step.

* **ours**: ``MultiheadSelfAttention(E, H, causal=...)`` (default kernel selection; the causal
  mask reaches SDPA as ``is_causal=True``).
* **torch**: ``module.to_torch()`` (``nn.MultiheadAttention(batch_first=True)``, same weights),
  called as ``mha(x, x, x, need_weights=False, ...)``

  * causal, *bool mask*: ``attn_mask=`` the bool causal ``[L, L]`` mask (``True`` above the diagonal);
  * causal, *is_causal*: the same mask and ``is_causal=True`` (torch then uses the kernel's causal mode);
  * full: no mask.

Runs are interleaved (each repeat runs every variant once, in a rotated order) so that load from
other processes hits all variants alike; times are medians. The ratio ours / torch is given against
each torch variant. Every row also checks that our gradients (parameters and input) equal torch's
(max abs difference / max abs value, float32).

    python benchmarks/training_step.py           # full run (a few minutes), writes docs/benchmarks_training_step.md
    python benchmarks/training_step.py --quick   # tiny sizes, seconds, prints only
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone

import torch

from common import fill_defaults, load_average, machine_line

from backpack_attention import MultiheadSelfAttention

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
                           "benchmarks_training_step.md")
TARGET = 1.1


def make_steps(E: int, H: int, N: int, L: int, causal: bool, dtype, seed: int = 0):
    """``{variant: step function}`` and a function returning each variant's gradients."""
    torch.manual_seed(seed)
    ours = MultiheadSelfAttention(E, H, causal=causal, dtype=dtype)
    mha = ours.to_torch()
    x = torch.randn(N, L, E, dtype=dtype, requires_grad=True)
    G = torch.randn(N, L, E, dtype=dtype)
    mask = torch.ones(L, L, dtype=torch.bool).triu(1)

    def stepper(module, call):
        params = list(module.parameters())

        def step():
            for p in params:
                p.grad = None
            x.grad = None
            call().backward(G)
            return [p.grad for p in params] + [x.grad]

        return step

    steps = {"ours": stepper(ours, lambda: ours(x))}
    if causal:
        steps["torch bool mask"] = stepper(mha, lambda: mha(x, x, x, need_weights=False, attn_mask=mask)[0])
        steps["torch is_causal"] = stepper(
            mha, lambda: mha(x, x, x, need_weights=False, attn_mask=mask, is_causal=True)[0])
    else:
        steps["torch no mask"] = stepper(mha, lambda: mha(x, x, x, need_weights=False)[0])
    return steps


def rel_diff(a, b) -> float:
    return max(((u - v).abs().max() / v.abs().max().clamp_min(1e-30)).item() for u, v in zip(a, b))


def run_case(E, H, N, L, causal, dtype, repeats: int):
    steps = make_steps(E, H, N, L, causal, dtype)
    names = list(steps)
    grads = {n: steps[n]() for n in names}  # warm-up, and the gradient check
    err = max(rel_diff(grads["ours"], grads[n]) for n in names[1:])
    times = {n: [] for n in names}
    for r in range(repeats):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            t = time.perf_counter()
            steps[n]()
            times[n].append(time.perf_counter() - t)
    return ({n: statistics.median(ts) for n, ts in times.items()}, {n: min(ts) for n, ts in times.items()}, err)


def fmt(t: float) -> str:
    return f"{t * 1e3:.1f} ms" if t < 1 else f"{t:.2f} s"


def run(args) -> str:
    dtype = getattr(torch, args.dtype)
    rows, verdicts = [], []
    load0 = f"{load_average():.1f}"
    for L in args.L:
        for causal in (True, False):
            med, low, err = run_case(args.E, args.heads, args.N, L, causal, dtype, args.repeats)
            ours = med["ours"]
            refs = [(n, t) for n, t in med.items() if n != "ours"]
            best = min(t for _, t in refs)
            best_low = min(t for n, t in low.items() if n != "ours")
            verdicts.append(ours <= TARGET * best)
            torch_cols = " / ".join(f"{n.removeprefix('torch ')}: {fmt(t)}" for n, t in refs)
            ratios = " / ".join(f"{ours / t:.2f}" for _, t in refs)
            rows.append(f"| {L} | {'causal' if causal else 'full'} | {fmt(ours)} | {torch_cols} | {ratios} | "
                        f"**{ours / best:.2f}** | {low['ours'] / best_low:.2f} | {err:.1e} |")
            print(rows[-1], file=sys.stderr, flush=True)
    met = all(verdicts)
    lines = [
        "# Benchmark: training step (forward + backward), MultiheadSelfAttention vs nn.MultiheadAttention",
        "",
        f"E = {args.E}, {args.heads} heads, {args.dtype}, batch N = {args.N}, CPU. "
        "Median time of one forward + backward step.",
        "",
        "| L | mask | ours | torch (`nn.MultiheadAttention`) | ours / torch | ours / fastest torch "
        "| same, fastest runs | grad rel. diff |",
        "|---:|---|---:|---|---:|---:|---:|---:|",
        *rows,
        "",
        f"- Target: ours within {TARGET}x the fastest torch variant in every row (medians): "
        f"**{'met' if met else 'not met'}** "
        f"({sum(verdicts)}/{len(verdicts)} rows).",
        "- Command: `python benchmarks/training_step.py" + (" --quick" if args.quick else "") + "`",
        f"- Date (UTC): {datetime.now(timezone.utc):%Y-%m-%d %H:%M}",
        f"- Machine: {machine_line()}, {platform.system()} {platform.machine()}",
        "- Step: `x = randn(N, L, E)` requiring grad, forward, `out.backward(G)` for a fixed random `G`; "
        "gradients reset to `None` before each step. Ours: `MultiheadSelfAttention(E, H, causal=...)`; "
        "torch: `module.to_torch()` (same weights) called with `need_weights=False` and, for causal rows, "
        "`attn_mask=` the bool causal mask (*bool mask*) or that mask with `is_causal=True` (*is_causal*); "
        "full rows: no mask on either side.",
        f"- Times: median of {args.repeats} interleaved runs per variant (each repeat runs every variant "
        "once, in rotated order) after one warm-up run. 1-minute load average "
        f"{load0} at the start and {load_average():.1f} at the end (other jobs may share the machine: expect noise). "
        "*same, fastest runs*: the ratio of the fastest of the repeats of ours to the fastest of torch's "
        "(less sensitive to load from other processes, which only ever adds time).",
        "- grad rel. diff: max over parameters and input of max |ours - torch| / max |torch| (float32), "
        "against every torch variant.",
        "- Ours runs torch's fused SDPA kernel forward and its fused backward for first-order gradients "
        "(`SoftmaxAttentionCore`); the closed-form derivatives are used only for double backward, "
        "forward mode and torch.func transforms.",
    ]
    return "\n".join(lines) + "\n"


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, seconds; prints only")
    p.add_argument("--L", type=int, nargs="+", default=None, help="sequence lengths")
    p.add_argument("--N", type=int, default=None, help="batch size")
    p.add_argument("--E", type=int, default=None, help="embedding dimension")
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--out", default=None,
                   help=f"markdown output (default: {DEFAULT_OUT} for the full run, none for --quick)")
    args = p.parse_args(argv)
    small = dict(L=[8, 16], N=2, E=16, heads=4, repeats=3)
    big = dict(L=[64, 512, 2048], N=4, E=256, heads=4, repeats=11)
    return fill_defaults(args, small, big, DEFAULT_OUT)


def main(argv=None) -> int:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    text = run(args)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            fh.write(text)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
