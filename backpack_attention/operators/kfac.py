r"""KFAC and EKFAC for models with attention: :class:`AttentionKFACLinearOperator`,
:class:`AttentionEKFACLinearOperator` (docs/kfac.md).

Both are curvlinops ``PyTorchLinearOperator`` s, block-diagonal over Kronecker blocks:

* every :class:`~backpack_attention.MultiheadSelfAttention` in ``params`` is split into the groups
  ``Q`` (all heads), ``K``, ``V`` (per head with ``kfac_approx="attention"``, all heads for the
  generic recipes) and ``O``, each a Kronecker product in torch layout (rows: the projection's
  outputs, columns: its inputs plus the bias column); the math is in
  :mod:`backpack_attention.derivatives.kfac`;
* every ``nn.Linear`` in ``params`` is one block (inputs ``[N, *R, D]``: expand/reduce over ``R``;
  ``"attention"`` uses expand for them), exactly as curvlinops' ``KFACLinearOperator``;
* with ``separate_weight_and_bias=True`` (curvlinops' default) a group's weight and bias are two
  blocks, else one block on the augmented input.

``"expand"``/``"reduce"`` reproduce curvlinops' ``KFACLinearOperator`` on the equivalent model whose
attention is computed from ``nn.Linear`` q/k/v/o projections (the same loss-Hessian square roots,
Monte-Carlo samples and normalisation; tests/test_kfac_operator.py). ``"attention"`` uses the
attention-aware factors (the V input factor is the attention-averaged tokens, K is query-indexed
with swapped roles, b_K has zero curvature), which are exact for V on one layer with MSE.

Factors are computed on first use (or :meth:`AttentionKFACLinearOperator.compute_kronecker_factors`),
from one forward pass per batch and one backward pass per square-root column (type-2: the output
dimension; mc: ``mc_samples``; empirical: 1), like curvlinops. They are a snapshot: create a new
operator (or call ``compute_kronecker_factors()``) after the parameters change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from backpack_attention._compat import PyTorchLinearOperator
from backpack_attention.checks import check_no_randomness, check_reiterable
from backpack_attention.derivatives import kfac as kmath
from backpack_attention.layout import PARAM_NAMES
from backpack_attention.module import MultiheadSelfAttention, call_arguments
from backpack_attention.operators.base import (
    _normal,
    _RequiresGrad,
    batch_size,
    check_batch,
    dtype_and_device,
    first_batch,
    tensor_list,
)

__all__ = ["AttentionKFACLinearOperator", "AttentionEKFACLinearOperator", "KroneckerBlock"]

#: The torch blocks (``param_index`` names) of each attention group: (weight, bias).
_GROUP_BLOCKS = {"Q": ("W_Q", "b_Q"), "K": ("W_K", "b_K"), "V": ("W_V", "b_V"), "O": ("W_O", "b_O")}

#: Kinds a damping dict may name (besides block and module names, and ``"default"``).
BLOCK_KINDS = ("Q", "K", "V", "O", "linear")


@dataclass
class KroneckerBlock:
    """One diagonal block of the operator: ``out_factor ⊗ in_factor`` on the entries ``index``.

    ``index [p, q]``: positions in the operator's flat vector (``torch.cat`` of ``params``, row-major)
    of the block's matrix (rows: the outputs of a projection, columns: its inputs and/or the bias);
    ``group``: ``Q, K, V, O`` or ``linear``; ``head``: the head for per-head groups; ``part``:
    ``"joint"``, ``"weight"`` or ``"bias"``; ``cols``: the group's input-side columns it uses.
    """

    name: str
    module: str
    group: str
    head: Optional[int]
    part: str
    index: Tensor
    cols: Tensor
    out_factor: Optional[Tensor] = None
    in_factor: Optional[Tensor] = None

    @property
    def shape(self) -> Tuple[int, int]:
        return tuple(self.index.shape)


# ---------------------------------------------------------------------------------------------
# parameter bookkeeping
# ---------------------------------------------------------------------------------------------
def _module_params(module: nn.Module) -> List[Tuple[str, Tensor]]:
    if isinstance(module, MultiheadSelfAttention):
        return [(n, getattr(module, n)) for n in PARAM_NAMES if getattr(module, n) is not None]
    return [(n, p) for n, p in (("weight", module.weight), ("bias", module.bias)) if p is not None]


def resolve_kfac_params(model: nn.Module, params: List[Tensor]) -> Dict[str, nn.Module]:
    """The supported modules (name -> module) that own ``params``, in model order.

    Raises:
        ValueError: empty ``params``, duplicates, or parameters of modules the operator cannot
            handle (named, with the module type and what to do).
    """
    if len(params) == 0:
        raise ValueError("params is empty: pass parameters of the model's MultiheadSelfAttention and nn.Linear modules")
    if len({id(p) for p in params}) != len(params):
        raise ValueError("params contains the same parameter more than once")
    inside_mha = set()
    for name, mod in model.named_modules():
        if isinstance(mod, nn.MultiheadAttention):
            inside_mha.update(id(m) for m in mod.modules())
    owner: Dict[int, Tuple[str, nn.Module]] = {}
    for name, mod in model.named_modules():
        if _supported(mod, inside_mha):
            for _, p in _module_params(mod):
                owner.setdefault(id(p), (name or "<model>", mod))
    types = {}
    for mname, mod in model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            types.setdefault(id(p), (f"{mname}.{pname}" if mname else pname, type(mod).__name__))
    bad = []
    for p in params:
        if id(p) not in owner:
            where, kind = types.get(id(p), (f"<tensor of shape {list(p.shape)} not in the model>", "?"))
            bad.append(f"{where} ({kind})")
    if bad:
        hint = ""
        if any("MultiheadAttention" in b for b in bad):
            hint = " For nn.MultiheadAttention, call backpack_attention.convert_attention(model) first."
        raise ValueError(
            f"params: {bad} belong to modules that KFAC cannot handle. AttentionKFACLinearOperator covers the "
            "parameters of backpack_attention.MultiheadSelfAttention and nn.Linear modules (LayerNorm, Embedding, "
            "convolutions, ... are not supported): exclude these parameters from params, e.g. keep "
            "[p for m in model.modules() if isinstance(m, (MultiheadSelfAttention, nn.Linear)) "
            "for p in m.parameters(recurse=False)], and use AttentionGGNLinearOperator for exact blocks of the "
            "rest." + hint
        )
    used = {owner[id(p)][0]: owner[id(p)][1] for p in params}
    order = {name or "<model>": i for i, (name, _) in enumerate(model.named_modules())}
    return dict(sorted(used.items(), key=lambda kv: order[kv[0]]))


def _supported(mod: nn.Module, inside_mha=frozenset()) -> bool:
    return isinstance(mod, MultiheadSelfAttention) or (isinstance(mod, nn.Linear) and id(mod) not in inside_mha)


def _check_damping_value(name: str, d) -> float:
    if isinstance(d, bool) or not isinstance(d, (int, float)) or not math.isfinite(float(d)) or float(d) <= 0:
        raise ValueError(f"damping{name} must be a finite number > 0, got {d!r}")
    return float(d)


# ---------------------------------------------------------------------------------------------
# the operator
# ---------------------------------------------------------------------------------------------
class AttentionKFACLinearOperator(PyTorchLinearOperator):
    r"""KFAC of the GGN/Fisher of a model with attention (docs/kfac.md).

    Args:
        model_func: the model (``nn.Module``); attention as
            :class:`~backpack_attention.MultiheadSelfAttention` (``convert_attention(model)``).
        loss_func: ``nn.MSELoss``, ``nn.CrossEntropyLoss`` or ``nn.BCEWithLogitsLoss`` (``"mean"`` or
            ``"sum"``); cross-entropy takes classes on dim 1 (``[N, C, *R]``), the others classes last.
        params: parameters of the model's ``MultiheadSelfAttention`` and ``nn.Linear`` modules (a
            list, or a dict name -> tensor); any subset, any order.
        data: an iterable of ``(X, y)`` batches that can be iterated repeatedly.
        kfac_approx: ``"attention"`` (attention-aware factors, docs/math.md 7.3, per token: for
            token-level losses), ``"attention-reduce"`` (the same factors with reduce weight sharing:
            positions summed into one gradient per sequence, for models that pool over positions;
            ``nn.Linear`` layers get reduce), ``"expand"`` or ``"reduce"`` (the generic weight-sharing
            recipes, = curvlinops on the ``nn.Linear`` twin).
        fisher_type: ``"type-2"`` (exact loss-Hessian square roots), ``"mc"`` (``mc_samples``
            sampled labels) or ``"empirical"`` (gradients at the true labels).
        mc_samples: Monte-Carlo samples per loss term (``fisher_type="mc"`` only; else 1).
        seed: seed of the sampler (the factors are reproducible).
        separate_weight_and_bias: weight and bias as two blocks (curvlinops' default) or one
            block on the augmented input.
        num_data: number of data points (default: counted).
        num_per_example_loss_terms: loss terms per data point (default: inferred from ``y``).
        batch_size_fn: batch size of a non-tensor ``X`` (as for curvlinops).
        progressbar: tqdm over the batches while computing the factors.
        check_deterministic: run the loss twice on the first batch and refuse a random model.

    Raises (before any curvature work, the model untouched): ``ValueError`` for an unknown
    ``kfac_approx``/``fisher_type``, ``mc_samples`` other than 1 without MC, unsupported or
    duplicate parameters (named), an unsupported loss, empty or one-shot data, dropout, mixed
    dtypes/devices; ``TypeError`` for float16/bfloat16.
    """

    SELF_ADJOINT = True
    _PER_TOKEN_CORRECTIONS = None  # EKFAC only

    def __init__(
        self,
        model_func: nn.Module,
        loss_func,
        params,
        data: Iterable,
        *,
        kfac_approx: str = "attention",
        fisher_type: str = "type-2",
        mc_samples: int = 1,
        seed: int = 2147483647,
        separate_weight_and_bias: bool = True,
        num_data: Optional[int] = None,
        num_per_example_loss_terms: Optional[int] = None,
        batch_size_fn: Optional[Callable] = None,
        progressbar: bool = False,
        check_deterministic: bool = True,
    ):
        # ---- arguments, before any work ------------------------------------------------------
        if kfac_approx not in kmath.OPERATOR_KFAC_APPROXIMATIONS:
            raise ValueError(f"kfac_approx must be one of {kmath.OPERATOR_KFAC_APPROXIMATIONS}, got {kfac_approx!r}")
        if fisher_type not in kmath.FISHER_TYPES:
            raise ValueError(f"fisher_type must be one of {kmath.FISHER_TYPES} (curvlinops' names), got {fisher_type!r}")
        if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
            raise ValueError(f"mc_samples must be a positive int, got {mc_samples!r}")
        if fisher_type != "mc" and mc_samples != 1:
            raise ValueError(f"mc_samples={mc_samples} needs fisher_type='mc' (got {fisher_type!r}); use mc_samples=1")
        if not isinstance(model_func, nn.Module):
            raise TypeError(f"model_func must be an nn.Module, got {type(model_func).__name__}")
        if not isinstance(loss_func, kmath.KFAC_LOSSES):
            raise ValueError(
                f"loss_func must be one of {[c.__name__ for c in kmath.KFAC_LOSSES]}, got {type(loss_func).__name__}"
            )
        if loss_func.reduction not in ("mean", "sum"):
            raise ValueError(f"loss_func.reduction must be 'mean' or 'sum', got {loss_func.reduction!r}")
        if not isinstance(separate_weight_and_bias, bool):
            raise TypeError(f"separate_weight_and_bias must be a bool, got {separate_weight_and_bias!r}")
        check_reiterable(data)
        self._params = tensor_list(params)
        self._kfac_modules = resolve_kfac_params(model_func, self._params)
        check_no_randomness(model_func)
        self._dtype, self._device = dtype_and_device(self._params)
        self._model_func, self._loss_func, self._data = model_func, loss_func, data
        self._kfac_approx, self._fisher_type, self._mc_samples = kfac_approx, fisher_type, mc_samples
        self._seed = seed
        self._separate = separate_weight_and_bias
        self._batch_size_fn = batch_size_fn
        self._progressbar = progressbar

        first = first_batch(data)
        self._check_batch(*first)
        if num_data is None:
            num_data = sum(self._batch_size(X) for X, _ in data)
        if isinstance(num_data, bool) or not isinstance(num_data, int) or num_data <= 0:
            raise ValueError(f"num_data must be a positive int, got {num_data!r}")
        self._N_data = num_data
        if num_per_example_loss_terms is None:
            terms = sum(kmath.num_loss_terms(loss_func, y) for _, y in data)
            if terms % num_data != 0:
                raise ValueError(
                    f"the number of loss terms ({terms}) is not divisible by num_data ({num_data}): pass "
                    "num_per_example_loss_terms"
                )
            num_per_example_loss_terms = terms // num_data
        self._T = num_per_example_loss_terms

        shapes = [tuple(p.shape) for p in self._params]
        super().__init__(shapes, shapes)
        self._blocks = self._make_blocks()
        self._factors_ready = False
        self._cache: Dict[str, object] = {}
        if check_deterministic:
            self._check_deterministic(*first)

    # -- properties ----------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def kfac_approx(self) -> str:
        return self._kfac_approx

    @property
    def fisher_type(self) -> str:
        return self._fisher_type

    def block_names(self) -> List[str]:
        """Names of the Kronecker blocks (keys of a damping dict, of :meth:`factors`)."""
        return [b.name for b in self._blocks]

    def blocks(self) -> List[KroneckerBlock]:
        """The Kronecker blocks (factors computed)."""
        self._ensure_factors()
        return list(self._blocks)

    def factors(self) -> Dict[str, Tuple[Tensor, Tensor]]:
        """``{block name: (out_factor, in_factor)}``; the block is ``torch.kron(out, in)`` on
        ``block.index`` (torch row-major order)."""
        self._ensure_factors()
        return {b.name: (b.out_factor, b.in_factor) for b in self._blocks}

    # -- data ----------------------------------------------------------------------------------
    def _batch_size(self, X) -> int:
        return batch_size(X, self._batch_size_fn)

    def _check_batch(self, X, y) -> None:
        check_batch(X, y, self._batch_size_fn, self._device, self._dtype)

    def _check_deterministic(self, X, y) -> None:
        with torch.no_grad():
            l1 = self._loss_func(self._model_func(_normal(X)), _normal(y))
            l2 = self._loss_func(self._model_func(_normal(X)), _normal(y))
        if not bool(torch.isfinite(l1)):
            raise ValueError(f"the loss ({l1.item()}) is not finite on the first batch of data")
        if not torch.allclose(l1, l2, rtol=1e-5, atol=1e-8):
            raise RuntimeError("Check for deterministic loss failed (model in train mode with dropout? random model?)")

    # -- blocks --------------------------------------------------------------------------------
    def _global_index(self) -> Dict[int, Tuple[int, Tensor]]:
        out, offset = {}, 0
        for p in self._params:
            out[id(p)] = offset
            offset += p.numel()
        return out

    def _module_flat_to_global(self, module: nn.Module) -> Tensor:
        """``[P_module]``: each module-flat position's index in the operator's flat vector, or -1."""
        offsets = self._global_index()
        parts = []
        for _, p in _module_params(module):
            if id(p) in offsets:
                parts.append(offsets[id(p)] + torch.arange(p.numel()))
            else:
                parts.append(torch.full((p.numel(),), -1, dtype=torch.long))
        return torch.cat(parts)

    def _groups_of(self, module: nn.Module):
        """``[(group key, module-flat positions [p, q_full], number of weight columns)]``."""
        if isinstance(module, nn.Linear):
            o, i = module.weight.shape
            P = torch.arange(o * i).view(o, i)
            if module.bias is not None:
                P = torch.cat([P, o * i + torch.arange(o).view(o, 1)], 1)
            return [(("linear", None), P, i)]
        layout = module.layout
        E, H = layout.embed_dim, layout.num_heads
        per_head = kmath.attention_recipe(self._kfac_approx)
        groups = []
        for g in ("Q", "K", "V", "O"):
            heads = range(H) if per_head and g in ("K", "V") else [None]
            for h in heads:
                w, b = _GROUP_BLOCKS[g]
                P = layout.param_index(w, h).view(-1, E)
                if layout.bias:
                    P = torch.cat([P, layout.param_index(b, h if g != "O" else None).view(-1, 1)], 1)
                groups.append(((g, h), P, E))
        return groups

    def _make_blocks(self) -> List[KroneckerBlock]:
        blocks = []
        for mname, mod in self._kfac_modules.items():
            m2g = self._module_flat_to_global(mod)
            for (g, h), P, n_w in self._groups_of(mod):
                G = m2g[P]  # [p, q_full]
                has_w = bool((G[:, :n_w] >= 0).all())
                has_b = P.shape[1] > n_w and bool((G[:, n_w:] >= 0).all())
                base = mname if g == "linear" else f"{mname}.{g}" + ("" if h is None else f"[{h}]")
                parts = []
                if has_w and has_b and not self._separate:
                    parts.append(("joint", torch.arange(P.shape[1])))
                else:
                    if has_w:
                        parts.append(("weight", torch.arange(n_w)))
                    if has_b:
                        parts.append(("bias", torch.arange(n_w, P.shape[1])))
                for part, cols in parts:
                    name = base if part == "joint" else f"{base}.{part}"
                    blocks.append(KroneckerBlock(name, mname, g, h, part, G[:, cols], cols))
        return blocks

    # -- factor computation --------------------------------------------------------------------
    def _passes(self):
        """Per batch: ``(terms, scale, columns)``: ``terms[module] = [per-call terms]``, the loss
        scale, and a generator of ``{module: [per-call output cotangent]}`` per column."""
        data = self._data
        if self._progressbar:
            from tqdm import tqdm

            data = tqdm(data, desc=type(self).__name__)
        gen = torch.Generator(device=self._device)
        gen.manual_seed(self._seed)
        for X, y in data:
            self._check_batch(X, y)
            X, y = _normal(X), _normal(y)
            calls: Dict[str, list] = {m: [] for m in self._kfac_modules}
            handles = []

            def hook(mod, args, kwargs, output, name):
                calls[name].append((call_arguments(args, kwargs) if isinstance(mod, MultiheadSelfAttention)
                                    else args, output))
                return output.clone()  # later in-place ops act on the clone, not on the recorded output

            try:
                for name, mod in self._kfac_modules.items():
                    handles.append(mod.register_forward_hook(
                        lambda m, a, k, o, name=name: hook(m, a, k, o, name), with_kwargs=True))
                with torch.enable_grad(), _RequiresGrad(self._model_func, self._params):
                    output = self._model_func(X)
                    out2d, y2d = kmath.flatten_output(self._loss_func, output, y)
            finally:
                for hd in handles:
                    hd.remove()
            missing = [n for n, c in calls.items() if not c]
            if missing:
                raise ValueError(
                    f"modules {missing} were not called in model_func's forward pass (their parameters are in "
                    "params); KFAC needs their inputs and outputs (an nn.Linear used through F.linear on its "
                    "weight, e.g. inside nn.MultiheadAttention, is not seen: convert_attention(model) first)"
                )
            terms = {}
            for name, mod in self._kfac_modules.items():
                lst = []
                for args, out in calls[name]:
                    if isinstance(mod, MultiheadSelfAttention):
                        x = args[0]
                        allowed = mod.allowed_mask(x, args[1], args[2])
                        lst.append(kmath.AttentionKFACTerms(mod, x.detach(), allowed, self._kfac_approx))
                    else:
                        lst.append(kmath.LinearKFACTerms(mod, args[0].detach()))
                terms[name] = lst
            B = out2d.shape[0]
            scale = kmath.loss_scale(self._loss_func, B, self._N_data, self._T, self._mc_samples)
            cols = kmath.output_columns(self._loss_func, out2d, y2d, self._fisher_type, self._mc_samples, gen)
            outputs = [out for name in self._kfac_modules for _, out in calls[name]]

            def columns(cols=cols, out2d=out2d, outputs=outputs, calls=calls):
                V = cols.shape[0]
                for v in range(V):
                    grads = torch.autograd.grad(out2d, outputs, cols[v], retain_graph=v < V - 1, allow_unused=True)
                    res, i = {}, 0
                    for name in self._kfac_modules:
                        res[name] = []
                        for _, out in calls[name]:
                            g = grads[i]
                            res[name].append(torch.zeros_like(out) if g is None else g.detach())
                            i += 1
                    yield res

            yield terms, scale, columns()

    def _side_approx(self) -> str:
        return kmath.weight_sharing(self._kfac_approx)

    def _weighted(self, module: nn.Module) -> bool:
        """Whether the groups of ``module`` take the trace-weighted data side (the attention recipe)."""
        return self._kfac_approx == "attention" and isinstance(module, MultiheadSelfAttention)

    def compute_kronecker_factors(self) -> None:
        """(Re)compute the Kronecker factors from the data and the model's current parameters.

        Per group: the loss side is summed over columns, tokens and data (times the loss scale);
        the data side is the mean over tokens and data, or, for attention groups with
        ``kfac_approx="attention"``, the mean weighted by each token's loss-side trace
        (docs/kfac.md, "Trace weighting").
        """
        approx = self._side_approx()
        # (module, group) -> [out covariance, in covariance, data-side weight total]
        cov: Dict[Tuple[str, tuple], list] = {}

        def add(key, k, value):
            c = cov.setdefault(key, [None, None, 0.0])
            c[k] = value if c[k] is None else c[k] + value

        with torch.inference_mode(False):
            for terms, scale, columns in self._passes():
                weights, memo = {}, {}
                for grads in columns:
                    for name, lst in terms.items():
                        weighted = self._weighted(self._kfac_modules[name])
                        for j, (t, s) in enumerate(zip(lst, grads[name])):
                            for g, side in t.loss_sides(s).items():
                                k = 0 if t.data[g][0] == "in" else 1
                                add((name, g), k, kmath.loss_covariance(side, approx) * scale)
                                if weighted:
                                    w = kmath.token_weights(side) * scale
                                    weights[(name, j, g)] = w if (name, j, g) not in weights else weights[(name, j, g)] + w
                for name, lst in terms.items():
                    weighted = self._weighted(self._kfac_modules[name])
                    for j, t in enumerate(lst):
                        for g, (where, d) in t.data.items():
                            k = 1 if where == "in" else 0
                            if weighted:
                                w = weights.get((name, j, g), torch.zeros(d.shape[:-1], dtype=d.dtype, device=d.device))
                                add((name, g), k, kmath.data_covariance(d, approx, w.reshape(d.shape[0], -1)))
                                cov[(name, g)][2] = cov[(name, g)][2] + w.sum()  # a tensor: no host read
                            else:  # the twin's q/k/v share their input: one covariance
                                if (id(d), approx) not in memo:
                                    memo[(id(d), approx)] = kmath.data_covariance(d, approx)
                                add((name, g), k, memo[(id(d), approx)])
        generic = not kmath.attention_recipe(self._kfac_approx)
        for b in self._blocks:
            out_c, in_c, wsum = cov[(b.module, (b.group, b.head))]
            mod = self._kfac_modules[b.module]
            if isinstance(mod, MultiheadSelfAttention):
                data_side = "out" if kmath.loss_side(b.group, self._kfac_approx) == "in" else "in"
            else:
                data_side = "in"
            norm = float(self._N_data)
            if self._weighted(mod):  # no curvature reached this group (total 0): its data side is irrelevant
                wsum = torch.as_tensor(wsum, dtype=self._dtype, device=self._device)
                norm = torch.where(wsum > 0, wsum, norm)
            if data_side == "in":
                in_c = in_c / norm
            else:
                out_c = out_c / norm
            A = in_c[b.cols][:, b.cols]
            if b.part == "bias" and generic:
                A = torch.ones_like(A)  # curvlinops: a bias block is the gradient factor alone
            b.out_factor, b.in_factor = out_c, A  # blocks of one group share the tensor of their common factor
        self._factors_ready = True
        self._cache.clear()
        self._after_factors()

    def _after_factors(self) -> None:
        """Hook for EKFAC (eigenvalue corrections)."""

    def _ensure_factors(self) -> None:
        if not self._factors_ready:
            self.compute_kronecker_factors()

    # -- products ------------------------------------------------------------------------------
    def _check_M(self, M: List[Tensor]) -> None:
        for m in M:
            if m.dtype != self._dtype or m.device != self._device:
                raise ValueError(
                    f"the vector/matrix has dtype {m.dtype} on {m.device}, but the operator has dtype {self._dtype} "
                    f"on {self._device}: pass v.to(op.dtype) / v.to(op.device) (or use op.to_scipy(), which casts)"
                )

    def _block_apply(self, b: KroneckerBlock, X: Tensor) -> Tensor:
        """``(out ⊗ in) vec(X)`` for ``X [K, p, q]`` (the factors are symmetric)."""
        return b.out_factor @ X @ b.in_factor

    def _matmat(self, M: List[Tensor]) -> List[Tensor]:
        self._check_M(M)
        self._ensure_factors()
        return _blockwise(M, [(b.index, lambda X, b=b: self._block_apply(b, X)) for b in self._blocks])

    # -- eigendecompositions, inverse ----------------------------------------------------------
    def _eigh(self, t: Tensor):
        """``(eigenvalues, eigenvectors)`` of a factor, cached per tensor (blocks share factors)."""
        key = ("eigh", id(t))
        if key not in self._cache:
            self._cache[key] = (t, torch.linalg.eigh(t))  # keeps t alive, so its id stays valid
        return self._cache[key][1]

    def _eigen(self, b: KroneckerBlock):
        """``(Q_out, Q_in, eigenvalues [p, q])`` of a block (cached)."""
        key = ("eig", b.name)
        if key not in self._cache:
            lo, Qo = self._eigh(b.out_factor)
            li, Qi = self._eigh(b.in_factor)
            self._cache[key] = (Qo, Qi, (lo[:, None] * li[None, :]).clamp_min(0.0))
        return self._cache[key]

    def _block_eigenvalues(self, b: KroneckerBlock) -> Tensor:
        return self._eigen(b)[2]

    def resolve_damping(self, damping, *, relative: float = 1e-2, min_damping: Optional[float] = None) -> Dict[str, float]:
        """Per-block damping ``{block name: value}`` for ``damping`` (see :meth:`inverse`).

        Raises:
            ValueError: a non-positive or non-finite value, an unknown string, a dict with keys that
                name no block, module or kind, or a dict that leaves a block without a value.
        """
        names = self.block_names()
        if isinstance(damping, str):
            if damping != "heuristic":
                raise ValueError(f"damping must be a number > 0, a dict, or 'heuristic', got {damping!r}")
            relative = _check_damping_value(" (relative)", relative)
            if min_damping is not None:
                min_damping = _check_damping_value(" (min_damping)", min_damping)
            self._ensure_factors()
            scale = {b.name: float(self._block_eigenvalues(b).mean()) for b in self._blocks}
            floor = min_damping if min_damping is not None else 1e-8 * max(max(scale.values()), 1e-300)
            return {n: max(relative * scale[n], floor) for n in names}
        if isinstance(damping, dict):
            modules = {b.module for b in self._blocks}
            valid = set(names) | modules | set(BLOCK_KINDS) | {"default"}
            unknown = [k for k in damping if k not in valid]
            if unknown:
                raise ValueError(
                    f"damping dict has keys {unknown} that name no block; valid keys are block names {names}, "
                    f"module names {sorted(modules)}, kinds {list(BLOCK_KINDS)} and 'default'"
                )
            vals = {k: _check_damping_value(f"[{k!r}]", v) for k, v in damping.items()}
            out, missing = {}, []
            for b in self._blocks:
                for key in (b.name, b.module, b.group):
                    if key in vals:
                        out[b.name] = vals[key]
                        break
                else:
                    if "default" in vals:
                        out[b.name] = vals["default"]
                    else:
                        missing.append(b.name)
            if missing:
                raise ValueError(f"damping dict gives no value for blocks {missing}: add them or a 'default' key")
            return out
        d = _check_damping_value("", damping)
        return {n: d for n in names}

    def inverse(self, damping: Union[float, Dict[str, float], str] = 1e-3, *, relative: float = 1e-2,
                min_damping: Optional[float] = None) -> "KroneckerInverseLinearOperator":
        r"""The inverse of the damped operator, :math:`(\mathbf K_b + \delta_b\mathbf I)^{-1}` per block,
        from eigendecompositions of the factors (exact for each block).

        Args:
            damping: a number > 0 (every block); a dict from block names (:meth:`block_names`),
                module names, kinds (``"Q"``, ``"K"``, ``"V"``, ``"O"``, ``"linear"``) or
                ``"default"`` to numbers > 0 (the most specific key wins); or ``"heuristic"``:
                :math:`\delta_b=\max(\text{relative}\cdot\bar\lambda_b, \text{min\_damping})` with
                :math:`\bar\lambda_b` the block's mean eigenvalue (its own curvature scale, so Q/K
                blocks whose curvature is orders of magnitude below V's are damped in proportion;
                docs/kfac.md). ``min_damping`` defaults to ``1e-8`` times the largest block scale.
            relative, min_damping: the ``"heuristic"`` constants.
        """
        per_block = self.resolve_damping(damping, relative=relative, min_damping=min_damping)
        self._ensure_factors()
        parts = []
        for b in self._blocks:
            Qo, Qi, lam = self._eigen(b)
            parts.append((b.index, Qo, Qi, 1.0 / (lam + per_block[b.name])))
        return KroneckerInverseLinearOperator(self, parts, per_block)

    # -- scalar properties ---------------------------------------------------------------------
    def trace(self) -> Tensor:
        """Trace: ``sum_b tr(out_b) tr(in_b)``."""
        self._ensure_factors()
        return sum(b.out_factor.trace() * b.in_factor.trace() for b in self._blocks)

    def logdet(self) -> Tensor:
        """Log-determinant: ``sum_b q_b logdet(out_b) + p_b logdet(in_b)`` (``-inf`` if singular)."""
        self._ensure_factors()
        total = torch.zeros((), dtype=self._dtype, device=self._device)
        for b in self._blocks:
            p, q = b.shape
            total = total + q * torch.logdet(b.out_factor) + p * torch.logdet(b.in_factor)
        return total

    def det(self) -> Tensor:
        """Determinant: ``prod_b det(out_b)^q det(in_b)^p`` (under/overflows for large models: use :meth:`logdet`)."""
        self._ensure_factors()
        total = torch.ones((), dtype=self._dtype, device=self._device)
        for b in self._blocks:
            p, q = b.shape
            total = total * torch.linalg.det(b.out_factor).pow(q) * torch.linalg.det(b.in_factor).pow(p)
        return total

    def frobenius_norm(self) -> Tensor:
        """Frobenius norm: ``sqrt(sum_b |out_b|^2 |in_b|^2)``."""
        self._ensure_factors()
        return sum(b.out_factor.square().sum() * b.in_factor.square().sum() for b in self._blocks).sqrt()

    # -- state ---------------------------------------------------------------------------------
    _STATE_CONFIG = ("kfac_approx", "fisher_type", "mc_samples", "seed", "separate_weight_and_bias", "num_data",
                     "num_per_example_loss_terms")

    def _config(self) -> dict:
        return {"kfac_approx": self._kfac_approx, "fisher_type": self._fisher_type, "mc_samples": self._mc_samples,
                "seed": self._seed, "separate_weight_and_bias": self._separate, "num_data": self._N_data,
                "num_per_example_loss_terms": self._T, "loss_type": type(self._loss_func).__name__,
                "loss_reduction": self._loss_func.reduction, "operator": type(self).__name__}

    def state_dict(self) -> dict:
        """The configuration and the factors (computed if needed), detached copies: save with
        ``torch.save`` and restore with :meth:`load_state_dict` on an operator built alike (the model
        itself is not part of it)."""
        self._ensure_factors()
        sd = {"config": self._config(),
              "blocks": {b.name: {"out_factor": b.out_factor.detach().clone(), "in_factor": b.in_factor.detach().clone(),
                                  "shape": b.shape} for b in self._blocks}}
        sd.update(self._extra_state())
        return sd

    def _extra_state(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        """Use the factors of ``state_dict`` (from :meth:`state_dict` of an operator with the same
        configuration, blocks and loss) instead of computing them.

        Raises:
            ValueError: a different configuration, loss or set of blocks, or factors of the wrong shape.
        """
        if not isinstance(state_dict, dict) or "config" not in state_dict or "blocks" not in state_dict:
            raise ValueError("state_dict must come from AttentionKFACLinearOperator.state_dict()")
        mine, theirs = self._config(), state_dict["config"]
        diff = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
        if diff:
            raise ValueError(f"state_dict was saved with another configuration: {{key: (saved, this operator)}} = {diff}")
        names = self.block_names()
        if sorted(state_dict["blocks"]) != sorted(names):
            raise ValueError(
                f"state_dict has blocks {sorted(state_dict['blocks'])}, this operator {sorted(names)}"
            )
        new = {}
        for b in self._blocks:
            s = state_dict["blocks"][b.name]
            p, q = b.shape
            o, i = s["out_factor"], s["in_factor"]
            if tuple(o.shape) != (p, p) or tuple(i.shape) != (q, q):
                raise ValueError(f"state_dict: block {b.name} has factors {list(o.shape)}, {list(i.shape)}; "
                                 f"expected {[p, p]}, {[q, q]}")
            new[b.name] = (o.to(self._device, self._dtype).clone(), i.to(self._device, self._dtype).clone())
        self._check_extra_state(state_dict)
        for b in self._blocks:
            b.out_factor, b.in_factor = new[b.name]
        self._factors_ready = True
        self._cache.clear()
        self._load_extra_state(state_dict)

    def _check_extra_state(self, state_dict: dict) -> None:
        pass

    def _load_extra_state(self, state_dict: dict) -> None:
        pass


class AttentionEKFACLinearOperator(AttentionKFACLinearOperator):
    r"""Eigenvalue-corrected KFAC (George et al., 2018) on the Kronecker eigenbases of
    :class:`AttentionKFACLinearOperator` (same arguments).

    Each block is :math:`(\mathbf Q_{out}\otimes\mathbf Q_{in})\,\mathrm{diag}(\mathbf c)\,
    (\mathbf Q_{out}\otimes\mathbf Q_{in})^\top` with the eigenvectors of the KFAC factors and
    corrections :math:`\mathbf c` = the second moments of the gradients in that basis, from a second
    pass over the data. With ``kfac_approx="attention"`` every token's gradient
    :math:`\mathbf o_i\mathbf i_i^\top` (one per square-root column) is one sample: the exact
    per-token square-root factors, so :math:`\mathbf c` is the diagonal of the exact GGN in that
    basis (one attention layer under token-wise layers) and each block's Frobenius error is at most
    KFAC's. ``"expand"``/``"reduce"`` use per-sequence gradients, as curvlinops' ``EKFACLinearOperator``.
    """

    def _after_factors(self) -> None:
        self._corrections = None

    def compute_eigenvalue_correction(self) -> None:
        """(Re)compute the corrections (a second pass over the data, same columns as the factors)."""
        if not self._factors_ready:
            super().compute_kronecker_factors()
        per_token = self._kfac_approx == "attention"
        corr = {b.name: torch.zeros(b.shape, dtype=self._dtype, device=self._device) for b in self._blocks}
        by_group: Dict[Tuple[str, tuple], List[KroneckerBlock]] = {}
        for b in self._blocks:
            by_group.setdefault((b.module, (b.group, b.head)), []).append(b)
        with torch.inference_mode(False):
            for terms, scale, columns in self._passes():
                for grads in columns:
                    for name, lst in terms.items():
                        for t, s in zip(lst, grads[name]):
                            for g, (out, inp) in t.sides(s).items():
                                rotated = {}
                                for b in by_group.get((name, g), ()):  # groups without parameters in params: none
                                    Qo, Qi, _ = self._eigen(b)
                                    if id(Qo) not in rotated:
                                        rotated[id(Qo)] = kmath.rotate(out, Qo)
                                    corr[b.name] += scale * kmath.eigencorrection_rotated(
                                        rotated[id(Qo)], kmath.rotate(inp[..., b.cols], Qi), per_token)
        self._corrections = corr

    def compute_kronecker_factors(self) -> None:
        super().compute_kronecker_factors()
        self.compute_eigenvalue_correction()

    def _ensure_factors(self) -> None:
        if not self._factors_ready:
            super().compute_kronecker_factors()
        if self._corrections is None:
            self.compute_eigenvalue_correction()

    def _block_eigenvalues(self, b: KroneckerBlock) -> Tensor:
        return self._corrections[b.name]

    def corrections(self) -> Dict[str, Tensor]:
        """``{block name: corrected eigenvalues [p, q]}``."""
        self._ensure_factors()
        return dict(self._corrections)

    def _block_apply(self, b: KroneckerBlock, X: Tensor) -> Tensor:
        Qo, Qi, _ = self._eigen(b)
        return Qo @ ((Qo.T @ X @ Qi) * self._corrections[b.name]) @ Qi.T

    def inverse(self, damping=1e-3, *, relative: float = 1e-2, min_damping: Optional[float] = None):
        per_block = self.resolve_damping(damping, relative=relative, min_damping=min_damping)
        self._ensure_factors()
        parts = []
        for b in self._blocks:
            Qo, Qi, _ = self._eigen(b)
            parts.append((b.index, Qo, Qi, 1.0 / (self._corrections[b.name] + per_block[b.name])))
        return KroneckerInverseLinearOperator(self, parts, per_block)

    inverse.__doc__ = AttentionKFACLinearOperator.inverse.__doc__

    def trace(self) -> Tensor:
        self._ensure_factors()
        return sum(c.sum() for c in self._corrections.values())

    def logdet(self) -> Tensor:
        self._ensure_factors()
        return sum(c.log().sum() for c in self._corrections.values())

    def det(self) -> Tensor:
        self._ensure_factors()
        total = torch.ones((), dtype=self._dtype, device=self._device)
        for c in self._corrections.values():
            total = total * c.prod()
        return total

    def frobenius_norm(self) -> Tensor:
        self._ensure_factors()
        return sum(c.square().sum() for c in self._corrections.values()).sqrt()

    def _extra_state(self) -> dict:
        return {"corrections": {k: v.detach().clone() for k, v in self._corrections.items()}}

    def _check_extra_state(self, state_dict: dict) -> None:
        c = state_dict.get("corrections")
        if c is None or sorted(c) != sorted(self.block_names()):
            raise ValueError("state_dict has no eigenvalue corrections for this operator's blocks "
                             "(it comes from AttentionKFACLinearOperator, not AttentionEKFACLinearOperator?)")
        for b in self._blocks:
            if tuple(c[b.name].shape) != b.shape:
                raise ValueError(f"state_dict: corrections of {b.name} have shape {list(c[b.name].shape)}, "
                                 f"expected {list(b.shape)}")

    def _load_extra_state(self, state_dict: dict) -> None:
        self._corrections = {k: v.to(self._device, self._dtype).clone() for k, v in state_dict["corrections"].items()}


class KroneckerInverseLinearOperator(PyTorchLinearOperator):
    """The inverse of a damped (E)KFAC operator, block by block in the Kronecker eigenbases.

    ``damping``: the damping of each block (``{block name: value}``)."""

    SELF_ADJOINT = True

    def __init__(self, op: AttentionKFACLinearOperator, parts, damping: Dict[str, float]):
        shapes = [tuple(s) for s in op._in_shape]
        super().__init__(shapes, shapes)
        self._op, self._parts, self.damping = op, parts, dict(damping)

    @property
    def dtype(self):
        return self._op.dtype

    @property
    def device(self):
        return self._op.device

    def _matmat(self, M: List[Tensor]) -> List[Tensor]:
        self._op._check_M(M)
        return _blockwise(M, [(index, lambda X, Qo=Qo, Qi=Qi, inv=inv: Qo @ ((Qo.T @ X @ Qi) * inv) @ Qi.T)
                              for index, Qo, Qi, inv in self._parts])


def _blockwise(M: List[Tensor], parts) -> List[Tensor]:
    """Apply ``f(X [K, p, q]) -> [K, p, q]`` on the entries ``index [p, q]`` of the flat vector, for
    every ``(index, f)`` in ``parts`` (disjoint blocks; entries outside every block give 0)."""
    K = M[0].shape[-1]
    flat = torch.cat([m.reshape(-1, K) for m in M]).T  # [K, P]
    out = torch.zeros_like(flat)
    for index, f in parts:
        out[:, index] = f(flat[:, index])
    out = out.T
    return [o.reshape(m.shape) for o, m in zip(out.split([m.numel() // K for m in M]), M)]
