"""Benchmark: peak memory of curvature computations on one attention layer, ours vs curvlinops.

Setup: one causal ``MultiheadSelfAttention(E=256, 4 heads)`` (float32), N=4 sequences of
L in {512, 2048} tokens, two models:

* ``layer``: the layer's output under ``nn.MSELoss`` (random targets ``[N, L, E]``); every
  operator takes the layer's four parameters;
* ``readout``: the layer, ``nn.Flatten`` and ``nn.Linear(L E, 8)`` under ``nn.CrossEntropyLoss`` on
  one class per sequence: an output small enough for BackPACK's exact GGN extensions.

curvlinops runs on ``backpack_attention.models.torch_twin`` of the same model (the layer as
``nn.MultiheadAttention``, same weights) inside ``backpack_attention.torch_math_attention()``
(the math SDPA kernel; the only one torch differentiates twice); its KFAC runs on the
``nn.Linear`` twin (``LinearProjectionAttention``), the layer as KFAC sees it.

Each measurement runs in a fresh Python process: it builds the model, its twin and the data,
then records the baseline; the peak is

* on the CPU: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` after the measurement minus the
  baseline (the peak resident memory the measurement added);
* on CUDA: ``torch.cuda.max_memory_allocated()`` minus the memory allocated at the baseline.

A measurement whose estimated size (from the sizes of its largest tensors) exceeds ``--limit-gib``
is skipped and reported with that estimate. Operators are built with ``check_deterministic=False``
(both sides) and measured with their first product, which includes building their caches.

    python benchmarks/memory.py            # full run, writes docs/benchmarks_memory.md
    python benchmarks/memory.py --quick    # tiny sizes, seconds, every row in this process; prints only
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import resource
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Optional

import torch
from torch import nn

warnings.filterwarnings("ignore", message=".*torch.jit.script.*is deprecated")
warnings.filterwarnings("ignore", message="Full backward hook is firing")

import backpack_attention as ba  # noqa: E402
from backpack import backpack  # noqa: E402
from curvlinops import KFACLinearOperator  # noqa: E402
from backpack_attention._compat import CURVLINOPS_VERSION, curvlinops_operator  # noqa: E402
from backpack_attention.models import LinearProjectionAttention, torch_twin  # noqa: E402

from common import load_average, machine_line  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GIB = 2.0**30
#: the issue's target for every measurement
TARGET_GIB = 4.0
#: classes of the readout model
CLASSES = 8


# ---------------------------------------------------------------------------------------------
# problems
# ---------------------------------------------------------------------------------------------
def build(model_kind: str, a, needs=()):
    """The model, data and what a measurement needs (``"twin"``: torch_twin, ``"linear_twin"``:
    the nn.Linear twin) as a namespace; all built before the baseline."""
    dtype, device = getattr(torch, a.dtype), torch.device(a.device)
    torch.manual_seed(0)
    attn = ba.MultiheadSelfAttention(a.E, a.heads, causal=True, dtype=dtype, device=device)
    g = torch.Generator(device=device).manual_seed(1)
    X = torch.randn(a.N, a.L, a.E, dtype=dtype, device=device, generator=g)
    if model_kind == "layer":
        model = nn.Sequential(attn)
        y = torch.randn(a.N, a.L, a.E, dtype=dtype, device=device, generator=g)
        loss_func = nn.MSELoss()
    else:
        model = nn.Sequential(attn, nn.Flatten(), nn.Linear(a.L * a.E, CLASSES, dtype=dtype, device=device))
        y = torch.randint(0, CLASSES, (a.N,), device=device, generator=g)
        loss_func = nn.CrossEntropyLoss()
    model.eval()
    s = SimpleNamespace(model=model, attn=attn, params=list(attn.parameters()), loss_func=loss_func,
                        data=[(X, y)], X=X, y=y, a=a)
    P = sum(p.numel() for p in s.params)
    s.v = torch.randn(P, dtype=dtype, device=device, generator=g)
    s.V = torch.randn(P, a.columns, dtype=dtype, device=device, generator=g)
    if "twin" in needs:
        s.twin = torch_twin(model).eval()
        s.twin_params = [p for n, p in s.twin.named_parameters() if n.startswith("0.")]
    if "linear_twin" in needs:
        s.linear_twin = nn.Sequential(LinearProjectionAttention(attn)).eval()
        s.linear_twin_params = s.linear_twin[0].linear_params()
    return s


# ---------------------------------------------------------------------------------------------
# measurements
# ---------------------------------------------------------------------------------------------
def _gradient(s):
    s.loss_func(s.model(s.X), s.y).backward()


def _ours(kind, columns=False, **kw):
    def run(s):
        cls = ba.AttentionGGNLinearOperator if kind == "ggn" else ba.AttentionHessianLinearOperator
        op = cls(s.model, s.loss_func, s.params, s.data, check_deterministic=False, **kw)
        op @ (s.V if columns else s.v)
    return run


def _curvlinops(kind, columns=False):
    def run(s):
        with ba.torch_math_attention():
            op = curvlinops_operator(kind, s.twin, s.loss_func, s.twin_params, s.data, check_deterministic=False)
            op @ (s.V if columns else s.v)
    return run


def _factors(s):
    ba.attention_factors(s.model, s.loss_func, s.attn, s.data)


def _block(s):
    blocks = ba.hessian_blocks(s.model, s.loss_func, s.attn, s.data)
    b = blocks[("W_Q", 0), ("W_Q", 0)]
    b.outer, b.functional, b.full  # noqa: B018


def _kfac_ours(s):
    K = ba.AttentionKFACLinearOperator(s.model, s.loss_func, s.params, s.data, fisher_type="mc",
                                       check_deterministic=False)
    K @ s.v


def _kfac_curvlinops(s):
    K = KFACLinearOperator(s.linear_twin, s.loss_func, s.linear_twin_params, s.data, fisher_type="mc",
                           kfac_approx="expand", check_deterministic=False)
    K @ s.v


def _backpack(extension):
    def run(s):
        model = ba.extend(s.model)
        loss_func = ba.extend(s.loss_func)
        with backpack(getattr(ba.extensions, extension)()):
            loss_func(model(s.X), s.y).backward()
    return run


def _factor_bytes(a, itemsize):
    """The factors of :func:`attention_factors`: ``A [N, H, L, L]`` (three of that size while the
    forward pass runs), ``M1``, ``g`` ``[N, H, L, E+1]``; ``Sigma`` and ``kappa_g`` are not formed."""
    d = a.E + 1
    return itemsize * a.N * a.heads * a.L * (3 * a.L + 2 * d)


def _block_bytes(a, itemsize):
    """The factors, the three parts of one within-head ``(E d_K)^2`` block (outer, functional, full)
    and one chunk of per-token terms (``derivatives.blocks.CHUNK_BYTES``)."""
    from backpack_attention.derivatives.blocks import CHUNK_BYTES

    return _factor_bytes(a, itemsize) + 3 * itemsize * (a.E * (a.E // a.heads)) ** 2 + CHUNK_BYTES


@dataclass
class Row:
    key: str
    model: str
    label: str
    run: Callable
    reference: Optional[str] = None  # the key of the curvlinops row it is compared with
    needs: tuple = ()
    estimate: Optional[Callable] = None  # bytes, for the skip rule


def rows(columns: int):
    K = columns
    return [
        Row("gradient", "layer", "one gradient (loss + backward, fused kernel)", _gradient),
        Row("ggn", "layer", "ours: GGN product (`AttentionGGNLinearOperator`, 1 vector)", _ours("ggn"), "c_ggn"),
        Row("hessian", "layer", "ours: Hessian product (`AttentionHessianLinearOperator`, 1 vector)",
            _ours("hessian"), "c_hessian"),
        Row("ggn_cols", "layer", f"ours: GGN x {K} columns (`column_chunk=16`, default)", _ours("ggn", True),
            "c_ggn_cols"),
        Row("ggn_cols1", "layer", f"ours: GGN x {K} columns, `column_chunk=1`", _ours("ggn", True, column_chunk=1),
            "c_ggn_cols"),
        Row("c_ggn", "layer", "curvlinops: GGN product (1 vector)", _curvlinops("ggn"), needs=("twin",)),
        Row("c_hessian", "layer", "curvlinops: Hessian product (1 vector)", _curvlinops("hessian"), needs=("twin",)),
        Row("c_ggn_cols", "layer", f"curvlinops: GGN x {K} columns", _curvlinops("ggn", True), needs=("twin",)),
        Row("factors", "layer", "ours: `attention_factors`", _factors, "c_ggn", estimate=_factor_bytes),
        Row("block", "layer", "ours: `hessian_blocks`, block (W_Q, 0) x (W_Q, 0), all parts", _block, "c_ggn",
            estimate=_block_bytes),
        Row("kfac", "layer", "ours: `AttentionKFACLinearOperator` (MC, 1 sample): factors + 1 product", _kfac_ours,
            "c_kfac"),
        Row("c_kfac", "layer", "curvlinops: `KFACLinearOperator` (expand, MC) on the nn.Linear twin",
            _kfac_curvlinops, needs=("linear_twin",)),
        Row("bp_kfac", "layer", "BackPACK `KFAC` (1 MC sample): forward + backward", _backpack("KFAC"), "c_ggn"),
        Row("bp_diag_ggn_mc", "layer", "BackPACK `DiagGGNMC` (1 sample): forward + backward",
            _backpack("DiagGGNMC"), "c_ggn"),
        Row("r_gradient", "readout", "one gradient (loss + backward, fused kernel)", _gradient),
        Row("r_ggn", "readout", "ours: GGN product (1 vector)", _ours("ggn"), "r_c_ggn"),
        Row("r_c_ggn", "readout", "curvlinops: GGN product (1 vector)", _curvlinops("ggn"), needs=("twin",)),
        Row("r_bp_diag_ggn_exact", "readout", "BackPACK `DiagGGNExact`: forward + backward",
            _backpack("DiagGGNExact"), "r_c_ggn"),
    ]


# ---------------------------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------------------------
def _maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024  # macOS: bytes, Linux: KiB


def _vm_bytes() -> Optional[int]:
    """Virtual memory size of this process (Linux), else ``None``."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def measure_here(row: Row, a, cap_gib: Optional[float] = None) -> dict:
    """Build, record the baseline, run ``row`` once; peak bytes above the baseline and seconds.

    ``cap_gib`` (CPU, fresh processes only): cap the address space at the baseline plus this much
    (``RLIMIT_AS``), so that a measurement far above the limit fails alone instead of exhausting
    a shared machine; it is then reported as ``{"over": cap_gib}``.
    """
    s = build(row.model, a, row.needs)
    # warm-up on 4 tokens of one sequence (kernel and allocator initialisation stays out of the peak)
    s.attn(s.X[:1, :4]).sum().backward()
    for p in s.model.parameters():
        p.grad = None
    cuda = torch.device(a.device).type == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _maxrss_bytes()
        vm = _vm_bytes()
        if cap_gib is not None and vm is not None:
            resource.setrlimit(resource.RLIMIT_AS, (vm + int(cap_gib * GIB), resource.getrlimit(resource.RLIMIT_AS)[1]))
    t = time.perf_counter()
    try:
        row.run(s)
    except (MemoryError, RuntimeError) as err:
        if cap_gib is None or "memory" not in str(err).lower():
            raise
        return {"over": cap_gib}
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    peak = (torch.cuda.max_memory_allocated() if cuda else _maxrss_bytes()) - base
    return {"bytes": peak, "seconds": seconds}


