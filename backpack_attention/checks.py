"""Checks of user input shared by the curvature functions; each raises before any work.

Every message names the bad argument and says what would be accepted (docs/errors.md lists them).
"""

from __future__ import annotations

import torch
from torch import nn

def check_reiterable(data) -> None:
    """Refuse one-shot iterators (generators, ``iter(...)``): the operators iterate ``data`` many times.

    Raises:
        TypeError: ``data`` is not iterable, or is its own iterator.
    """
    try:
        it = iter(data)
    except TypeError:
        raise TypeError(
            f"data must be an iterable of (X, y) batches (a list, tuple or DataLoader), got {type(data).__name__}"
        ) from None
    if it is data:
        raise TypeError(
            f"data is a one-shot iterator ({type(data).__name__}), but curvature operators iterate over the data "
            "once per product: pass something that can be iterated repeatedly, e.g. list(data) or a DataLoader"
        )


#: Dtypes the curvature computations refuse (see docs/errors.md, "Precision").
LOW_PRECISION = (torch.float16, torch.bfloat16)


def check_precision(dtype: torch.dtype, name: str) -> None:
    """Refuse float16/bfloat16: curvature needs more precision than they hold (a saturated softmax
    gives NaN in float16, and bfloat16 products are off by factors). Raises ``TypeError``."""
    if dtype in LOW_PRECISION:
        raise TypeError(
            f"{name} have dtype {dtype}: curvature in float16/bfloat16 is not supported (its products are "
            "wrong by large factors). Run the curvature in float32 or float64, e.g. on a copy: "
            "copy.deepcopy(model).float() (or .double()) with the data cast alike"
        )


def check_no_randomness(model: nn.Module, name: str = "model_func") -> None:
    """Refuse models whose forward pass is random (dropout active in train mode): their curvature
    is a random matrix. Raises ``ValueError`` naming the modules."""
    random = [n or "<model>" for n, m in model.named_modules()
              if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 and m.training]
    random += [n or "<model>" for n, m in model.named_modules()
               if isinstance(m, nn.MultiheadAttention) and m.dropout > 0 and m.training]
    if random:
        raise ValueError(
            f"{name}: dropout modules {random} are active (train mode, p > 0), so the curvature would be "
            f"random; call {name}.eval() or set their p to 0"
        )


def memory_limit_bytes(device) -> int:
    """Memory of the machine the computation runs on: the GPU's total memory on CUDA, else the
    host's physical memory (``0`` if unknown, which disables :func:`check_memory`)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        import os

        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def check_memory(needed: int, device, what: str, advice: str) -> None:
    """Refuse a computation whose unavoidable tensors alone take more than the machine's memory
    (``needed`` bytes) before any of it runs. Raises ``MemoryError`` naming ``what`` and ``advice``."""
    limit = memory_limit_bytes(device)
    if limit and needed > limit:
        raise MemoryError(
            f"{what} takes about {needed / 2**30:.1f} GiB, more than the {limit / 2**30:.1f} GiB of memory of "
            f"this machine ({torch.device(device)}); {advice}"
        )
