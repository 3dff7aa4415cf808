r"""curvlinops linear operators for the GGN and Hessian of attention parameters.

:class:`AttentionGGNLinearOperator` and :class:`AttentionHessianLinearOperator` take the same
arguments as curvlinops 3.x ``GGNLinearOperator`` / ``HessianLinearOperator`` and represent the
same matrices, restricted to ``params``: any parameters of any
:class:`~backpack_attention.MultiheadSelfAttention` modules in the model (several layers, any
subset, any order). They are curvlinops ``PyTorchLinearOperator`` s, so ``@``, ``.to_scipy()``
(``scipy.sparse.linalg.eigsh``), curvlinops' trace/diagonal estimators, Lanczos spectral
densities and ``SubmatrixLinearOperator`` work on them.

How a product is computed (per batch, see ``docs/operators.md`` for the cost model)
-------------------------------------------------------------------------------------
One forward pass per batch runs inside
:func:`~backpack_attention.derivatives.function.cached_attention`: every softmax attention core
forms its attention matrix :math:`\mathbf A` once and becomes a
:class:`~backpack_attention.derivatives.function.CachedSoftmaxCore`, whose first *and second*
derivatives are closed forms on the cached :math:`\mathbf A`
(:func:`~backpack_attention.derivatives.core.core_vjp`, ``core_jvp``, ``core_hvp``, computed in
cache-sized chunks). ``nn.LayerNorm`` outputs become
:class:`~backpack_attention.derivatives.layernorm.CachedLayerNorm` nodes (closed-form JVP for the
GGN's double-VJP pass). The forward graph is kept; the rest of the network (projections, MLPs,
residuals, readout) is differentiated by autograd on that graph.

* GGN: :math:`\mathbf G\mathbf v = \mathbf J^\top\boldsymbol\Lambda\mathbf J\mathbf v`. The backward
  graph :math:`\mathbf u\mapsto\mathbf J^\top\mathbf u` is recorded once per batch (inside
  :func:`~backpack_attention.derivatives.function.linear_backward`, so attention cores enter
  as linear maps of the cotangent); differentiating it in :math:`\mathbf u` gives
  :math:`\mathbf J\mathbf v` (one pass, attention cores by ``core_jvp``), then the loss Hessian
  :math:`\boldsymbol\Lambda` and one backward pass through the cached forward graph.
* Hessian: the gradient graph :math:`\nabla_\theta\mathcal L` is recorded once per batch; a
  product is one backward pass through it (attention cores by ``core_hvp`` and ``core_vjp``).
  ``part="functional"`` (:math:`\mathbf H - \mathbf G`) is one backward pass through the recorded
  graph of :math:`\mathbf J^\top\mathbf g` with the output gradient :math:`\mathbf g` held constant.

Every layer is traversed once per direction, so cross-layer blocks, shared (repeated) layers
and layers below or above the selected ones cost no extra passes.

Data parallel: when ``torch.distributed`` is initialised, each rank passes its own shard as
``data``; ``num_data=None`` counts all ranks' data, and every product is all-reduced (sum), so
all ranks hold the full-data product. All ranks must call each product (collective).

Caching trade-off: each cached batch keeps its forward graph with the attention matrices
(:math:`NHL^2` numbers per layer) and, once used, the recorded backward graph, a few times the
activation memory of a training step. The first ``max_cached_batches`` batches are cached;
later ones are recomputed for every product (streaming). Cached batches assume the data yields
the same batches in the same order every time and that the parameters do not change; call
:meth:`clear_cache` after changing either.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.autograd import grad

from backpack_attention._compat import PyTorchLinearOperator, as_param_list
from backpack_attention.derivatives.function import cached_attention, linear_backward
from backpack_attention.derivatives.layernorm import layer_norm_nodes
from backpack_attention.derivatives.loss import batch_weight
from backpack_attention.module import PARAM_NAMES, MultiheadSelfAttention

PARTS = ("full", "outer", "functional")


# ---------------------------------------------------------------------------------------------
# parameter bookkeeping
# ---------------------------------------------------------------------------------------------
def resolve_attention_params(model: nn.Module, params: List[Tensor]) -> Dict[str, MultiheadSelfAttention]:
    """The attention layers that own ``params`` (name -> module); raise clear errors otherwise.

    Raises:
        ValueError: ``params`` is empty, has duplicates, or contains a parameter that belongs to
            no :class:`MultiheadSelfAttention` of ``model`` (named in the message).
    """
    if len(params) == 0:
        raise ValueError("params is empty: pass parameters of the model's MultiheadSelfAttention modules")
    owner: Dict[int, Tuple[str, MultiheadSelfAttention]] = {}
    for mname, mod in model.named_modules():
        if isinstance(mod, MultiheadSelfAttention):
            for pname in PARAM_NAMES:
                p = getattr(mod, pname)
                if p is not None:
                    owner.setdefault(id(p), (mname or "<model>", mod))
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    bad = [names.get(id(p), f"<tensor of shape {list(p.shape)} not in the model>") for p in params if id(p) not in owner]
    if bad:
        raise ValueError(
            f"params: {bad} belong to no backpack_attention.MultiheadSelfAttention module of the model. "
            "These operators cover attention parameters only (in_proj_weight, in_proj_bias, out_proj_weight, "
            "out_proj_bias of MultiheadSelfAttention, e.g. after convert_attention(model)); use curvlinops' "
            "GGNLinearOperator / HessianLinearOperator for other parameters."
        )
    if len({id(p) for p in params}) != len(params):
        raise ValueError("params contains the same parameter more than once")
    return dict(owner[id(p)] for p in params)


class _RequiresGrad:
    """Context: only ``params`` require grad (graphs carry nothing else); restores the flags."""

    def __init__(self, model: nn.Module, params: List[Tensor]):
        self.flags = [(p, p.requires_grad) for p in model.parameters()]  # params are among them
        self.params = params

    def __enter__(self):
        for p, _ in self.flags:
            p.requires_grad_(False)
        for p in self.params:
            p.requires_grad_(True)

    def __exit__(self, *exc):
        for p, flag in self.flags:
            p.requires_grad_(flag)


class _CallRecorder:
    """Context: records which of the given attention layers the forward pass calls."""

    def __init__(self, layers: Dict[str, MultiheadSelfAttention]):
        self.layers, self.called, self.handles = layers, set(), []

    def __enter__(self):
        for name, mod in self.layers.items():
            self.handles.append(mod.register_forward_hook(lambda *_, name=name: self.called.add(name)))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def _grad(outputs, inputs, grad_outputs, **kw) -> List[Optional[Tensor]]:
    """``torch.autograd.grad`` that skips outputs without a graph and returns ``None`` for unused inputs."""
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if o is not None and g is not None and o.requires_grad]
    if not pairs:
        return [None] * len(inputs)
    return list(grad([o for o, _ in pairs], inputs, [g for _, g in pairs], allow_unused=True, **kw))


def _normal(t):
    """``t`` itself, or a normal copy if it was created under ``torch.inference_mode`` (inference
    tensors cannot enter autograd graphs)."""
    if isinstance(t, MutableMapping):
        return type(t)({k: _normal(v) for k, v in t.items()})
    return t.clone() if isinstance(t, Tensor) and t.is_inference() else t


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _all_reduce_int(n: int, device) -> int:
    """Sum ``n`` over ranks when torch.distributed is initialised."""
    if not _distributed():
        return n
    t = torch.tensor([n], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return int(t.item())


# ---------------------------------------------------------------------------------------------
# per-batch state
# ---------------------------------------------------------------------------------------------
class _BatchState:
    """Cached forward pass of one batch and the products on it (unnormalised: one batch's loss).

    Products take and return tensor lists in parameter shapes; with ``batched`` every tangent
    carries a leading column axis (autograd's ``is_grads_batched``). Construct and use it inside
    ``_RequiresGrad(model, params)``.
    """

    def __init__(self, model: nn.Module, loss_func, params: List[Tensor], layers, X, y):
        self.loss_func, self.params, self.y = loss_func, params, y
        with torch.enable_grad(), cached_attention(), layer_norm_nodes(model), _CallRecorder(layers) as rec:
            self.out = model(X)
        missing = sorted(set(layers) - rec.called)
        if missing:
            raise ValueError(f"attention layers {missing} own selected params but are not called by the model's forward")
        self._out_grad = None
        self._ggn = None
        self._hess = None
        self._func = None

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


# ---------------------------------------------------------------------------------------------
# operators
# ---------------------------------------------------------------------------------------------
class _AttentionCurvatureLinearOperator(PyTorchLinearOperator):
    """Data loop, normalisation, caching and checks shared by the GGN and Hessian operators."""

    SELF_ADJOINT = True

    def __init__(
        self,
        model_func: nn.Module,
        loss_func: Callable[[Tensor, Tensor], Tensor],
        params,
        data: Iterable[Tuple[Tensor, Tensor]],
        *,
        progressbar: bool = False,
        check_deterministic: bool = True,
        num_data: Optional[int] = None,
        batch_size_fn: Optional[Callable] = None,
        max_cached_batches: int = 8,
        column_chunk: int = 16,
    ):
        if not isinstance(model_func, nn.Module):
            raise TypeError(f"model_func must be an nn.Module (as for curvlinops 3.x), got {type(model_func).__name__}")
        if getattr(loss_func, "reduction", None) not in ("mean", "sum"):
            raise ValueError(
                "loss_func must be a loss module with reduction 'mean' or 'sum' (e.g. nn.CrossEntropyLoss(), "
                f"nn.MSELoss()), got {loss_func!r}"
            )
        if not isinstance(max_cached_batches, int) or max_cached_batches < 0:
            raise ValueError(f"max_cached_batches must be an int >= 0, got {max_cached_batches!r}")
        self._params = as_param_list(params)
        if not all(isinstance(p, Tensor) for p in self._params):
            raise TypeError("params must contain tensors (the model's parameters)")
        self._layers = resolve_attention_params(model_func, self._params)
        dtypes = {p.dtype for p in self._params}
        devices = {p.device for p in self._params}
        if len(dtypes) != 1 or len(devices) != 1:
            raise ValueError(f"params must share one dtype and device, got dtypes {dtypes} and devices {devices}")
        self._dtype, self._device = dtypes.pop(), devices.pop()
        self._model_func, self._loss_func, self._data = model_func, loss_func, data
        self._progressbar = progressbar
        self._batch_size_fn = batch_size_fn
        self._max_cached = max_cached_batches
        if not isinstance(column_chunk, int) or column_chunk < 1:
            raise ValueError(f"column_chunk must be a positive int, got {column_chunk!r}")
        self._chunk = column_chunk
        self._cache: Dict[int, _BatchState] = {}
        self._num_batches: Optional[int] = None

        first = next(iter(data), None)
        if first is None:
            raise ValueError("data is empty: pass an iterable of (X, y) batches, e.g. [(X, y)] or a DataLoader")
        self._check_batch(*first)
        if num_data is None:  # with torch.distributed: the total over all ranks' shards
            num_data = _all_reduce_int(sum(self._batch_size(X) for X, _ in data), self._device)
        if not isinstance(num_data, int) or num_data <= 0:
            raise ValueError(f"num_data must be a positive int, got {num_data!r}")
        self._N_data = num_data
        shapes = [tuple(p.shape) for p in self._params]
        super().__init__(shapes, shapes)
        if check_deterministic:
            self._check_deterministic()

    # -- properties ----------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    def clear_cache(self) -> None:
        """Drop the cached batches (after changing the parameters or the data)."""
        self._cache.clear()
        self._num_batches = None

    # -- data ----------------------------------------------------------------------------------
    def _batch_size(self, X) -> int:
        if self._batch_size_fn is not None:
            return self._batch_size_fn(X)
        if isinstance(X, MutableMapping):
            raise ValueError("data yields dict-like X: pass batch_size_fn (as for curvlinops)")
        return X.shape[0]

    def _check_batch(self, X, y) -> None:
        if isinstance(X, MutableMapping):
            if self._batch_size_fn is None:
                raise ValueError("data yields dict-like X: pass batch_size_fn (as for curvlinops)")
            return
        if not isinstance(X, Tensor) or not isinstance(y, Tensor):
            raise TypeError(f"data must yield (X, y) tensor pairs, got ({type(X).__name__}, {type(y).__name__})")
        if X.device != self._device or y.device != self._device:
            raise ValueError(
                f"data is on ({X.device}, {y.device}) but the parameters are on {self._device}; "
                "move the data (or the model) so that they match"
            )
        if X.is_floating_point() and X.dtype != self._dtype:
            raise ValueError(f"data X has dtype {X.dtype} but the parameters have {self._dtype}; cast one of them")
        if y.is_floating_point() and y.dtype != self._dtype:
            raise ValueError(f"data y has dtype {y.dtype} but the parameters have {self._dtype}; cast one of them")

    def _factor(self, X) -> float:
        return batch_weight(self._loss_func, self._batch_size(X), self._N_data)

    def _states(self, use_cache: bool = True):
        """Yield ``(normalisation factor, batch state)``; cached batches skip the data entirely."""
        if use_cache and self._num_batches is not None and self._num_batches <= self._max_cached:
            for i in range(self._num_batches):
                yield self._cache[i]
            return
        data = self._data
        if self._progressbar:
            from tqdm import tqdm

            data = tqdm(data, desc=type(self).__name__)
        n = 0
        for i, (X, y) in enumerate(data):
            n += 1
            if use_cache and i in self._cache:
                yield self._cache[i]
                continue
            self._check_batch(X, y)
            state = _BatchState(self._model_func, self._loss_func, self._params, self._layers, _normal(X), _normal(y))
            state.factor = self._factor(X)
            if use_cache and i < self._max_cached:
                self._cache[i] = state
            yield state
        if use_cache:
            self._num_batches = n

    # -- products ------------------------------------------------------------------------------
    def _batch_mv(self, state: _BatchState, v: List[Tensor], batched: bool) -> List[Optional[Tensor]]:
        raise NotImplementedError

    @torch.inference_mode(False)
    def _matmat(self, M: List[Tensor], use_cache: bool = True) -> List[Tensor]:
        """``M``: tensor list ``[*p.shape, K]``; returns the same layout.

        Columns are processed ``column_chunk`` at a time, vectorised by autograd's
        ``is_grads_batched`` (the closed-form nodes have generated vmap rules); a single column
        runs unbatched. Graphs are built and differentiated with only ``params`` requiring grad.

        Raises:
            ValueError: ``M`` has another dtype or device than the operator (before any work).
        """
        for m in M:
            if m.dtype != self._dtype or m.device != self._device:
                raise ValueError(
                    f"the vector/matrix has dtype {m.dtype} on {m.device}, but the operator has dtype {self._dtype} "
                    f"on {self._device}: pass v.to(op.dtype) / v.to(op.device) (or use op.to_scipy(), which casts)"
                )
        M = [_normal(m) for m in M]
        out = [torch.zeros_like(m) for m in M]
        K = M[0].shape[-1]
        Mt = [m.movedim(-1, 0) for m in M]  # [K, *p.shape]
        with _RequiresGrad(self._model_func, self._params):
            for state in self._states(use_cache):
                for k0 in range(0, K, self._chunk):
                    k1 = min(K, k0 + self._chunk)
                    if k1 - k0 == 1:
                        res = [None if r is None else r.unsqueeze(0)
                               for r in self._batch_mv(state, [m[k0] for m in Mt], False)]
                    else:
                        res = self._batch_mv(state, [m[k0:k1] for m in Mt], True)
                    for o, r in zip(out, res):
                        if r is not None:
                            o[..., k0:k1].add_(r.detach().movedim(0, -1), alpha=state.factor)
        if _distributed():  # data parallel: each rank holds its shard's sum
            for o in out:
                torch.distributed.all_reduce(o)
        return out

    # -- determinism ---------------------------------------------------------------------------
    @torch.inference_mode(False)
    def _loss_and_gradient(self):
        loss, grads = 0.0, [torch.zeros_like(p) for p in self._params]
        for X, y in self._data:
            f = self._factor(X)
            X, y = _normal(X), _normal(y)
            with torch.enable_grad(), _RequiresGrad(self._model_func, self._params):
                ell = self._loss_func(self._model_func(X), y) * f
                gs = grad(ell, self._params, allow_unused=True)
            loss += ell.item()
            for a, g in zip(grads, gs):
                if g is not None:
                    a.add_(g)
        return loss, grads

    def _check_deterministic(self, rtol: float = 5e-5, atol: float = 1e-6) -> None:
        """Two passes of loss, gradient and an (uncached) product must agree, as in curvlinops.

        Raises:
            RuntimeError: if they differ (dropout, data augmentation, shuffling, ``drop_last`` ...).
        """
        (l1, g1), (l2, g2) = self._loss_and_gradient(), self._loss_and_gradient()
        if abs(l1 - l2) > atol + rtol * abs(l2):
            raise RuntimeError("Check for deterministic total loss failed (model in train mode with dropout? shuffled data?)")
        if any(not torch.allclose(a, b, rtol=rtol, atol=atol) for a, b in zip(g1, g2)):
            raise RuntimeError("Check for deterministic total gradient failed")
        gen = torch.Generator(device="cpu").manual_seed(0)
        v = [torch.randn(p.shape, generator=gen, dtype=self._dtype).to(self._device).unsqueeze(-1) for p in self._params]
        r1, r2 = self._matmat(v, use_cache=False), self._matmat(v, use_cache=False)
        if any(not torch.allclose(a, b, rtol=rtol, atol=atol) for a, b in zip(r1, r2)):
            raise RuntimeError("Check for deterministic matrix-vector product failed")


class AttentionGGNLinearOperator(_AttentionCurvatureLinearOperator):
    r"""Generalised Gauss-Newton :math:`\mathbf G = \sum_n \mathbf J_n^\top\boldsymbol\Lambda_n\mathbf J_n`
    restricted to attention parameters; the same matrix as curvlinops' ``GGNLinearOperator``.

    Args:
        model_func: the model (an ``nn.Module``) containing :class:`MultiheadSelfAttention` layers.
        loss_func: loss module with ``reduction`` ``"mean"`` or ``"sum"`` (any twice-differentiable
            loss of the model output and targets, e.g. ``nn.CrossEntropyLoss``, ``nn.MSELoss``).
        params: list of parameters of the model's attention layers (any subset, any order; a
            ``dict`` name -> parameter is also accepted). Shapes define the operator's layout.
        data: iterable of ``(X, y)`` batches (same batches, same order, each time).
        progressbar: show a progress bar over batches.
        check_deterministic: run curvlinops-style determinism checks at construction.
        num_data: number of data points (``None``: one pass over ``data`` to count them).
        batch_size_fn: batch size of dict-like ``X`` (required then).
        max_cached_batches: how many batches keep their forward cache between products.
        column_chunk: columns of a matrix product processed together (vectorised; memory grows
            with it like curvlinops' vmapped matmat).

    Shape: ``[P, P]`` with ``P = sum(p.numel() for p in params)``.
    """

    def _batch_mv(self, state, v, batched):
        return state.ggn_mv(v, batched)


class AttentionHessianLinearOperator(_AttentionCurvatureLinearOperator):
    r"""Hessian :math:`\nabla^2_\theta\mathcal L` restricted to attention parameters, or one of its parts.

    Args:
        part: ``"full"`` (the Hessian, = curvlinops' ``HessianLinearOperator``), ``"outer"`` (the
            outer-product part = the GGN) or ``"functional"`` (Hessian minus GGN; indefinite).
        Other arguments: as :class:`AttentionGGNLinearOperator`.
    """

    def __init__(self, model_func, loss_func, params, data, *, part: str = "full", **kwargs):
        if part not in PARTS:
            raise ValueError(f"part must be one of {PARTS}, got {part!r}")
        self.part = part
        super().__init__(model_func, loss_func, params, data, **kwargs)

    def _batch_mv(self, state, v, batched):
        if self.part == "outer":
            return state.ggn_mv(v, batched)
        if self.part == "functional":
            return state.functional_mv(v, batched)
        return state.hessian_mv(v, batched)
