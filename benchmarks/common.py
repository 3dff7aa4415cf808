"""What every benchmark script shares: timing, the machine line, the load warning.

Scripts run as ``python benchmarks/<name>.py``, so this folder is on ``sys.path`` and they import
it as ``common``. Times are ratios measured side by side: :func:`median_time` times the product and
its reference (one gradient, or the curvlinops operator) back to back in each repeat and reports
the median of the per-repeat ratios, which is robust to the machine's load drifting during a run.
"""

from __future__ import annotations

import os
import platform
import statistics
import time

import torch


def median_time(f, repeats: int, reference=None, warmup: bool = True):
    """Median seconds of ``repeats`` calls of ``f`` (after one warm-up call); with ``reference``
    (a function), ``(median seconds, median of time(f) / time(reference))``, each ratio from one
    back-to-back pair."""
    if warmup:
        f()
    ts, ratios = [], []
    for _ in range(repeats):
        if reference is not None:
            t = time.perf_counter()
            reference()
            tr = time.perf_counter() - t
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
        if reference is not None:
            ratios.append(ts[-1] / tr)
    if reference is None:
        return statistics.median(ts)
    return statistics.median(ts), statistics.median(ratios)


def timed_once(f) -> float:
    """Seconds of one call of ``f``."""
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> float:
    """The 1-minute load average (``nan`` where the platform has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return float("nan")


def machine_line() -> str:
    """CPU, core and thread counts, torch and Python versions."""
    return (f"{cpu_name()}, os.cpu_count() = {os.cpu_count()}, torch.get_num_threads() = "
            f"{torch.get_num_threads()}, torch {torch.__version__}, Python {platform.python_version()}")


def load_warning(load: float) -> list:
    """Markdown lines warning that a run shared the machine (load above the torch thread count)."""
    if not load > torch.get_num_threads():
        return []
    return [f"**Warning: this run shared the machine with other work (load average {load:.1f} on "
            f"{os.cpu_count()} cores); times vary by several × between repeats and the verdicts below are "
            "not reliable. Rerun on a quiet machine before quoting them.**", ""]


def fill_defaults(args, quick: dict, full: dict, default_out: str):
    """``args`` with every ``None`` option of ``quick`` (``args.quick``) or ``full`` set to that
    preset, and ``args.out`` to ``default_out`` for a full run (a ``--quick`` run only prints)."""
    for k, v in (quick if args.quick else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.out is None and not args.quick:
        args.out = default_out
    return args
