"""The data loop and curvlinops conventions shared by the curvature operators.

:class:`AttentionCurvatureLinearOperator` owns everything that is not a product: argument checks,
parameter bookkeeping, the loop over ``data`` with curvlinops' batch weighting, the per-batch
cache, column chunking, data parallelism and the determinism check. A concrete operator only says
which product one batch contributes (:meth:`AttentionCurvatureLinearOperator._batch_mv`).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import MutableMapping
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.autograd import grad

from backpack_attention._compat import PyTorchLinearOperator, as_param_list
from backpack_attention.derivatives.loss import batch_weight, mean_denominator
from backpack_attention.layout import PARAM_NAMES
from backpack_attention.module import MultiheadSelfAttention
from backpack_attention.checks import check_no_randomness, check_precision, check_reiterable
from backpack_attention.operators.engine import BatchState, tensor_key

# ---------------------------------------------------------------------------------------------
# parameter bookkeeping
# ---------------------------------------------------------------------------------------------
def resolve_params(model: nn.Module, params: List[Tensor]) -> Dict[str, MultiheadSelfAttention]:
    """Check ``params`` against ``model``; return the attention layers that own some of them.

    ``params`` may be any parameters of the model: attention layers go through the closed forms,
    everything else through autograd on the cached graph.

    Returns:
        ``{name: module}`` of the :class:`MultiheadSelfAttention` layers owning selected parameters
        (their calls are checked at each forward pass).

    Raises:
        ValueError: ``params`` is empty, has duplicates, or contains a tensor that is not a
            parameter of ``model`` (named by shape in the message).
    """
    if len(params) == 0:
        raise ValueError("params is empty: pass a list of the model's parameters, e.g. list(model.parameters())")
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    bad = [f"params[{i}] (a tensor of shape {list(p.shape)})" for i, p in enumerate(params) if id(p) not in names]
    if bad:
        raise ValueError(
            f"{', '.join(bad)} is not a parameter of the model; pass parameters of model_func "
            "(e.g. [p for p in model.parameters()] or model.blocks[0].attn.parameters())"
        )
    if len({id(p) for p in params}) != len(params):
        raise ValueError("params contains the same parameter more than once")
    owner: Dict[int, Tuple[str, MultiheadSelfAttention]] = {}
    for mname, mod in model.named_modules():
        if isinstance(mod, MultiheadSelfAttention):
            for pname in PARAM_NAMES:
                p = getattr(mod, pname)
                if p is not None:
                    owner.setdefault(id(p), (mname or "<model>", mod))
    return dict(owner[id(p)] for p in params if id(p) in owner)


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


def _normal(t):
    """``t`` itself, or a normal copy if it was created under ``torch.inference_mode`` (inference
    tensors cannot enter autograd graphs)."""
    if isinstance(t, MutableMapping):
        return type(t)({k: _normal(v) for k, v in t.items()})
    return t.clone() if isinstance(t, Tensor) and t.is_inference() else t


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _all_reduce_float(x: float, device) -> float:
    """Sum ``x`` over ranks when torch.distributed is initialised."""
    if not _distributed():
        return x
    t = torch.tensor([x], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return float(t.item())


def _all_reduce_int(n: int, device) -> int:
    """Sum ``n`` over ranks when torch.distributed is initialised."""
    if not _distributed():
        return n
    t = torch.tensor([n], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return int(t.item())


def tensor_list(params) -> List[Tensor]:
    """``params`` (a list of tensors or a dict name -> tensor) as a list; ``TypeError`` otherwise."""
    params = as_param_list(params)
    if not all(isinstance(p, Tensor) for p in params):
        raise TypeError("params must contain tensors (the model's parameters)")
    return params


def dtype_and_device(params: List[Tensor]):
    """The one dtype and device of ``params``; refuses mixed ones and float16/bfloat16."""
    dtypes = {p.dtype for p in params}
    devices = {p.device for p in params}
    if len(dtypes) != 1 or len(devices) != 1:
        raise ValueError(f"params must share one dtype and device, got dtypes {dtypes} and devices {devices}")
    dtype = dtypes.pop()
    check_precision(dtype, "params")
    return dtype, devices.pop()


def first_batch(data):
    """The first ``(X, y)`` of ``data``; ``ValueError`` if there is none."""
    first = next(iter(data), None)
    if first is None:
        raise ValueError("data is empty: pass an iterable of (X, y) batches, e.g. [(X, y)] or a DataLoader")
    return first


def batch_size(X, batch_size_fn: Optional[Callable] = None) -> int:
    """Number of samples in a batch ``X`` (``batch_size_fn(X)`` where given, else ``X.shape[0]``)."""
    if batch_size_fn is not None:
        return batch_size_fn(X)
    if isinstance(X, MutableMapping):
        raise ValueError("data yields dict-like X: pass batch_size_fn (as for curvlinops)")
    return X.shape[0]


def check_batch(X, y, batch_size_fn: Optional[Callable], device, dtype) -> None:
    """The checks every operator runs on a batch ``(X, y)`` of its data before any work: tensors
    (or dict-like ``X`` with a ``batch_size_fn``), on the parameters' device, non-empty, and of the
    parameters' floating dtype."""
    if isinstance(X, MutableMapping):
        if batch_size_fn is None:
            raise ValueError("data yields dict-like X: pass batch_size_fn (as for curvlinops)")
        return
    if not isinstance(X, Tensor) or not isinstance(y, Tensor):
        raise TypeError(f"data must yield (X, y) tensor pairs, got ({type(X).__name__}, {type(y).__name__})")
    if X.device != device or y.device != device:
        raise ValueError(
            f"data is on ({X.device}, {y.device}) but the parameters are on {device}; "
            "move the data (or the model) so that they match"
        )
    if X.dim() == 0 or X.shape[0] == 0:
        raise ValueError(f"data: a batch X of shape {list(X.shape)} has no samples; drop empty batches")
    if X.is_floating_point() and X.dtype != dtype:
        raise ValueError(f"data X has dtype {X.dtype} but the parameters have {dtype}; cast one of them")
    if y.is_floating_point() and y.dtype != dtype:
        raise ValueError(f"data y has dtype {y.dtype} but the parameters have {dtype}; cast one of them")


