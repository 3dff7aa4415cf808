"""BackPACK on PyTorch's encoder layers and on token readouts.

``nn.TransformerEncoderLayer`` and ``nn.TransformerEncoder`` are ``torch.nn`` modules, so BackPACK's
torch.fx converter keeps them as opaque leaves, and their ``forward`` (fast-path checks, mask
canonicalisation, nested tensors) cannot be traced. :func:`convert_encoders` replaces each of them,
in place, by a drop-in whose ``forward`` is the plain sequence of modules BackPACK knows
(attention, residual ``+``, ``nn.LayerNorm``, ``nn.Linear``, activation module). The drop-ins
take over the **same child modules** under the **same names** (so the same ``Parameter`` objects,
the same ``parameters()`` order and the same ``state_dict()`` keys) and compute the same outputs.

Readouts are written in a model's ``forward`` as tensor ops; :func:`readouts_to_modules` turns them
into modules BackPACK can hook (run by ``extend(..., use_converter=True)`` before BackPACK's
converter):

* ``h.mean(d)`` / ``torch.mean(h, d)`` over one non-batch axis -> :class:`TokenMean` (mean pooling);
* ``h[:, i]`` / ``h[:, i, :]`` and other constant slices that keep the batch axis -> BackPACK's
  ``Slicing`` (CLS-token readout).

:func:`register_readouts` adds their module extensions (GGN diagonals and square roots, KFAC/KFLR,
Hessian diagonals) to a BackPACK extension; both are linear, so their Hessian is zero.
"""

from __future__ import annotations

import operator
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from backpack import extensions as bpext
from backpack.core.derivatives.slicing import SlicingDerivatives
from backpack.custom_module.slicing import Slicing
from backpack.extensions.secondorder.diag_ggn.diag_ggn_base import DiagGGNBaseModule
from backpack.extensions.secondorder.diag_hessian.diag_h_base import DiagHBaseModule
from backpack.extensions.secondorder.hbp.hbpbase import HBPBaseModule
from backpack.extensions.secondorder.sqrt_ggn.base import SqrtGGNBaseModule
from torch import Tensor, nn

from backpack_attention.backpack_ext.base import Unsupported
from backpack_attention.backpack_ext.derivatives.tokenmean import TokenMeanDerivatives
from backpack_attention.backpack_ext.hessian import Tagged
from backpack_attention.module import SelfAttentionAdapter

__all__ = [
    "EncoderLayer",
    "Encoder",
    "TokenMean",
    "check_encoders",
    "convert_encoders",
    "readouts_to_modules",
    "register_readouts",
    "LEAF_MODULES",
]

#: Activation functions of ``nn.TransformerEncoderLayer`` and the module that replaces each.
_ACTIVATIONS = {F.relu: nn.ReLU, F.gelu: nn.GELU}


# --------------------------------------------------------------------------------------
# Encoder layers
# --------------------------------------------------------------------------------------
class EncoderLayer(nn.Module):
    """Drop-in for an ``nn.TransformerEncoderLayer`` (``batch_first=True``, dropout 0) built from its
    own children, with a ``forward`` BackPACK's converter can trace.

    Children (in ``nn.TransformerEncoderLayer``'s order, the same objects): ``self_attn`` (the
    converted attention), ``linear1``, ``dropout``, ``linear2``, ``norm1``, ``norm2``, ``dropout1``,
    ``dropout2`` and ``activation`` (the layer's activation module, or ``nn.ReLU()`` / ``nn.GELU()``
    for ``F.relu`` / ``F.gelu``). The dropouts have ``p=0`` and are not called.

    ``forward(src, src_mask=None, src_key_padding_mask=None, is_causal=False)`` as in torch:
    pre-LN (``norm_first=True``) ``x + sa(norm1(x))``, ``x + ff(norm2(x))``; post-LN
    ``norm1(x + sa(x))``, ``norm2(x + ff(x))``.
    """

    def __init__(self, layer: nn.TransformerEncoderLayer):
        super().__init__()
        self.self_attn = layer.self_attn
        self.linear1 = layer.linear1
        self.dropout = layer.dropout
        self.linear2 = layer.linear2
        self.norm1 = layer.norm1
        self.norm2 = layer.norm2
        self.dropout1 = layer.dropout1
        self.dropout2 = layer.dropout2
        act = layer.activation
        self.activation = act if isinstance(act, nn.Module) else _ACTIVATIONS[act]()
        self.norm_first = layer.norm_first
        self.activation_relu_or_gelu = getattr(layer, "activation_relu_or_gelu", 0)
        self.train(layer.training)
        # BackPACK hooks the children only (one hooked module per step)
        self._backpack_extend = True

    def forward(self, src: Tensor, src_mask: Optional[Tensor] = None, src_key_padding_mask: Optional[Tensor] = None,
                is_causal: bool = False) -> Tensor:
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
            x = x + self._ff_block(self.norm2(x))
        else:
            x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal))
            x = self.norm2(x + self._ff_block(x))
        return x

    def _sa_block(self, x, attn_mask, key_padding_mask, is_causal):
        return self.self_attn(x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask, need_weights=False,
                              is_causal=is_causal)[0]

    def _ff_block(self, x):
        return self.linear2(self.activation(self.linear1(x)))


