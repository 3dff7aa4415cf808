"""Cost of BackPACK extensions on the example transformer, in plain backward passes.

Times one training step (forward + backward) with a BackPACK extension and divides it by the
time of a plain forward + backward on the same model, measured side by side: every repeat
runs all variants in turn (interleaved), so machine load affects them alike, and the median
over repeats is reported. The model is the one of ``examples/backpack_transformer.py``
(2-layer pre-LN transformer, token-level cross-entropy).

    OMP_NUM_THREADS=1 python benchmarks/backpack_extensions.py --out docs/benchmarks_backpack.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import torch
from backpack import backpack
from torch import nn

from common import load_average, machine_line

import backpack_attention.extensions as bae
from backpack_attention.backpack_ext import extend
from backpack_attention.models import VOCAB, addition_data, language_model

warnings.filterwarnings("ignore", message="Full backward hook is firing")
warnings.filterwarnings("ignore", message="Encountered node that may break")

VARIANTS = {
    "plain backward": None,
    "BatchGrad": lambda: bae.BatchGrad(),
    "DiagGGNExact": lambda: bae.DiagGGNExact(),
    "DiagGGNMC (1 sample)": lambda: bae.DiagGGNMC(),
    "KFAC (1 sample)": lambda: bae.KFAC(),
    "KFLR": lambda: bae.KFLR(),
}


def problem(num_sequences: int, d_model: int, num_heads: int):
    torch.manual_seed(0)
    X, y = addition_data(num_sequences, seed=0)
    tokens = torch.cat([X, y[:, -1:]], dim=1)
    model = language_model(vocab=VOCAB, d_model=d_model, num_heads=num_heads, num_layers=2, causal=True)
    model = extend(model, use_converter=True)
    return model, extend(nn.CrossEntropyLoss()), tokens[:, :-1], tokens[:, 1:]


def step(model, loss_func, X, Y, make_ext) -> float:
    model.zero_grad(set_to_none=True)
    t = time.perf_counter()
    if make_ext is None:
        loss_func(model(X), Y).backward()
    else:
        with backpack(make_ext()):
            loss_func(model(X), Y).backward()
    return time.perf_counter() - t


def machine() -> str:
    return f"{machine_line()}; 1-min load average at start {load_average():.2f}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 = least noisy)")
    ap.add_argument("--sizes", default="16x24x4,32x32x4", help="NxDxH configurations, comma separated")
    ap.add_argument("--out", default=None, help="write a markdown report here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    info = machine()
    rows = []
    for size in args.sizes.split(","):
        n, d, h = (int(v) for v in size.split("x"))
        model, loss_func, X, Y = problem(n, d, h)
        times = {name: [] for name in VARIANTS}
        for r in range(args.warmup + args.repeats):
            for name, make in VARIANTS.items():
                dt = step(model, loss_func, X, Y, make)
                if r >= args.warmup:
                    times[name].append(dt)
        med = {name: statistics.median(ts) for name, ts in times.items()}
        base = med["plain backward"]
        nparams = sum(p.numel() for p in model.parameters())
        for name in VARIANTS:
            rows.append((f"N={n}, L={X.shape[1]}, E={d}, H={h} ({nparams} params)", name,
                         med[name] * 1e3, med[name] / base))
            print(f"{rows[-1][0]:<40s} {name:<22s} {rows[-1][2]:9.2f} ms  {rows[-1][3]:6.2f} x", flush=True)
    if args.out:
        env = "".join(f"{k}={os.environ[k]} " for k in ("OMP_NUM_THREADS",) if k in os.environ)
        cmd = env + "python benchmarks/backpack_extensions.py " + " ".join(argv if argv is not None else sys.argv[1:])
        lines = [
            "# BackPACK extensions: cost on the example transformer",
            "",
            "Time of one forward + backward pass with the extension, as a multiple of a plain forward +",
            "backward on the same model (2-layer pre-LN transformer of `examples/backpack_transformer.py`,",
            "causal attention, vocabulary 12, token-level cross-entropy over L = 17 tokens, float32, CPU).",
            f"Median of {args.repeats} interleaved repeats after {args.warmup} warm-up rounds; all variants",
            "are measured side by side in one run.",
            "",
            f"Command: `{cmd.strip()}`",
            "",
            f"Machine: {info}. The machine was shared with other jobs; ratios are more stable than",
            "absolute times.",
            "",
            "| model | extension | time [ms] | x plain backward |",
            "|---|---|---:|---:|",
        ]
        lines += [f"| {m} | {e} | {t:.2f} | {x:.2f} |" for m, e, t, x in rows]
        lines += [
            "",
            "Exact GGN extensions (DiagGGNExact, KFLR) backpropagate `C·L` = 204 square-root columns",
            "(vocabulary x tokens), the Monte-Carlo ones (DiagGGNMC, KFAC) one column per sample.",
            "",
        ]
        with open(args.out, "w") as f:
            f.write("\n".join(lines))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
