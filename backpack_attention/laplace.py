"""laplace-torch backends built on this package's operators (optional: needs ``laplace-torch``).

laplace-torch fits Laplace approximations from a curvature backend. Its curvlinops backends run
curvlinops' generic GGN/Hessian operators, which fail on attention with PyTorch's fused kernels
and are slow on it otherwise; its BackPACK backends build stock BackPACK extensions, which do not
know attention, LayerNorm or residual connections. These backends plug this package's operators
into laplace-torch's curvlinops interface::

    from laplace import Laplace
    from backpack_attention.laplace import AttentionGGN

    model = ba.convert_attention(model)        # nn.MultiheadAttention -> closed-form attention
    la = Laplace(model, "classification", subset_of_weights="all",
                 hessian_structure="full", backend=AttentionGGN)
    la.fit(train_loader)

* ``hessian_structure="full"``: the exact GGN (:class:`AttentionGGN`) or Hessian
  (:class:`AttentionHessian`) of all parameters, from :class:`~backpack_attention.AttentionGGNLinearOperator`
  / :class:`~backpack_attention.AttentionHessianLinearOperator` (no fused-kernel failure, LayerNorm
  rows right).
* ``"diag"``: laplace-torch's own exact GGN diagonal from per-sample Jacobians (``torch.func``), which
  runs through the converted attention's closed-form derivatives.
* ``"kron"`` (:class:`AttentionGGN` only): laplace-torch's ``Kron`` holds one Kronecker product per
  parameter tensor. Attention and ``nn.Linear`` parameters get the **generic** KFAC of
  :class:`~backpack_attention.AttentionKFACLinearOperator` with ``kfac_approx="expand"`` (default) or
  ``"reduce"``: the KFAC laplace-torch's own curvlinops backend computes for the same network with
  ``nn.Linear`` q/k/v/o projections. The q/k/v blocks of the packed ``in_proj_weight`` share their
  input factor, so they form one Kronecker product whose output factor is block-diagonal
  (``blockdiag(G_Q, G_K, G_V) ⊗ A``). The attention-aware recipe (``kfac_approx="attention"``, per-head
  K/V blocks with their own input factors) is a sum of Kronecker products that ``Kron`` cannot hold,
  and is refused. Other one-dimensional parameters (LayerNorm's weight and bias) get their exact GGN
  block (a single dense factor, from per-sample Jacobians as laplace-torch's ``full``); other
  parameters (embeddings, convolutions) are refused, naming them.
"""

from __future__ import annotations

from collections.abc import MutableMapping

try:
    from laplace.curvature.curvlinops import CurvlinopsGGN, CurvlinopsHessian
    from laplace.utils import Kron
except ImportError as err:  # pragma: no cover - optional dependency
    raise ImportError(
        "backpack_attention.laplace needs laplace-torch: pip install 'backpack-attention[laplace]'"
    ) from err

import torch
from torch import nn

from backpack_attention.module import MultiheadSelfAttention
from backpack_attention.operators import (
    AttentionGGNLinearOperator,
    AttentionHessianLinearOperator,
    AttentionKFACLinearOperator,
)

__all__ = ["AttentionGGN", "AttentionHessian"]

#: ``kfac_approx`` values whose blocks laplace-torch's ``Kron`` can hold.
KRON_APPROXIMATIONS = ("expand", "reduce")


def _kfac_param_ids(model: nn.Module) -> set:
    """Ids of the parameters KFAC covers: those of ``MultiheadSelfAttention`` and ``nn.Linear``
    modules (not the ``out_proj`` inside an unconverted ``nn.MultiheadAttention``)."""
    inside = {id(m) for mha in model.modules() if isinstance(mha, nn.MultiheadAttention) for m in mha.modules()}
    ids = set()
    for m in model.modules():
        if isinstance(m, MultiheadSelfAttention) or (isinstance(m, nn.Linear) and id(m) not in inside):
            ids.update(id(p) for p in m.parameters(recurse=False))
    return ids


def _kron_entry(blocks, start: int, shape) -> list:
    """laplace-torch's factors of one parameter (row-major, entries ``start + arange``) from the
    operator's Kronecker blocks on it: ``[out, in]`` for a matrix, ``[block]`` for a vector."""
    blocks = sorted(blocks, key=lambda b: int(b.index.min()))
    index = torch.cat([b.index for b in blocks], 0)
    numel = int(torch.tensor(shape).prod())
    expected = start + torch.arange(numel).view(shape[0], -1)
    if index.shape != expected.shape or not torch.equal(index, expected):
        raise RuntimeError("the KFAC blocks of a parameter do not tile its rows; laplace-torch's Kron cannot hold them")
    outs = [b.out_factor for b in blocks]
    if len(shape) == 1:
        return [torch.block_diag(*[o * b.in_factor.reshape(()) for o, b in zip(outs, blocks)])]
    A = blocks[0].in_factor
    if not all(torch.equal(b.in_factor, A) for b in blocks[1:]):
        raise RuntimeError("the KFAC blocks of a parameter have different input factors; laplace-torch's Kron "
                           "cannot hold their sum")
    return [torch.block_diag(*outs), A]