class Encoder(nn.Module):
    """Drop-in for an ``nn.TransformerEncoder``: the same ``layers`` (``nn.ModuleList``, its
    ``nn.TransformerEncoderLayer`` s replaced by :class:`EncoderLayer`) and ``norm``, applied in
    turn without torch's fast path (nested tensors).

    ``forward(src, mask=None, src_key_padding_mask=None, is_causal=None)`` as in torch; the masks
    (bool, or float ``0``/``-inf``) go to every layer.
    """

    def __init__(self, encoder: nn.TransformerEncoder):
        super().__init__()
        self.layers = encoder.layers
        self.num_layers = encoder.num_layers
        self.norm = encoder.norm
        self.enable_nested_tensor = False
        self.use_nested_tensor = False
        self.mask_check = getattr(encoder, "mask_check", True)
        self.train(encoder.training)
        self._backpack_extend = True

    def forward(self, src: Tensor, mask: Optional[Tensor] = None, src_key_padding_mask: Optional[Tensor] = None,
                is_causal: Optional[bool] = None) -> Tensor:
        causal = False if is_causal is None else is_causal
        output = src
        for mod in self.layers:
            output = mod(output, src_mask=mask, src_key_padding_mask=src_key_padding_mask, is_causal=causal)
        if self.norm is not None:
            output = self.norm(output)
        return output


def _dropouts(layer: nn.Module):
    return [(n, getattr(layer, n, None)) for n in ("dropout", "dropout1", "dropout2")]


