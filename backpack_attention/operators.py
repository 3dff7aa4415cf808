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
One forward pass per batch adds a zero "injection" :math:`\boldsymbol\delta_l` to the output
of every attention layer ``l`` that owns a selected parameter, records the layer inputs
:math:`\mathbf X_l` and caches the layer's forward quantities (``Q, K, V, A``, head outputs;
:class:`~backpack_attention.derivatives.products.LayerCache`). The parameter Jacobian factors
as :math:`\mathbf J_\theta = \mathbf J_\delta\,\mathbf J^{\text{loc}}`, where the local
Jacobian :math:`\mathbf J^{\text{loc}}_l = \partial\mathbf F_l/\partial\theta_l` is applied in
closed form (:mod:`backpack_attention.derivatives.products`, no autograd graph through the
attention core) and :math:`\mathbf J_\delta` (the rest of the network: MLPs, LayerNorms,
residuals, later attention layers, readout) through a retained autograd graph of that forward
pass (its VJP directly, its JVP by the double-VJP trick on a cached, linear-in-``u`` graph).

* GGN: :math:`\mathbf G\mathbf v = \mathbf J^{\text{loc}\top}\mathbf J_\delta^\top\boldsymbol\Lambda
  \mathbf J_\delta\mathbf J^{\text{loc}}\mathbf v`, :math:`\boldsymbol\Lambda` the loss Hessian
  w.r.t. the model output.
* Hessian: :math:`\mathbf H\mathbf v = \mathbf J^{\text{loc}\top}\mathbf H_\delta\,\mathbf J^{\text{loc}}\mathbf v
  + \sum_l \mathbf H^{\theta\theta}_{f,l}\mathbf v_l + \text{mixed terms}`, where
  :math:`\mathbf H_\delta` is the exact Hessian of the loss w.r.t. the injections (double backward
  through the cached graph), :math:`\mathbf H_{f,l} = \mathbf r_l\cdot\partial^2\mathbf F_l`
  the layer's functional term for its output gradient :math:`\mathbf r_l` (closed form), and the
  mixed terms :math:`\mathbf r_l\cdot\partial^2\mathbf F_l/\partial\theta_l\partial\mathbf X_l`
  couple a layer's parameters to the parameters of selected layers below it (their input
  tangents :math:`\dot{\mathbf X}_l` come from the same cached graph).

Data parallel: when ``torch.distributed`` is initialised, each rank passes its own shard as
``data``; ``num_data=None`` counts all ranks' data, and every product is all-reduced (sum), so
all ranks hold the full-data product. All ranks must call each product (collective).

Caching trade-off: each cached batch keeps its forward graph (and, once used, the graphs of
the first backward pass), a few times the activation memory of a training step. The first
``max_cached_batches`` batches are cached; later ones are recomputed for every product
(streaming). Cached batches assume the data yields the same batches in the same order every
time and that the parameters do not change; call :meth:`clear_cache` after changing either.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.autograd import grad

from backpack_attention._compat import PyTorchLinearOperator, as_param_list
from backpack_attention.derivatives.products import (
    PARAM_NAMES,
    BackwardCache,
    LayerCache,
    functional_product,
    param_jvp,
    param_vjp,
)
from backpack_attention.derivatives.loss import batch_weight
from backpack_attention.module import MultiheadSelfAttention, call_arguments

PARTS = ("full", "outer", "functional")


# ---------------------------------------------------------------------------------------------
# parameter bookkeeping
# ---------------------------------------------------------------------------------------------
class _Target:
    """One attention layer that owns selected parameters.

    Attributes:
        name: qualified module name. module: the :class:`MultiheadSelfAttention`.
        slots: for each of ``PARAM_NAMES``, the position of that parameter in ``params`` or ``None``.
    """

    def __init__(self, name: str, module: MultiheadSelfAttention):
        self.name = name
        self.module = module
        self.slots: List[Optional[int]] = [None] * len(PARAM_NAMES)

    @property
    def need(self) -> Tuple[bool, ...]:
        return tuple(s is not None for s in self.slots)


def resolve_attention_params(model: nn.Module, params: List[Tensor]) -> List[_Target]:
    """Map every parameter in ``params`` to its attention layer; raise clear errors otherwise.

    Raises:
        ValueError: ``params`` is empty, has duplicates, or contains a parameter that belongs to
            no :class:`MultiheadSelfAttention` of ``model`` (named in the message).
    """
    if len(params) == 0:
        raise ValueError("params is empty: pass parameters of the model's MultiheadSelfAttention modules")
    owner: Dict[int, Tuple[str, MultiheadSelfAttention, int]] = {}
    for mname, mod in model.named_modules():
        if isinstance(mod, MultiheadSelfAttention):
            for k, pname in enumerate(PARAM_NAMES):
                p = getattr(mod, pname)
                if p is not None:
                    owner.setdefault(id(p), (mname, mod, k))
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
    targets: Dict[int, _Target] = {}
    for i, p in enumerate(params):
        mname, mod, k = owner[id(p)]
        t = targets.setdefault(id(mod), _Target(mname or "<model>", mod))
        t.slots[k] = i
    return list(targets.values())