class AttentionGGN(CurvlinopsGGN):
    """laplace-torch GGN backend on this package's operators: ``full`` from
    :class:`~backpack_attention.AttentionGGNLinearOperator`, ``kron`` from
    :class:`~backpack_attention.AttentionKFACLinearOperator` (generic KFAC, module doc)."""

    def __init__(self, *args, stochastic: bool = False, **kwargs):
        if stochastic:
            raise ValueError("AttentionGGN: stochastic=True (Monte-Carlo Fisher) is not supported; use the exact GGN")
        super().__init__(*args, stochastic=False, **kwargs)

    @property
    def _linop_context(self):
        return AttentionGGNLinearOperator

    def kron(self, x, y, N: int, **kwargs):
        """``(factor * loss, Kron)`` of one batch, in laplace-torch's conventions (as its curvlinops
        backend: type-2 KFAC of ``lossfunc``, input factors rescaled by ``len(y) / N``).

        ``kwargs``: ``kfac_approx`` (``"expand"`` or ``"reduce"``; laplace-torch passes its
        ``asdl_fisher_kwargs`` here). Raises ``ValueError`` before any work for another
        ``kfac_approx`` or parameters that are neither attention, ``nn.Linear``, nor one-dimensional.
        """
        kfac_approx = kwargs.pop("kfac_approx", "expand")
        if kwargs:
            raise TypeError(f"AttentionGGN.kron: unexpected arguments {sorted(kwargs)} (accepted: kfac_approx)")
        if kfac_approx not in KRON_APPROXIMATIONS:
            extra = ""
            if isinstance(kfac_approx, str) and kfac_approx.startswith("attention"):
                extra = (" The attention-aware recipe gives K and V one Kronecker product per head, each with its "
                         "own input factor: a sum of Kronecker products per in_proj_weight, which laplace-torch's "
                         "Kron cannot hold (use AttentionKFACLinearOperator directly for it).")
            raise ValueError(f"AttentionGGN.kron: kfac_approx must be one of {KRON_APPROXIMATIONS}, got "
                             f"{kfac_approx!r}.{extra}")
        covered = _kfac_param_ids(self.model)
        names = {id(p): n for n, p in self.params_dict.items()}
        dense = [p for p in self.params if id(p) not in covered]
        bad = [f"{names.get(id(p), '?')} {list(p.shape)}" for p in dense if p.dim() != 1]
        if bad:
            hint = ""
            if any(isinstance(m, nn.MultiheadAttention) for m in self.model.modules()):
                hint = " For nn.MultiheadAttention, call backpack_attention.convert_attention(model) first."
            raise ValueError(
                f"AttentionGGN.kron: parameters {bad} belong to neither attention nor nn.Linear and are not "
                "vectors: they have no Kronecker factors here. Use hessian_structure='diag' or 'full' (exact "
                "GGN), or exclude them (requires_grad=False / subset_of_weights)." + hint
            )
        kfac = [p for p in self.params if id(p) in covered]

        entries = {}
        if kfac:
            batch_kw = {}
            if isinstance(x, (dict, MutableMapping)):
                batch_kw["batch_size_fn"] = lambda x: x[self.dict_key_x].shape[0]
            op = AttentionKFACLinearOperator(self.model, self.lossfunc, kfac, [(x, y)], kfac_approx=kfac_approx,
                                             fisher_type="type-2", separate_weight_and_bias=True,
                                             check_deterministic=False, **batch_kw)
            blocks = op.blocks()
            start, spans = 0, []
            for p in kfac:
                spans.append((start, start + p.numel()))
                start += p.numel()
            mins = [int(b.index.min()) for b in blocks]
            factors = []
            for p, (a, b) in zip(kfac, spans):
                factors.append(_kron_entry([bl for bl, m in zip(blocks, mins) if a <= m < b], a, tuple(p.shape)))
            kron = self._rescale_kron_factors(Kron(factors), len(y), N)
            kron *= self.factor
            entries.update({id(p): F for p, F in zip(kfac, kron.kfacs)})
        if dense:
            entries.update(self._dense_ggn_blocks(x, dense))
        loss = self.lossfunc(self.model(x), y)
        return self.factor * loss.detach(), Kron([entries[id(p)] for p in self.params])

    def _dense_ggn_blocks(self, x, params) -> dict:
        """``{id(p): [exact GGN block of p]}`` in laplace-torch's scale (as its ``full``)."""
        names = {id(p): n for n, p in self.params_dict.items()}
        sub = {names[id(p)]: p for p in params}

        def model_fn(sub_params):
            out = torch.func.functional_call(self.model, ({**self.params_dict, **sub_params}, self.buffers_dict), x)
            return out, out

        Js, f = torch.func.jacrev(model_fn, has_aux=True)(sub)
        H_lik = self._get_functional_hessian(f.detach())
        out = {}
        for n, J in Js.items():
            J = J.detach().reshape(f.shape[0], f.shape[1], -1)
            H = torch.einsum("bcp,bck,bkq->pq", J, H_lik, J) if H_lik is not None else torch.einsum("bcp,bcq->pq", J, J)
            out[id(sub[n])] = [H]
        return out


class AttentionHessian(CurvlinopsHessian):
    """laplace-torch Hessian backend on :class:`~backpack_attention.AttentionHessianLinearOperator`."""

    @property
    def _linop_context(self):
        return AttentionHessianLinearOperator

    def kron(self, x, y, N, **kwargs):
        raise NotImplementedError(
            "AttentionHessian: hessian_structure='kron' is not available: KFAC approximates the GGN/Fisher, not the "
            "Hessian. Use backend=AttentionGGN for 'kron', or hessian_structure='full' or 'diag' for the Hessian"
        )
