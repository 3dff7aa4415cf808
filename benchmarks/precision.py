"""Precision: relative error of float32 curvature against float64, and the precision policy.

Each model is drawn in float32 (a 2-block pre-LN causal ``language_model``, every parameter
perturbed by ``0.3 randn``, random tokens, next-token cross-entropy); the reference is the same
model and data in float64 (``copy.deepcopy(model).double()``), so the errors are those of the
float32 computation alone, not of rounding the inputs. For each quantity the error is
``||x32 - x64|| / ||x64||`` (Frobenius; the functional parts divide by the norm of the full
product or matrix, since they may nearly cancel):

* GGN and Hessian products (``AttentionGGNLinearOperator``, ``AttentionHessianLinearOperator``
  full and functional) of all attention parameters with ``COLUMNS`` random vectors;
* ``hessian_blocks`` of the lower attention layer (outer, functional, full ``matrix()``);
* the Kronecker factors of ``AttentionKFACLinearOperator`` (attention and ``nn.Linear``
  parameters): the largest error of any block ``out_factor ⊗ in_factor``;
* BackPACK's ``DiagGGNExact`` (every parameter).

``BOUNDS`` are the float32 tolerances the documentation states; the script checks every
measured error against them and fails if one is exceeded (``tests/test_precision_table.py`` checks
one small case against the same constant).

    python benchmarks/precision.py             # writes docs/precision.md
    python benchmarks/precision.py --quick     # the smallest size, one seed; prints only
"""

from __future__ import annotations

import argparse
import copy
import datetime
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

warnings.filterwarnings("ignore", message=".*torch.jit.script.*is deprecated")
warnings.filterwarnings("ignore", message="Full backward hook is firing")
warnings.filterwarnings("ignore", message="Encountered node that may break")

import backpack_attention as ba  # noqa: E402
from backpack_attention.models import language_model  # noqa: E402

from common import load_average, machine_line  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

#: (N, L, d, heads) of the measured models; vocabulary ``VOCAB``, MLP width 2 d
SIZES = [(4, 8, 8, 2), (4, 16, 16, 4), (8, 32, 32, 4)]
SEEDS = (0, 1, 2)
VOCAB = 8
COLUMNS = 4

#: The float32 tolerances docs/precision.md states: relative error of each float32 result against
#: float64 on the same model (every measured error must stay below its bound).
BOUNDS = {
    "GGN product": 1e-4,
    "Hessian product (full)": 1e-4,
    "Hessian product (functional)": 1e-4,
    "hessian_blocks: outer": 1e-4,
    "hessian_blocks: functional": 1e-4,
    "hessian_blocks: full": 1e-4,
    "KFAC factors (attention recipe)": 1e-4,
    "BackPACK DiagGGNExact": 1e-4,
}


def problem(size, seed: int):
    """``(model32, model64, loss_func, data)`` for ``size = (N, L, d, heads)``."""
    N, L, d, heads = size
    torch.manual_seed(seed)
    model = language_model(VOCAB, d, heads, 2, 2 * d, causal=True, max_len=L, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    g = torch.Generator().manual_seed(seed)
    X = torch.randint(0, VOCAB, (N, L), generator=g)
    y = torch.randint(0, VOCAB, (N, L), generator=g)
    return model.eval(), copy.deepcopy(model).double().eval(), nn.CrossEntropyLoss(), [(X, y)]


def _rel(a, b, scale=None) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / (b.norm() if scale is None else scale)).item()


def _attention_params(model):
    return [p for m in model.attention_layers() for p in m.parameters()]


def _products(model, loss_func, data, V):
    params = _attention_params(model)
    V = V.to(params[0].dtype)
    out = {"ggn": ba.AttentionGGNLinearOperator(model, loss_func, params, data) @ V}
    for part in ("full", "functional"):
        out[part] = ba.AttentionHessianLinearOperator(model, loss_func, params, data, part=part) @ V
    return out


def _kfac_factors(model, loss_func, data):
    params = [p for n, p in model.named_parameters() if ".ln" not in n and not n.startswith(("embed", "ln"))]
    K = ba.AttentionKFACLinearOperator(model, loss_func, params, data)
    return [(b.out_factor, b.in_factor) for b in K.blocks()]