def measure_fresh(row: Row, a) -> dict:
    """:func:`measure_here` in a new Python process (the CPU peak of a process only grows)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", row.key, "--L", str(a.L), "--E", str(a.E),
           "--heads", str(a.heads), "--N", str(a.N), "--dtype", a.dtype, "--device", a.device,
           "--threads", str(a.threads), "--columns", str(a.columns), "--limit-gib", str(a.limit_gib)]
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{row.key} at L={a.L} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fmt(gib: float) -> str:
    return f"{gib:.3f}" if gib < 10 else f"{gib:.1f}"


def run_all(a, lengths, fresh: bool, limit_gib: float):
    itemsize = torch.empty((), dtype=getattr(torch, a.dtype)).element_size()
    table = {}
    for L in lengths:
        aL = SimpleNamespace(**{**vars(a), "L": L})
        for row in rows(a.columns):
            est = row.estimate(aL, itemsize) / GIB if row.estimate else None
            if est is not None and est > limit_gib:
                table[row.key, L] = {"skipped": est}
                print(f"L={L:5d} {row.key:22s} skipped (estimated {est:.1f} GiB > --limit-gib {limit_gib})", flush=True)
                continue
            res = measure_fresh(row, aL) if fresh else measure_here(row, aL)
            table[row.key, L] = res
            if "over" in res:
                print(f"L={L:5d} {row.key:22s} over --limit-gib {limit_gib}", flush=True)
            else:
                print(f"L={L:5d} {row.key:22s} {res['bytes'] / GIB:8.3f} GiB  {res['seconds']:7.2f} s", flush=True)
    return table


def _measured(r) -> bool:
    return "bytes" in r


def cell(table, key, L):
    r = table[key, L]
    if "skipped" in r:
        return f"skipped (≈ {r['skipped']:.1f} estimated)"
    if "over" in r:
        return f"> {r['over']:g} (stopped)"
    return _fmt(r["bytes"] / GIB)


def ratio(table, row: Row, L):
    if row.reference is None:
        return "—"
    r, c = table[row.key, L], table[row.reference, L]
    if not (_measured(r) and _measured(c)) or c["bytes"] <= 0:
        return "—"
    return f"{r['bytes'] / c['bytes']:.2f}"


def markdown(a, lengths, table, header: dict) -> str:
    rs = rows(a.columns)
    labels = {r.key: r.label for r in rs}
    lines = [
        "# Benchmark: peak memory",
        "",
        f"Peak memory that one curvature computation adds, in GiB, for one causal "
        f"`MultiheadSelfAttention(E={a.E}, {a.heads} heads)` in {a.dtype} on {a.device}, N={a.N} sequences. "
        "Each measurement ran in a fresh Python process after the model, its twins and the data were built "
        + ("(`torch.cuda.max_memory_allocated()` minus the memory allocated then)." if a.device.startswith("cuda")
           else "(`ru_maxrss` at the end minus `ru_maxrss` then)."),
        "`÷ curvlinops` divides by the row named in the last column (the same model, curvlinops on "
        "`nn.MultiheadAttention` under the math SDPA kernel).",
        "",
        "* **layer**: the attention output under `nn.MSELoss` (targets `[N, L, E]`); operators take the "
        "layer's parameters.",
        f"* **readout**: attention, `nn.Flatten`, `nn.Linear(L·E, {CLASSES})` under `nn.CrossEntropyLoss` "
        "(one class per sequence), so that BackPACK's exact GGN backpropagates "
        f"{CLASSES} columns instead of L·E.",
        "",
    ]
    head = "| model | measurement | " + " | ".join(f"L={L} [GiB] | ÷ curvlinops" for L in lengths) + " | compared with |"
    lines += [head, "|---|---|" + "---:|---:|" * len(lengths) + "---|"]
    for r in rs:
        cells = " | ".join(f"{cell(table, r.key, L)} | {ratio(table, r, L)}" for L in lengths)
        lines.append(f"| {r.model} | {r.label} | {cells} | {labels[r.reference] if r.reference else '—'} |")
    over = [(r, L) for r in rs for L in lengths
            if not _measured(table[r.key, L]) or table[r.key, L]["bytes"] / GIB > TARGET_GIB]
    ours = [(r, L) for r, L in over if not r.key.startswith(("c_", "r_c_"))]
    theirs = [(r, L) for r, L in over if (r, L) not in ours]
    lines += ["", f"Target: each of our measurements within {TARGET_GIB:g} GiB. "
              + ("All of ours met it." if not ours else "Not met (over the target, or skipped because "
                 "estimated above the limit): " + "; ".join(f"{r.model}: {r.label} at L={L}" for r, L in ours) + ".")
              + ("" if not theirs else " Over it on the curvlinops side: "
                 + "; ".join(f"{r.model}: {r.label} at L={L}" for r, L in theirs) + ".")]
    lines += ["", "Seconds of each measurement (one run, the same process; not a timing benchmark):", "",
              "| model | measurement | " + " | ".join(f"L={L} [s]" for L in lengths) + " |",
              "|---|---|" + "---:|" * len(lengths)]
    for r in rs:
        secs = [table[r.key, L] for L in lengths]
        lines.append(f"| {r.model} | {r.label} | "
                     + " | ".join(f"{t['seconds']:.1f}" if _measured(t) else "—" for t in secs) + " |")
    lines += [
        "",
        f"- Command: `{header['command']}`",
        f"- Date (UTC): {header['date']}; total run time {header['total']:.0f} s",
        f"- Machine: {header['machine']}; curvlinops {CURVLINOPS_VERSION}",
        f"- 1-minute load average: {header['load0']:.1f} at the start, {header['load1']:.1f} at the end",
        f"- Skip rule: a measurement whose largest tensors alone take more than `--limit-gib {a.limit_gib:g}` "
        "is not run; its cell gives that estimate in GiB (`attention_factors`: `A [N, H, L, L]` three times "
        "over and `M1`, `g`; the block adds its three `(E d_K)^2` parts and one chunk of per-token terms); "
        "a measurement that "
        "needed more than that is stopped (its process's address space is capped at the baseline plus "
        "the limit) and reported as `> limit (stopped)`.",
        "- Operators: built with `check_deterministic=False` (both sides); the measurement includes the "
        "first product, which builds our operators' cached forward graph.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, every row in this process; prints only")
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--E", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--N", type=int, default=4)
    ap.add_argument("--L", type=int, default=None, help=argparse.SUPPRESS)  # worker only
    ap.add_argument("--columns", type=int, default=8, help="columns of the matrix products")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--limit-gib", type=float, default=8.0, help="skip measurements estimated above this")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default="docs/benchmarks_memory.md")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.worker is not None:
        row = {r.key: r for r in rows(a.columns)}[a.worker]
        print(json.dumps(measure_here(row, a, cap_gib=a.limit_gib)))
        return
    if a.quick:
        a.lengths, a.E, a.heads, a.N, a.columns = [8], 16, 4, 2, 3
    load0, t0 = load_average(), time.perf_counter()
    print(machine_line())
    table = run_all(a, a.lengths, fresh=not a.quick, limit_gib=a.limit_gib)
    if a.quick:
        # the fresh-process path once (the quick peaks above share one process: not meaningful)
        aL = SimpleNamespace(**{**vars(a), "L": a.lengths[0]})
        res = measure_fresh(rows(a.columns)[0], aL)
        print(f"fresh process: gradient {res['bytes'] / GIB:.4f} GiB")
        print(markdown(a, a.lengths, table, dict(command="python benchmarks/memory.py --quick", date="-", total=0.0,
                                                 machine=machine_line(), load0=load0, load1=load_average())))
        return
    header = dict(command="python benchmarks/memory.py" + ("" if argv is None and len(sys.argv) == 1 else
                                                           " " + " ".join(sys.argv[1:] if argv is None else argv)),
                  date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
                  total=time.perf_counter() - t0, machine=machine_line(), load0=load0, load1=load_average())
    text = markdown(a, a.lengths, table, header)
    out = ROOT / a.out
    out.write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
