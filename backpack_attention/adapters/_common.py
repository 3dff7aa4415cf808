"""What the library adapters share: the conversion plan and structural helpers."""

from __future__ import annotations

import inspect
import types
import weakref
from dataclasses import dataclass, field
from typing import Callable, List, Optional

from torch import nn


@dataclass
class Candidate:
    """One attention module an adapter recognised.

    ``refusals`` non-empty: it cannot be converted exactly (the reasons, for the error message).
    ``prepare``: switches the module to its SDPA path (run only when nothing is refused).
    ``check``: ``check(module, args, kwargs)`` before each forward call (raises to refuse a call).
    """

    name: str
    module: nn.Module
    kind: str
    refusals: List[str] = field(default_factory=list)
    prepare: Optional[Callable[[], None]] = None
    check: Optional[Callable] = None

    @property
    def label(self) -> str:
        return f"{self.name or '<model>'} ({type(self.module).__name__})"


def code_names(fn) -> set:
    """Global and attribute names a function's code (and its nested code) refers to; decorated
    functions (``functools.wraps``) are unwrapped."""
    fn = inspect.unwrap(fn)
    code = getattr(fn, "__code__", None)
    out, todo = set(), [code] if code is not None else []
    while todo:
        c = todo.pop()
        out.update(c.co_names)
        todo.extend(k for k in c.co_consts if isinstance(k, types.CodeType))
    return out


#: Per-class caches (weak: classes made at run time are not kept alive).
_CODE_NAMES: "weakref.WeakKeyDictionary[type, dict]" = weakref.WeakKeyDictionary()
_FORWARD_PARAMETERS: "weakref.WeakKeyDictionary[type, tuple]" = weakref.WeakKeyDictionary()


def class_code_names(cls: type, package: Optional[str] = None) -> frozenset:
    """Names referred to by the methods ``cls`` and its bases define (``nn.Module`` and its bases
    excluded; with ``package``, only classes defined in that package)."""
    per_class = _CODE_NAMES.setdefault(cls, {})
    if package not in per_class:
        per_class[package] = _class_code_names(cls, package)
    return per_class[package]


def _class_code_names(cls: type, package: Optional[str]) -> frozenset:
    out = set()
    for c in cls.__mro__:
        if c in (nn.Module, object):
            break
        if package is not None and not (c.__module__ or "").startswith(package):
            continue
        for v in vars(c).values():
            if isinstance(v, (staticmethod, classmethod)):
                v = v.__func__
            if inspect.isfunction(v):
                out |= code_names(v)
    return frozenset(out)


def from_package(module: nn.Module, package: str) -> bool:
    """Whether ``module``'s class is defined in ``package`` (e.g. ``"transformers"``)."""
    mod = type(module).__module__ or ""
    return mod == package or mod.startswith(package + ".")


def forward_parameters(module: nn.Module) -> List[str]:
    """Parameter names of ``type(module).forward`` after ``self`` (for positional arguments)."""
    cls = type(module)
    if cls not in _FORWARD_PARAMETERS:
        try:
            _FORWARD_PARAMETERS[cls] = tuple(inspect.signature(cls.forward).parameters)[1:]
        except (TypeError, ValueError):
            _FORWARD_PARAMETERS[cls] = ()
    return list(_FORWARD_PARAMETERS[cls])


def call_argument(module: nn.Module, args: tuple, kwargs: dict, names) -> dict:
    """The arguments of a forward call named ``names`` (given by keyword or positionally) that are not ``None``."""
    found = {n: kwargs[n] for n in names if kwargs.get(n) is not None}
    if args:
        params = forward_parameters(module)
        found.update({p: a for p, a in zip(params, args) if p in names and a is not None})
    return found


def dropout_probability(module: nn.Module, *attrs: str) -> float:
    """Largest attention-dropout probability among ``module``'s attributes ``attrs`` (``nn.Dropout``
    children or floats)."""
    p = 0.0
    for a in attrs:
        v = getattr(module, a, None)
        if isinstance(v, nn.Dropout):
            p = max(p, float(v.p))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            p = max(p, float(v))
    return p


def dropout_refusal(module: nn.Module, p: float) -> List[str]:
    """The refusal for attention dropout ``p`` of a module in training mode (none in eval mode: a
    call in training mode is refused then, by the SDPA drop-in)."""
    if module.training and p > 0:
        return [f"attention dropout p={p} in training mode makes its curvature random; call model.eval() "
                "before convert_attention (or set the attention dropout to 0)"]
    return []