class _Injection:
    """Context: hooks that record each target layer's input and add a zero leaf to its output."""

    def __init__(self, targets: List[_Target]):
        self.targets = targets
        self.records: Dict[int, dict] = {}
        self.handles = []

    def __enter__(self):
        for j, t in enumerate(self.targets):
            self.handles.append(t.module.register_forward_hook(self._hook(j), with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def _hook(self, j: int):
        def hook(module, args, kwargs, output):
            if j in self.records:
                raise NotImplementedError(
                    f"attention layer {self.targets[j].name!r} is called more than once per forward pass "
                    "(weight sharing); this is not supported"
                )
            x, kpm, attn_mask = call_arguments(args, kwargs)
            delta = torch.zeros_like(output, requires_grad=True)
            self.records[j] = {"X": x, "kpm": kpm, "am": attn_mask, "delta": delta}
            return output + delta

        return hook


class _FrozenParams:
    """Context: temporarily ``requires_grad_(False)`` on all model parameters (graphs only from injections)."""

    def __init__(self, model: nn.Module):
        self.params = [p for p in model.parameters() if p.requires_grad]

    def __enter__(self):
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p in self.params:
            p.requires_grad_(True)


def _grad(outputs, inputs, grad_outputs, **kw) -> List[Optional[Tensor]]:
    """``torch.autograd.grad`` that skips outputs without a graph and returns ``None`` for unused inputs."""
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if o is not None and g is not None and o.requires_grad]
    if not pairs:
        return [None] * len(inputs)
    return list(grad([o for o, _ in pairs], inputs, [g for _, g in pairs], allow_unused=True, **kw))


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
    """Cached forward pass of one batch and the products on it (unnormalised: one batch's loss)."""

    def __init__(self, model: nn.Module, loss_func, targets: List[_Target], X, y):
        self.loss_func, self.targets, self.y = loss_func, targets, y
        with torch.enable_grad(), _FrozenParams(model), _Injection(targets) as inj:
            self.out = model(X)
        missing = [t.name for j, t in enumerate(targets) if j not in inj.records]
        if missing:
            raise ValueError(f"attention layers {missing} own selected params but are not called by the model's forward")
        rec = [inj.records[j] for j in range(len(targets))]
        self.deltas = [r["delta"] for r in rec]
        self.X_nodes = [r["X"] if r["X"].requires_grad else None for r in rec]
        self.caches = [LayerCache.from_module(t.module, r["X"], r["kpm"], r["am"]) for t, r in zip(targets, rec)]
        self._ggn = None
        self._hess = None

    # -- local products (``batched``: tangents carry a leading column axis, mapped by vmap) -------
    def _local_jvp(self, v: List[Tensor], batched: bool) -> List[Tensor]:
        out = []
        for t, c in zip(self.targets, self.caches):
            slots = [s for s in t.slots if s is not None]

            def f(*vs, t=t, c=c):
                it = iter(vs)
                return param_jvp(c, *[None if s is None else next(it) for s in t.slots])

            out.append(_vmap(f, batched)(*[v[s] for s in slots]))
        return out

    def _local_vjp(self, w: List[Optional[Tensor]], out: List[Optional[Tensor]], batched: bool):
        for t, c, wl in zip(self.targets, self.caches, w):
            if wl is None:
                continue

            def f(g, t=t, c=c):
                return tuple(x for x in param_vjp(c, g, t.need) if x is not None)

            res = iter(_vmap(f, batched)(wl))
            for s in t.slots:
                if s is not None:
                    g = next(res)
                    out[s] = g if out[s] is None else out[s] + g

    # -- GGN -----------------------------------------------------------------------------------
    def _build_ggn(self):
        with torch.enable_grad():
            out_d = self.out.detach().requires_grad_(True)
            g_out = grad(self.loss_func(out_d, self.y), out_d, create_graph=True)[0]
            u = torch.zeros_like(self.out, requires_grad=True)
            g_u = _grad([self.out], self.deltas, [u], create_graph=True)
        self._ggn = (out_d, g_out, u, g_u)

    def ggn_mv(self, v: List[Tensor], n_params: int, batched: bool = False) -> List[Optional[Tensor]]:
        """``G v`` for one batch; ``v`` in parameter shapes (with a leading column axis if ``batched``)."""
        if self._ggn is None:
            self._build_ggn()
        out_d, g_out, u, g_u = self._ggn
        res: List[Optional[Tensor]] = [None] * n_params
        ddelta = self._local_jvp(v, batched)
        kw = {"retain_graph": True, "is_grads_batched": batched}
        with torch.enable_grad():
            (d_out,) = _grad(g_u, [u], ddelta, **kw)
            if d_out is None:
                return res
            (lam,) = _grad([g_out], [out_d], [d_out], **kw)
            if lam is None:
                return res
            w = _grad([self.out], self.deltas, [lam], **kw)
        self._local_vjp(w, res, batched)
        return res

    # -- Hessian -------------------------------------------------------------------------------
    def _build_hessian(self):
        with torch.enable_grad():
            g_delta = _grad([self.loss_func(self.out, self.y)], self.deltas, [torch.ones(())],
                            create_graph=True, retain_graph=True)
            backs = [BackwardCache.from_gradient(c, torch.zeros_like(c.X) if g is None else g)
                     for c, g in zip(self.caches, g_delta)]
            uX = [None if x is None else torch.zeros_like(x, requires_grad=True) for x in self.X_nodes]
            used = [j for j, x in enumerate(self.X_nodes) if x is not None]
            g_uX = None
            if used:
                g_uX = _grad([self.X_nodes[j] for j in used], self.deltas, [uX[j] for j in used],
                             create_graph=True, retain_graph=True)
        self._hess = (g_delta, backs, uX, used, g_uX)

    def hessian_mv(self, v: List[Tensor], n_params: int, batched: bool = False) -> List[Optional[Tensor]]:
        """``H v`` for one batch; ``v`` in parameter shapes (with a leading column axis if ``batched``)."""
        if self._hess is None:
            self._build_hessian()
        g_delta, backs, uX, used, g_uX = self._hess
        res: List[Optional[Tensor]] = [None] * n_params
        ddelta = self._local_jvp(v, batched)
        kw = {"retain_graph": True, "is_grads_batched": batched}
        # input tangents of layers with selected layers below them
        Xdot: List[Optional[Tensor]] = [None] * len(self.targets)
        if used:
            with torch.enable_grad():
                tang = _grad(g_uX, [uX[j] for j in used], ddelta, **kw)
            for j, xd in zip(used, tang):
                Xdot[j] = xd
        # layer-local functional terms (incl. the mixed (theta, X) terms) and input-side cotangents
        x_cot: List[Optional[Tensor]] = [None] * len(self.targets)
        for j, (t, c, b) in enumerate(zip(self.targets, self.caches, backs)):
            slots = [s for s in t.slots if s is not None]
            need_input = self.X_nodes[j] is not None
            has_x = Xdot[j] is not None

            def f(*args, t=t, c=c, b=b, need_input=need_input, has_x=has_x):
                it = iter(args)
                vt = [None if s is None else next(it) for s in t.slots]
                dX = next(it) if has_x else None
                p, xc = functional_product(c, b, *vt, dX=dX, need=t.need, need_input=need_input)
                return tuple(x for x in p if x is not None) + ((xc,) if need_input else ())

            outs = _vmap(f, batched)(*([v[s] for s in slots] + ([Xdot[j]] if has_x else [])))
            for s, g in zip(slots, outs[: len(slots)]):
                res[s] = g if res[s] is None else res[s] + g
            if need_input:
                x_cot[j] = outs[-1]
        with torch.enable_grad():
            w = _grad(list(g_delta) + [self.X_nodes[j] for j in used], self.deltas,
                      list(ddelta) + [x_cot[j] for j in used], **kw)
        self._local_vjp(w, res, batched)
        return res


def _vmap(f, batched: bool):
    return torch.vmap(f) if batched else f


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
        self._targets = resolve_attention_params(model_func, self._params)
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
            state = _BatchState(self._model_func, self._loss_func, self._targets, X, y)
            state.factor = self._factor(X)
            if use_cache and i < self._max_cached:
                self._cache[i] = state
            yield state
        if use_cache:
            self._num_batches = n

    # -- products ------------------------------------------------------------------------------
    def _batch_mv(self, state: _BatchState, v: List[Tensor], batched: bool) -> List[Optional[Tensor]]:
        raise NotImplementedError

    def _matmat(self, M: List[Tensor], use_cache: bool = True) -> List[Tensor]:
        """``M``: tensor list ``[*p.shape, K]``; returns the same layout.

        Columns are processed ``column_chunk`` at a time, vectorised (``vmap`` for the closed-form
        parts, ``is_grads_batched`` for the autograd parts); a single column runs unbatched.
        """
        out = [torch.zeros_like(m) for m in M]
        K = M[0].shape[-1]
        Mt = [m.movedim(-1, 0) for m in M]  # [K, *p.shape]
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
    def _loss_and_gradient(self):
        loss, grads = 0.0, [torch.zeros_like(p) for p in self._params]
        for X, y in self._data:
            f = self._factor(X)
            with torch.enable_grad():
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
        return state.ggn_mv(v, len(self._params), batched)


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
        n = len(self._params)
        if self.part == "outer":
            return state.ggn_mv(v, n, batched)
        h = state.hessian_mv(v, n, batched)
        if self.part == "full":
            return h
        g = state.ggn_mv(v, n, batched)
        return [None if a is None and b is None else (a if b is None else (-b if a is None else a - b)) for a, b in zip(h, g)]
