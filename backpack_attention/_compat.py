"""Everything that depends on the curvlinops version lives here.

Supported: ``curvlinops-for-pytorch`` 3.x (``params`` as a list of tensors, operators built
on ``CurvatureLinearOperator``) and, best effort, curvlinops master (``params`` as a
``dict[str, Tensor]``). Our operators subclass only :class:`PyTorchLinearOperator`, whose
subclass contract (``_matmat`` on tensor lists with a trailing column axis, ``SELF_ADJOINT``,
``device``/``dtype``) is the same in both.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from typing import Dict, List, Sequence, Union

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

with warnings.catch_warnings():
    # curvlinops imports linear_operator, which calls torch.jit.script at import time; recent torch
    # warns that it is deprecated. Not ours to fix, and noise for every user of this package.
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*is deprecated")  # Future- or DeprecationWarning
    import curvlinops
from curvlinops import GGNLinearOperator, HessianLinearOperator, SubmatrixLinearOperator  # noqa: F401

try:  # 3.x and master keep it here
    from curvlinops._torch_base import PyTorchLinearOperator
except ImportError:  # pragma: no cover - a future layout
    from curvlinops import PyTorchLinearOperator  # type: ignore

from curvlinops import LanczosApproximateSpectrumCached, hutchinson_diag, hutchinson_trace, xtrace  # noqa: F401

try:
    from importlib.metadata import version as _version

    CURVLINOPS_VERSION = _version("curvlinops-for-pytorch")
except Exception:  # pragma: no cover
    CURVLINOPS_VERSION = getattr(curvlinops, "__version__", "unknown")

#: Whether this curvlinops takes ``params`` as a ``dict`` (master) instead of a list (3.x).
_DICT_PARAMS = "dict" in str(inspect.signature(GGNLinearOperator.__init__).parameters["params"].annotation).lower()


def as_param_list(params: Union[Sequence[Tensor], Dict[str, Tensor]]) -> List[Tensor]:
    """Accept ``params`` as a list/tuple of tensors (3.x) or a ``dict`` name -> tensor (master)."""
    if isinstance(params, dict):
        return list(params.values())
    if isinstance(params, (list, tuple)):
        return list(params)
    raise TypeError(f"params must be a list of tensors (or a dict name -> tensor), got {type(params).__name__}")


def to_curvlinops_params(model: nn.Module, params: Sequence[Tensor]):
    """``params`` in the form this curvlinops' operators expect (list, or dict keyed by name)."""
    params = as_param_list(params)
    if not _DICT_PARAMS:
        return params
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: p for p in params}


def curvlinops_operator(kind: str, model: nn.Module, loss_func, params, data, **kwargs) -> PyTorchLinearOperator:
    """curvlinops' own ``GGNLinearOperator`` (``kind="ggn"``) or ``HessianLinearOperator`` (``"hessian"``).

    The reference our operators are tested against. Use it under
    ``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)`` for models with ``nn.MultiheadAttention``.
    """
    classes = {"ggn": GGNLinearOperator, "hessian": HessianLinearOperator}
    if kind not in classes:
        raise ValueError(f"kind must be one of {sorted(classes)}, got {kind!r}")
    return classes[kind](model, loss_func, to_curvlinops_params(model, params), data, **kwargs)


@contextlib.contextmanager
def torch_math_attention():
    """Context in which torch's own attention (``nn.MultiheadAttention``, ``F.scaled_dot_product_attention``
    and what calls it: HF ``sdpa``, timm ``fused_attn``) supports double backward and forward-mode
    AD: the math SDPA kernel, and no ``nn.MultiheadAttention`` fast path (which eval mode takes).
    What curvlinops' generic operators and ``torch.func`` references need on such models; this
    package's own operators do not."""
    old = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(old)