def _kron_error(f32, f64) -> float:
    """``||A⊗B - C⊗D|| / ||C⊗D||`` from the factors alone (``None``: the scalar 1)."""
    one = torch.ones(1, 1, dtype=torch.float64)
    A, B = ((one if t is None else t.double()) for t in f32)
    C, D = ((one if t is None else t.double()) for t in f64)
    sq = lambda M: (M * M).sum()  # noqa: E731
    diff2 = sq(A) * sq(B) + sq(C) * sq(D) - 2 * (A * C).sum() * (B * D).sum()
    return (diff2.clamp_min(0).sqrt() / (sq(C) * sq(D)).sqrt()).item()


def _diag_ggn(model, loss_func, data):
    from backpack import backpack

    (X, y), = data
    net = ba.extend(copy.deepcopy(model), use_converter=True)
    lossf = ba.extend(copy.deepcopy(loss_func))
    with backpack(ba.extensions.DiagGGNExact()):
        lossf(net(X), y).backward()
    return torch.cat([p.diag_ggn_exact.reshape(-1) for p in net.parameters()])


def errors(size, seed: int) -> dict:
    """Relative error of every float32 quantity of ``BOUNDS`` on one model."""
    m32, m64, loss_func, data = problem(size, seed)
    P = sum(p.numel() for p in _attention_params(m64))
    V = torch.randn(P, COLUMNS, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    p32, p64 = _products(m32, loss_func, data, V), _products(m64, loss_func, data, V)
    full_norm = p64["full"].norm()
    err = {
        "GGN product": _rel(p32["ggn"], p64["ggn"]),
        "Hessian product (full)": _rel(p32["full"], p64["full"]),
        "Hessian product (functional)": _rel(p32["functional"], p64["functional"], full_norm),
    }
    b32 = ba.hessian_blocks(m32, loss_func, m32.attention_layers()[0], data)
    b64 = ba.hessian_blocks(m64, loss_func, m64.attention_layers()[0], data)
    full64 = b64.matrix("full")
    err["hessian_blocks: outer"] = _rel(b32.matrix("outer"), b64.matrix("outer"))
    err["hessian_blocks: functional"] = _rel(b32.matrix("functional"), b64.matrix("functional"), full64.norm())
    err["hessian_blocks: full"] = _rel(b32.matrix("full"), full64)
    f32, f64 = _kfac_factors(m32, loss_func, data), _kfac_factors(m64, loss_func, data)
    err["KFAC factors (attention recipe)"] = max(_kron_error(a, b) for a, b in zip(f32, f64))
    err["BackPACK DiagGGNExact"] = _rel(_diag_ggn(m32, loss_func, data), _diag_ggn(m64, loss_func, data))
    assert set(err) == set(BOUNDS)
    return err


def float64_check(size, seed: int) -> float:
    """Relative difference of our float64 GGN product from curvlinops' on the ``nn.MultiheadAttention``
    twin (math SDPA kernel): an independent float64 reference on the same model."""
    from backpack_attention._compat import curvlinops_operator
    from backpack_attention.models import torch_twin

    _, m64, loss_func, data = problem(size, seed)
    P = sum(p.numel() for p in _attention_params(m64))
    V = torch.randn(P, COLUMNS, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    ours = ba.AttentionGGNLinearOperator(m64, loss_func, _attention_params(m64), data) @ V
    twin = torch_twin(m64).eval()
    params = [p for m in twin.modules() if isinstance(m, nn.MultiheadAttention) for p in m.parameters()]
    with ba.torch_math_attention():
        ref = curvlinops_operator("ggn", twin, loss_func, params, data, check_deterministic=False) @ V
    return _rel(ours, ref)


def refusal_message() -> str:
    """The error a float16 model gets (the text docs/precision.md quotes)."""
    model = language_model(VOCAB, 8, 2, 1, dtype=torch.float16)
    X = torch.randint(0, VOCAB, (2, 4))
    try:
        ba.AttentionGGNLinearOperator(model, nn.CrossEntropyLoss(), _attention_params(model), [(X, X)])
    except TypeError as err:
        return str(err)
    raise AssertionError("float16 was not refused")


def format_bound(b: float) -> str:
    return f"{b:.0e}"


def markdown(table, header) -> str:
    sizes = list(table)
    q = list(BOUNDS)
    size_name = lambda s: f"N={s[0]}, L={s[1]}, d={s[2]}, H={s[3]}"  # noqa: E731
    lines = [
        "# Precision",
        "",
        "Curvature is computed in the dtype of the parameters; the data are cast alike.",
        "",
        "* **float64** is exact up to rounding: the tests compare every float64 result with an "
        "independent autodiff reference (torch.func, double backward, curvlinops, BackPACK); the first "
        "row of the table below is one such comparison on the measured models (our GGN product "
        "against curvlinops' on the `nn.MultiheadAttention` twin, math SDPA kernel).",
        "* **float32** is supported. Its results differ from float64 by the relative errors below, "
        "measured on random models by `benchmarks/precision.py`; the last column is the tolerance "
        "the package states for float32 (every measured error is below it, and "
        "`tests/test_precision_table.py` checks a small case against the same constant).",
        "* **float16 and bfloat16 are refused** before any work (`TypeError`) by the operators, "
        "`hessian_blocks`, `attention_factors` and KFAC: a saturated softmax gives NaN in float16, and "
        "bfloat16 GGN/Hessian products are off by large factors. The message:",
        "",
        "```text",
        header["refusal"],
        "```",
        "",
        "## float32 against float64",
        "",
        "Relative error `||x32 - x64|| / ||x64||` (Frobenius; the functional parts divide by the norm "
        "of the full product or matrix), the largest over seeds "
        + ", ".join(str(s) for s in header["seeds"]) + ". Each model is drawn in float32 and the "
        "reference is the same model and data in float64, so only the computation's rounding counts. "
        f"Model: 2-block pre-LN causal `language_model` (vocabulary {VOCAB}, MLP width 2d), every "
        "parameter perturbed by `0.3 randn`, next-token cross-entropy. Products: all attention "
        f"parameters, {COLUMNS} random vectors; blocks: the lower attention layer; KFAC: attention "
        "and `nn.Linear` parameters, the largest error of any Kronecker block; DiagGGNExact: every "
        "parameter.",
        "",
        "| quantity | " + " | ".join(size_name(s) for s in sizes) + " | float32 tolerance |",
        "|---|" + "---:|" * len(sizes) + "---:|",
    ]
    lines.append("| float64: GGN product vs curvlinops (not float32) | "
                 + " | ".join(f"{table[s]['float64']:.1e}" for s in sizes) + " | — |")
    for k in q:
        lines.append(f"| {k} | " + " | ".join(f"{table[s][k]:.1e}" for s in sizes) + f" | {format_bound(BOUNDS[k])} |")
    lines += [
        "",
        f"- Command: `{header['command']}`",
        f"- Date (UTC): {header['date']}; run time {header['total']:.0f} s",
        f"- Machine: {header['machine']}; 1-minute load average {header['load']:.1f}",
        "",
    ]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the smallest size, one seed; prints only")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="docs/precision.md")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0, load = time.perf_counter(), load_average()
    sizes, seeds = (SIZES[:1], SEEDS[:1]) if a.quick else (SIZES, SEEDS)
    table, failed = {}, []
    for size in sizes:
        worst = {}
        for seed in seeds:
            for k, e in errors(size, seed).items():
                worst[k] = max(worst.get(k, 0.0), e)
        worst["float64"] = max(float64_check(size, seed) for seed in seeds)
        table[size] = worst
        for k, e in worst.items():
            if k == "float64":
                print(f"{str(size):18s} {'float64 GGN product vs curvlinops':34s} {e:.2e}", flush=True)
                continue
            print(f"{str(size):18s} {k:34s} {e:.2e}  (bound {format_bound(BOUNDS[k])})", flush=True)
            if not e < BOUNDS[k]:
                failed.append((size, k, e))
    if failed:
        sys.exit(f"float32 errors above BOUNDS: {failed}")
    if a.quick:
        return
    header = dict(command="python benchmarks/precision.py", refusal=refusal_message(), seeds=seeds,
                  date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
                  total=time.perf_counter() - t0, machine=machine_line(), load=load)
    out = ROOT / a.out
    out.write_text(markdown(table, header))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
