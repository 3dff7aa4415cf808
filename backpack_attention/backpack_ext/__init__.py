"""BackPACK support for multi-head self-attention and the other layers of a small transformer.

Use :func:`extend` instead of ``backpack.extend`` and the factories in
:mod:`backpack_attention.extensions` instead of ``backpack.extensions``::

    import backpack_attention as ba
    from backpack import backpack
    model = ba.extend(model, use_converter=True)   # residual adds -> SumModule
    loss_func = ba.extend(nn.CrossEntropyLoss())
    with backpack(ba.extensions.DiagGGNExact(), ba.extensions.BatchGrad()):
        loss_func(model(X), y).backward()
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager

import backpack
import torch
from torch import nn

from backpack_attention.backpack_ext.encoder import LEAF_MODULES, check_encoders, convert_encoders, readouts_to_modules
from backpack_attention.backpack_ext.registry import register
from backpack_attention.module import MultiheadSelfAttention, SelfAttentionAdapter, call_arguments, convert_attention

__all__ = ["extend", "register"]


_NO_INPUT = torch.empty(0)


def _record_masks(module, args, kwargs, output):
    """Forward hook (runs after BackPACK's): remember the call's masks.

    BackPACK's own hook ignores keyword arguments and stores positional ``None`` masks as
    ``module.input1 = None``, on which its backward hook would fail; those are replaced by an
    empty placeholder tensor.
    """
    x, kpm, attn_mask = call_arguments(args, kwargs)
    module._bpa_masks = (weakref.ref(x), kpm, attn_mask)
    for i in range(1, len(args)):
        if args[i] is None and getattr(module, f"input{i}", _NO_INPUT) is None:
            setattr(module, f"input{i}", _NO_INPUT)


def _install_mask_hooks(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, MultiheadSelfAttention) and not getattr(m, "_bpa_mask_hook", False):
            m.register_forward_hook(_record_masks, with_kwargs=True)
            m._bpa_mask_hook = True


def _prepare_adapters(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if isinstance(m, SelfAttentionAdapter):
            if not m.batch_first:
                raise ValueError(
                    f"{name or 'model'}: nn.MultiheadAttention with batch_first=False; BackPACK needs the "
                    "batch on axis 0: build it with batch_first=True"
                )
            # only the inner MultiheadSelfAttention is hooked (one hooked module per step)
            m._backpack_extend = True


@contextmanager
def attention_leaves():
    """Make BackPACK's converter (torch.fx) treat attention modules as leaves."""
    from backpack.custom_module import graph_utils

    tracer = graph_utils.BackpackTracer
    original = tracer.is_leaf_module

    def is_leaf_module(self, m, module_qualified_name):
        if isinstance(m, (MultiheadSelfAttention, SelfAttentionAdapter) + LEAF_MODULES):
            return True
        return original(self, m, module_qualified_name)

    tracer.is_leaf_module = is_leaf_module
    try:
        yield
    finally:
        tracer.is_leaf_module = original


def extend(module: nn.Module, debug: bool = False, use_converter: bool = False) -> nn.Module:
    """``backpack.extend`` with attention support.

    Converts every ``nn.MultiheadAttention`` (``batch_first=True``, self-attention) into a
    drop-in whose :class:`~backpack_attention.MultiheadSelfAttention` is hooked, records the
    masks each attention call receives (positional or keyword), and with ``use_converter=True``
    runs BackPACK's torch.fx converter (``x + f(x)`` becomes ``SumModule``, ``permute`` becomes
    ``Permute``) with attention modules kept as leaves.
    ``nn.TransformerEncoderLayer`` / ``nn.TransformerEncoder`` become traceable drop-ins with the
    same children and parameters (:mod:`~backpack_attention.backpack_ext.encoder`), and with the
    converter, mean pooling (``h.mean(1)``) and token selection (``h[:, 0]``) become modules.

    Args:
        module: model (or loss function) to extend.
        debug: print BackPACK's debug messages.
        use_converter: convert the model's ``forward`` into BackPACK modules (needed for
            second-order extensions on models with residual connections).

    Returns:
        The extended module (a new ``GraphModule`` when ``use_converter=True``).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    check_encoders(module)  # before any change
    module = convert_attention(module, strict=False)
    module = convert_encoders(module)
    _prepare_adapters(module)
    if use_converter:
        from backpack.custom_module.graph_utils import convert_module_to_backpack

        with attention_leaves():
            module = readouts_to_modules(module)
            module = convert_module_to_backpack(module, debug)
        _prepare_adapters(module)
    module = backpack.extend(module, debug=debug)
    _install_mask_hooks(module)  # after BackPACK's hooks, so it sees what they stored
    return module
