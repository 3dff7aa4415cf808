"""Route one module's calls of ``F.scaled_dot_product_attention`` to the package's drop-in.

:func:`route_sdpa` installs two forward hooks on a module (its class, parameters, buffers and
``state_dict`` stay as they are):

* a pre-hook runs the adapter's call check (e.g. refuse a head mask), then enters a
  :class:`torch.overrides.TorchFunctionMode` (:class:`_RouteSDPA`) that answers every call of
  :func:`torch.nn.functional.scaled_dot_product_attention` made while the module's forward runs
  with :func:`backpack_attention.adapters.sdpa.attention` (errors name the module). Every other
  torch function passes through untouched;
* a post-hook registered with ``always_call=True`` leaves the mode again, also when the forward
  raises.

Why a torch-function mode and not swapping ``torch.nn.functional.scaled_dot_product_attention``:

* it catches the function however the library reached it (``F.scaled_dot_product_attention``,
  ``torch.nn.functional.scaled_dot_product_attention`` or ``from torch.nn.functional import
  scaled_dot_product_attention`` bound at import time);
* torch keeps the mode stack per thread, so another thread running another model at the same
  time is not affected (a global swap would be). Calling the *same* converted module from several
  threads at once is fine too: each thread has its own mode stack and frame stack here;
* the mode is off inside its own handler, so the drop-in's fused forward calls torch's kernel.

Nesting (a converted module called inside another's forward, or recursively) keeps the stack
order of the hooks. Caveats: hooks do not run when ``module.forward(...)`` is called directly
instead of ``module(...)``; ``torch.jit.script`` ignores hooks, and ``torch.compile`` traces
through the mode like through other Python code (untested). Other torch functions called inside
the module's forward pay a small Python dispatch overhead (the mode's handler).
"""

from __future__ import annotations

import threading
from typing import Callable, Optional

from torch import nn
from torch.overrides import TorchFunctionMode

from backpack_attention.adapters.sdpa import TORCH_SDPA, attention

#: Attribute set on a converted module: its kind (e.g. ``"transformers.GPT2Attention"``).
MARK = "_backpack_attention_kind"
#: Attribute: the module's qualified name at conversion (error messages).
NAME = "_backpack_attention_name"
#: Attribute: a call check ``check(module, args, kwargs)`` run before each forward (or absent).
CHECK = "_backpack_attention_check"


class _RouteSDPA(TorchFunctionMode):
    """Answers ``scaled_dot_product_attention`` with the drop-in; everything else passes through."""

    def __init__(self, caller: str):
        super().__init__()
        self.caller = caller

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is TORCH_SDPA:
            return attention(*args, **kwargs, caller=self.caller)
        return func(*args, **kwargs)


class _Frames(threading.local):
    stack: list

    def __init__(self):
        self.stack = []


_frames = _Frames()


def _caller(module: nn.Module) -> str:
    return f"{getattr(module, NAME, '') or '<model>'} ({type(module).__name__})"


def _enter(module: nn.Module, args, kwargs):
    frame = [module, None]
    _frames.stack.append(frame)  # pushed first: the always-called post-hook pops it even if a check raises
    check: Optional[Callable] = getattr(module, CHECK, None)
    if check is not None:
        check(module, args, kwargs)
    mode = _RouteSDPA(_caller(module))
    mode.__enter__()
    frame[1] = mode


def _exit(module: nn.Module, args, kwargs, output):
    stack = _frames.stack
    if not stack or stack[-1][0] is not module:  # our pre-hook did not run (an earlier pre-hook raised)
        return None
    _, mode = stack.pop()
    if mode is not None:
        mode.__exit__(None, None, None)
    return None


def route_sdpa(module: nn.Module, kind: str, name: str, check: Optional[Callable] = None) -> None:
    """Route ``module``'s SDPA calls to the drop-in and mark it as converted (idempotent).

    Args:
        kind: what it is, recorded in :data:`MARK` (reported by ``converted_modules``).
        name: its qualified name in the model, for error messages.
        check: ``check(module, args, kwargs)`` run before each forward; raises to refuse a call.
    """
    if is_routed(module):
        return
    setattr(module, NAME, name)
    setattr(module, CHECK, check)
    module.register_forward_pre_hook(_enter, with_kwargs=True, prepend=True)
    module.register_forward_hook(_exit, with_kwargs=True, always_call=True)
    setattr(module, MARK, kind)


def is_routed(module: nn.Module) -> bool:
    """Whether :func:`route_sdpa` converted ``module``."""
    return getattr(module, MARK, None) is not None


def unroute_sdpa(module: nn.Module) -> None:
    """Undo :func:`route_sdpa` (the module's attention then runs torch's SDPA again)."""
    # by the hook functions, not by stored handles (a deepcopy's handles would point at the original)
    for hooks, fn in ((module._forward_pre_hooks, _enter), (module._forward_hooks, _exit)):
        for key in [k for k, h in hooks.items() if h is fn]:
            del hooks[key]
            module._forward_pre_hooks_with_kwargs.pop(key, None)
            module._forward_hooks_with_kwargs.pop(key, None)
            module._forward_hooks_always_called.pop(key, None)
    for attr in (MARK, NAME, CHECK):
        module.__dict__.pop(attr, None)