class ModelState:
    """What a cache depends on: every parameter and buffer of the model, by version counter and data
    pointer (no host synchronisation), and on the CPU by value too (``p.data`` writes, e.g. an EMA
    update, bump no version counter)."""

    def __init__(self, model: nn.Module):
        self.tensors = [t for t in list(model.parameters()) + list(model.buffers())]
        self.keys = [tensor_key(t) for t in self.tensors]
        self.values = [t.detach().clone() if t.device.type == "cpu" else None for t in self.tensors]

    def changed(self) -> bool:
        if any(tensor_key(t) != k for t, k in zip(self.tensors, self.keys)):
            return True
        return any(v is not None and not torch.equal(t.detach(), v) for t, v in zip(self.tensors, self.values))


class AttentionCurvatureLinearOperator(PyTorchLinearOperator):
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
        self._params = tensor_list(params)
        self._layers = resolve_params(model_func, self._params)
        check_no_randomness(model_func)
        self._dtype, self._device = dtype_and_device(self._params)
        self._model_func, self._loss_func, self._data = model_func, loss_func, data
        self._progressbar = progressbar
        self._batch_size_fn = batch_size_fn
        self._max_cached = max_cached_batches
        if not isinstance(column_chunk, int) or column_chunk < 1:
            raise ValueError(f"column_chunk must be a positive int, got {column_chunk!r}")
        self._chunk = column_chunk
        self._cache: Dict[int, BatchState] = {}
        self._num_batches: Optional[int] = None
        self._model_state: Optional[ModelState] = None
        check_reiterable(data)

        self._check_batch(*first_batch(data))
        # Batch weights (mean reduction): each batch's share of the mean's denominator over all data
        # (counted targets for cross-entropy, entries for MSE; derivatives/loss.py), or, with an
        # explicit num_data, curvlinops' batch_size / num_data.
        self._by_denominator = num_data is None
        # Denominators read at construction, by target tensor (identity and version), so that
        # rebuilding a batch after a parameter change reads nothing from the device.
        self._known_denominators: Dict[int, tuple] = {}
        if num_data is None:  # with torch.distributed: the total over all ranks' shards
            num_data = self._read_denominators(data)
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
        """Drop the cached batches. Products rebuild them by themselves when the model's parameters,
        buffers or the cached input tensors change (see :class:`ModelState`); call this after
        changing what they cannot see (e.g. ``p.data`` on an accelerator, or the data's order)."""
        self._cache.clear()
        self._num_batches = None
        self._model_state = None

    def _refresh_cache(self) -> None:
        """Drop the cache if the model or a cached batch's inputs changed since it was built."""
        if not self._cache:
            return
        if (self._model_state is not None and self._model_state.changed()) or any(
                s.inputs_changed() for s in self._cache.values()):
            self.clear_cache()

    # -- data ----------------------------------------------------------------------------------
    def _batch_size(self, X) -> int:
        return batch_size(X, self._batch_size_fn)

    def _check_batch(self, X, y) -> None:
        check_batch(X, y, self._batch_size_fn, self._device, self._dtype)

    def _read_denominators(self, data) -> int:
        """Read every batch's mean denominator and their total (``_den_total``); the number of sequences."""
        self._known_denominators.clear()
        sizes = [(self._batch_size(X), self._denominator(X, y, remember=True)) for X, y in data]
        self._den_total = _all_reduce_float(sum(d for _, d in sizes), self._device)
        if self._den_total <= 0 and self._loss_func.reduction == "mean":
            raise ValueError("data: no target is counted by loss_func (all are ignore_index?)")
        return _all_reduce_int(sum(n for n, _ in sizes), self._device)

    def _refresh_denominators(self) -> None:
        """Re-read the batch weights if a target was changed in place (e.g. more ``ignore_index``),
        and drop the cache, whose batches carry the old weights."""
        if self._by_denominator and self._targets_changed():
            self._read_denominators(self._data)
            self.clear_cache()

    def _targets_changed(self) -> bool:
        """Whether a target tensor read at construction was changed in place since (host-side check)."""
        for ref, key, _ in self._known_denominators.values():
            y = ref()
            if y is not None and tensor_key(y) != key:
                return True
        return False

    def _denominator(self, X, y, remember: bool = False) -> float:
        if isinstance(y, Tensor):
            known = self._known_denominators.get(id(y))
            if known is not None and known[0]() is y and known[1] == tensor_key(y):
                return known[2]
        den = mean_denominator(self._loss_func, self._batch_size(X), y)
        if remember and isinstance(y, Tensor):  # a weak reference: batches of a DataLoader are not kept
            self._known_denominators[id(y)] = (weakref.ref(y), tensor_key(y), den)
        return den

    def _factor(self, X, y) -> float:
        """Weight of a batch's loss in the empirical risk (0: the batch counts no target)."""
        if self._loss_func.reduction != "mean":
            return 1.0
        if self._by_denominator:
            return self._denominator(X, y) / self._den_total
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
            state = BatchState(self._model_func, self._loss_func, self._params, self._layers, _normal(X), _normal(y))
            state.factor = self._factor(X, y)
            if use_cache and i < self._max_cached:
                if not self._cache:
                    self._model_state = ModelState(self._model_func)
                self._cache[i] = state
            yield state
        if use_cache:
            self._num_batches = n

    # -- products ------------------------------------------------------------------------------
    def _batch_mv(self, state: BatchState, v: List[Tensor], batched: bool) -> List[Optional[Tensor]]:
        raise NotImplementedError

    @torch.inference_mode(False)
    def _matmat(self, M: List[Tensor], use_cache: bool = True) -> List[Tensor]:
        """``M``: tensor list ``[*p.shape, K]``; returns the same layout.

        Columns are processed ``column_chunk`` at a time, vectorised by autograd's
        ``is_grads_batched`` (the closed-form nodes have generated vmap rules); a single column
        runs unbatched. Graphs are built and differentiated with only ``params`` requiring grad.

        Raises:
            ValueError: ``M`` is not floating point or on another device than the operator (before
                any work). Another floating dtype is cast to the operator's, and the result back.
        """
        for m in M:
            if not m.is_floating_point() or m.device != self._device:
                raise ValueError(
                    f"the vector/matrix has dtype {m.dtype} on {m.device}, but the operator has dtype {self._dtype} "
                    f"on {self._device}: pass a floating-point v.to(op.device) (or use op.to_scipy(), which casts)"
                )
        out_dtype = M[0].dtype
        if any(m.dtype != self._dtype for m in M):  # computed in the operator's dtype (as curvlinops)
            return [r.to(out_dtype) for r in self._matmat([m.to(self._dtype) for m in M], use_cache)]
        M = [_normal(m) for m in M]
        self._refresh_denominators()
        if use_cache:
            self._refresh_cache()
        out = [torch.zeros_like(m) for m in M]
        K = M[0].shape[-1]
        Mt = [m.movedim(-1, 0) for m in M]  # [K, *p.shape]
        with _RequiresGrad(self._model_func, self._params):
            for state in self._states(use_cache):
                if state.factor == 0:
                    continue  # a batch that counts no target (all ignore_index) contributes nothing
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
        loss, grads = None, [torch.zeros_like(p) for p in self._params]
        self._refresh_denominators()
        for X, y in self._data:
            f = self._factor(X, y)
            if f == 0:
                continue  # no counted target (the batch's mean is 0/0)
            X, y = _normal(X), _normal(y)
            with torch.enable_grad(), _RequiresGrad(self._model_func, self._params):
                ell = self._loss_func(self._model_func(X), y) * f
                gs = grad(ell, self._params, allow_unused=True)
            loss = ell.detach() if loss is None else loss + ell.detach()
            for a, g in zip(grads, gs):
                if g is not None:
                    a.add_(g)
        return (0.0 if loss is None else loss.item()), grads  # one host sync, after the data loop

    def _check_deterministic(self, rtol: float = 5e-5, atol: float = 1e-6) -> None:
        """Two passes of loss, gradient and an (uncached) product must agree, as in curvlinops.

        Raises:
            RuntimeError: if they differ (dropout, data augmentation, shuffling, ``drop_last`` ...).
        """
        (l1, g1), (l2, g2) = self._loss_and_gradient(), self._loss_and_gradient()
        if not math.isfinite(l1) or not all(bool(torch.isfinite(g).all()) for g in g1):
            raise ValueError(
                f"the loss ({l1}) or its gradient is not finite on the data: check the inputs, targets and "
                "parameters for nan/inf (curvature is undefined there)"
            )
        if abs(l1 - l2) > atol + rtol * abs(l2):
            raise RuntimeError("Check for deterministic total loss failed (model in train mode with dropout? shuffled data?)")
        if any(not torch.allclose(a, b, rtol=rtol, atol=atol) for a, b in zip(g1, g2)):
            raise RuntimeError("Check for deterministic total gradient failed")
        gen = torch.Generator(device="cpu").manual_seed(0)
        v = [torch.randn(p.shape, generator=gen, dtype=self._dtype).to(self._device).unsqueeze(-1) for p in self._params]
        r1, r2 = self._matmat(v, use_cache=False), self._matmat(v, use_cache=False)
        if any(not torch.allclose(a, b, rtol=rtol, atol=atol) for a, b in zip(r1, r2)):
            raise RuntimeError("Check for deterministic matrix-vector product failed")