def check_encoders(model: nn.Module) -> None:
    """Raise ``ValueError`` naming the first ``nn.TransformerEncoderLayer`` of ``model`` that
    :func:`convert_encoders` cannot replace (``batch_first=False``, dropout > 0, an activation other
    than ``F.relu``, ``F.gelu`` or an ``nn.Module``). Changes nothing."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    for name, m in model.named_modules():
        if type(m) is not nn.TransformerEncoderLayer:
            continue
        where = name or "model"
        attn = m.self_attn
        if not isinstance(attn, (nn.MultiheadAttention, SelfAttentionAdapter)):
            raise ValueError(
                f"{where}.self_attn: expected nn.MultiheadAttention, got {type(attn).__name__}; "
                "an nn.TransformerEncoderLayer is converted only with its own self-attention"
            )
        if not attn.batch_first:
            raise ValueError(
                f"{where}: nn.TransformerEncoderLayer with batch_first=False; BackPACK needs the batch on axis 0: "
                "build it with batch_first=True"
            )
        for dname, d in _dropouts(m):
            if isinstance(d, nn.Dropout) and d.p > 0:
                raise ValueError(
                    f"{where}.{dname}: dropout p={d.p} > 0 makes curvature random; build the layer with "
                    "dropout=0.0 (only dropout=0 is accepted)"
                )
        act = m.activation
        if not isinstance(act, nn.Module) and not any(act is f for f in _ACTIVATIONS):
            raise ValueError(
                f"{where}.activation: {getattr(act, '__name__', act)!r} is a function BackPACK cannot hook; use "
                "activation='relu' or 'gelu' (F.relu, F.gelu), or pass an activation module (e.g. nn.GELU())"
            )


def convert_encoders(model: nn.Module) -> nn.Module:
    """Replace, in place, every ``nn.TransformerEncoderLayer`` by an :class:`EncoderLayer` and every
    ``nn.TransformerEncoder`` by an :class:`Encoder` (exact classes only; subclasses, which may
    change ``forward``, are left alone). Checks everything first (:func:`check_encoders`), so on an
    error the model is untouched. A top-level layer or encoder is returned replaced. Returns the
    model. Same parameters (objects, order, ``state_dict()`` keys) and outputs; converting twice is
    harmless.
    """
    check_encoders(model)
    done: Dict[int, nn.Module] = {}

    def replacement(m: nn.Module) -> Optional[nn.Module]:
        if id(m) in done:
            return done[id(m)]
        if type(m) is nn.TransformerEncoderLayer:
            new = EncoderLayer(m)
        elif type(m) is nn.TransformerEncoder:
            swap(m)  # its layers first (the Encoder keeps the same ModuleList)
            new = Encoder(m)
        else:
            return None
        done[id(m)] = new
        return new

    def swap(parent: nn.Module) -> None:
        for child_name, child in list(parent._modules.items()):
            if child is None:
                continue
            new = replacement(child)
            if new is not None:
                setattr(parent, child_name, new)
            elif id(child) not in done:
                done[id(child)] = None
                swap(child)

    top = replacement(model)
    if top is not None:
        return top
    swap(model)
    return model


# --------------------------------------------------------------------------------------
# Readouts
# --------------------------------------------------------------------------------------
class TokenMean(nn.Module):
    """``x.mean(dim)`` over one axis other than the batch axis (mean pooling over tokens)."""

    def __init__(self, dim: int = 1):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim == 0:
            raise ValueError(f"dim must be an int other than 0 (the batch axis), got {dim!r}")
        self.dim = dim

    def extra_repr(self) -> str:
        return f"dim={self.dim}"

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(self.dim)


#: Modules BackPACK's converter must keep as leaves (else it traces into them).
LEAF_MODULES = (TokenMean, Slicing)


def _is_full_slice(s) -> bool:
    return isinstance(s, slice) and s == slice(None)


def _readout_module(node) -> Optional[nn.Module]:
    """The module equivalent to fx ``node`` (a mean over one non-batch axis, or a constant slice
    that keeps the batch axis), or ``None``."""
    if (node.op == "call_method" and node.target == "mean") or (node.op == "call_function"
                                                                  and node.target is torch.mean):
        args, kw = list(node.args), dict(node.kwargs)
        if len(args) < 2 and "dim" not in kw:
            return None
        dim = args[1] if len(args) > 1 else kw.pop("dim")
        keepdim = args[2] if len(args) > 2 else kw.pop("keepdim", False)
        if len(args) > 3 or kw or keepdim is not False:
            return None
        if isinstance(dim, (tuple, list)) and len(dim) == 1:
            dim = dim[0]
        if isinstance(dim, bool) or not isinstance(dim, int) or dim == 0:
            return None
        return TokenMean(dim)
    if node.op == "call_function" and node.target is operator.getitem and len(node.args) == 2:
        idx = node.args[1]
        if not isinstance(idx, tuple) or len(idx) < 2 or not _is_full_slice(idx[0]):
            return None
        for s in idx[1:]:
            if isinstance(s, slice):
                if any(b is not None and (isinstance(b, bool) or not isinstance(b, int)) for b in (s.start, s.stop, s.step)):
                    return None
            elif s is not Ellipsis and (isinstance(s, bool) or not isinstance(s, int)):
                return None
        return Slicing(idx)
    return None


def readouts_to_modules(module: nn.Module) -> nn.Module:
    """``module`` with its readout ops as modules: a ``torch.fx.GraphModule`` in which every
    ``h.mean(d)`` (one non-batch axis, ``keepdim=False``) is a :class:`TokenMean` and every constant
    slice keeping the batch axis (``h[:, 0]``) a BackPACK ``Slicing``; ``module`` itself when there
    are none. Call inside :func:`backpack_attention.backpack_ext.attention_leaves` (tracing with
    BackPACK's tracer, attention kept as a leaf); the parameters are the same objects.
    """
    from backpack.custom_module.graph_utils import BackpackTracer
    from torch.fx import GraphModule

    graph = BackpackTracer().trace(module)
    found = [(n, m) for n in graph.nodes if (m := _readout_module(n)) is not None]
    if not found:
        return module
    gm = GraphModule(module, graph)
    for node, new in found:
        base = "token_mean" if isinstance(new, TokenMean) else "slicing"
        k = 0
        while hasattr(gm, f"{base}{k}"):
            k += 1
        gm.add_submodule(f"{base}{k}", new)
        node.op, node.target, node.args, node.kwargs = "call_module", f"{base}{k}", (node.args[0],), {}
    gm.graph.lint()
    gm.recompile()
    return gm


def register_readouts(ext) -> None:
    """Add the module extensions of :class:`TokenMean` and ``Slicing`` (where BackPACK lacks one)
    to BackPACK extension ``ext``; refuse them, naming module and extension, where not implemented."""
    tm = TokenMeanDerivatives()
    if isinstance(ext, (bpext.DiagGGNExact, bpext.DiagGGNMC, bpext.BatchDiagGGNExact, bpext.BatchDiagGGNMC)):
        table = {TokenMean: DiagGGNBaseModule(tm)}
    elif isinstance(ext, (bpext.SqrtGGNExact, bpext.SqrtGGNMC)):
        table = {TokenMean: SqrtGGNBaseModule(tm)}
    elif isinstance(ext, bpext.KFRA):
        why = "KFRA's batch-averaged backpropagation is not implemented; use KFAC or KFLR"
        table = {TokenMean: Unsupported(why), Slicing: Unsupported(why)}
    elif isinstance(ext, (bpext.KFAC, bpext.KFLR)):
        table = {TokenMean: HBPBaseModule(tm), Slicing: HBPBaseModule(SlicingDerivatives())}
    elif isinstance(ext, (bpext.DiagHessian, bpext.BatchDiagHessian)):
        table = {TokenMean: Tagged(DiagHBaseModule(tm))}
    elif isinstance(ext, (bpext.HMP, bpext.GGNMP, bpext.PCHMP)):
        table = {TokenMean: Unsupported("curvature-matrix products are not implemented for it; use "
                                        "backpack_attention's curvature operators instead")}
    else:  # first-order extensions: no parameters, nothing to do
        return
    for cls, module_ext in table.items():
        ext.set_module_extension(cls, module_ext, overwrite=True)
