"""The per-batch product engine: one cached forward graph, GGN / Hessian / functional products on it.

See :mod:`backpack_attention.operators` for how a product is computed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.autograd import grad

from backpack_attention.derivatives.function import cached_attention, linear_backward
from backpack_attention.derivatives.elementwise import activation_nodes
from backpack_attention.derivatives.layernorm import layer_norm_nodes


def _grad(outputs, inputs, grad_outputs, **kw) -> List[Optional[Tensor]]:
    """``torch.autograd.grad`` that skips outputs without a graph and returns ``None`` for unused inputs."""
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if o is not None and g is not None and o.requires_grad]
    if not pairs:
        return [None] * len(inputs)
    return list(grad([o for o, _ in pairs], inputs, [g for _, g in pairs], allow_unused=True, **kw))


def _tensors(t) -> List[Tensor]:
    """The tensors in ``t`` (a tensor, or a mapping of them)."""
    if isinstance(t, Tensor):
        return [t]
    if isinstance(t, Mapping):
        return [v for v in t.values() if isinstance(v, Tensor)]
    return []


class _CallRecorder:
    """Context: records which of the given attention layers the forward pass calls."""

    def __init__(self, layers):
        self.layers, self.called, self.handles = layers, set(), []

    def __enter__(self):
        for name, mod in self.layers.items():
            self.handles.append(mod.register_forward_hook(lambda *_, name=name: self.called.add(name)))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def tensor_key(t: Tensor) -> tuple:
    """What tells whether ``t`` was changed in place, read without its data (no host
    synchronisation): its version counter (``None`` for inference tensors, which have none), data
    pointer and shape. (``p.data`` writes bump no version counter; see ``ModelState``.)"""
    return (None if t.is_inference() else t._version), t.data_ptr(), tuple(t.shape)


class BatchState:
    """Cached forward pass of one batch and the products on it (unnormalised: one batch's loss).

    Products take and return tensor lists in parameter shapes; with ``batched`` every tangent
    carries a leading column axis (autograd's ``is_grads_batched``). Construct and use it inside
    ``_RequiresGrad(model, params)``.
    """

    def __init__(self, model: nn.Module, loss_func, params: List[Tensor], layers, X, y):
        self.loss_func, self.params, self.y = loss_func, params, y
        self._input_keys = [(t, tensor_key(t)) for t in _tensors(X) + _tensors(y)]
        with torch.enable_grad(), cached_attention(), layer_norm_nodes(model), activation_nodes(model), \
                _CallRecorder(layers) as rec:
            self.out = model(X)
        missing = sorted(set(layers) - rec.called)
        if missing:
            raise ValueError(f"attention layers {missing} own selected params but are not called by the model's forward")
        self._out_grad = None
        self._ggn = None
        self._hess = None
        self._func = None

    def inputs_changed(self) -> bool:
        """Whether a tensor of this batch's ``(X, y)`` was changed in place since it was cached."""
        return any(tensor_key(t) != k for t, k in self._input_keys)

    @staticmethod
    def _grads(outputs, inputs, grad_outputs, batched: bool) -> List[Optional[Tensor]]:
        return _grad(outputs, inputs, grad_outputs, retain_graph=True, is_grads_batched=batched)

    # -- GGN -----------------------------------------------------------------------------------
    def _output_gradient(self) -> Tuple[Tensor, Tensor]:
        """``(f, g)``: the detached model output and the loss gradient ``g = grad_f loss`` at it, with
        the graph of ``g`` in ``f`` (its derivative is the loss Hessian Lambda). Shared by the GGN
        (Lambda) and functional (``g`` as a constant) products."""
        if self._out_grad is None:
            with torch.enable_grad():
                out_d = self.out.detach().requires_grad_(True)
                (g_out,) = grad(self.loss_func(out_d, self.y), out_d, create_graph=True)
            self._out_grad = (out_d, g_out)
        return self._out_grad

    def _build_ggn(self):
        out_d, g_out = self._output_gradient()
        with torch.enable_grad():
            u = torch.zeros_like(self.out, requires_grad=True)
            with linear_backward():
                Jt_u = _grad([self.out], self.params, [u], create_graph=True, retain_graph=True)
        self._ggn = (out_d, g_out, u, Jt_u)

    def ggn_mv(self, v: List[Tensor], batched: bool = False) -> List[Optional[Tensor]]:
        """``G v = J^T Lambda J v`` for one batch."""
        if self._ggn is None:
            self._build_ggn()
        out_d, g_out, u, Jt_u = self._ggn
        (Jv,) = self._grads(Jt_u, [u], v, batched)  # J v: derivative of J^T u in u, along v
        if Jv is None:
            return [None] * len(self.params)
        (lam,) = self._grads([g_out], [out_d], [Jv], batched)
        if lam is None:
            return [None] * len(self.params)
        return self._grads([self.out], self.params, [lam], batched)

    # -- Hessian -------------------------------------------------------------------------------
    def _build_hessian(self):
        with torch.enable_grad():
            loss = self.loss_func(self.out, self.y)
            self._hess = _grad([loss], self.params, [torch.ones_like(loss)], create_graph=True, retain_graph=True)

    def hessian_mv(self, v: List[Tensor], batched: bool = False) -> List[Optional[Tensor]]:
        """``H v`` for one batch: one backward pass through the recorded gradient graph."""
        if self._hess is None:
            self._build_hessian()
        return self._grads(self._hess, self.params, v, batched)

    # -- functional part -----------------------------------------------------------------------
    def _build_functional(self):
        g_out = self._output_gradient()[1].detach()  # a constant cotangent
        with torch.enable_grad():
            self._func = _grad([self.out], self.params, [g_out], create_graph=True, retain_graph=True)

    def functional_mv(self, v: List[Tensor], batched: bool = False) -> List[Optional[Tensor]]:
        r"""``(H - G) v`` for one batch: the derivative of :math:`\mathbf J^\top\mathbf g` at the
        constant output gradient :math:`\mathbf g = \nabla_{\mathbf f}\ell` (one backward pass through
        its recorded graph; no GGN product needed)."""
        if self._func is None:
            self._build_functional()
        return self._grads(self._func, self.params, v, batched)
