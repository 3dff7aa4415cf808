r"""Closed-form derivatives of the parameter-free attention core.

The core maps per-head queries, keys and values to the head outputs,

.. math::
    \mathbf T = \mathbf Q\mathbf K^\top / \sqrt{d_K},\qquad
    \mathbf A = \mathrm{softmax}_{\text{row}}(\mathbf T + \text{mask})
    \ (\text{or } \mathbf A = \mathbf T\odot\text{mask} \text{ for linear attention}),\qquad
    \mathbf O = \mathbf A\mathbf V .

Every function works on tensors with arbitrary leading dimensions ``[..., L, d]`` (typically
``[N, H, L, d]`` or ``[V, N, H, L, d]``) and is written in plain, twice-differentiable torch
ops. This is the single home of the attention core's derivatives: the module's autograd
function, the BackPACK extensions and the curvature operators all call these.

Masks are boolean ``allowed`` tensors broadcastable to ``[..., L, L]`` (``True`` = query ``i``
may attend to key ``j``), or ``None``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from backpack_attention.derivatives.variants import VARIANTS, AttentionVariant, get_variant  # noqa: F401 (AttentionVariant re-exported)

SOFTMAX = "softmax"
LINEAR = "linear"
#: Names of the registered attention variants (:mod:`~backpack_attention.derivatives.variants`).
ATTENTION_KINDS = tuple(VARIANTS)


def scores(Q: Tensor, K: Tensor) -> Tensor:
    r"""Scaled scores :math:`\mathbf T = \mathbf Q\mathbf K^\top/\sqrt{d_K}`, ``[..., L, L]``."""
    return Q @ K.transpose(-1, -2) / math.sqrt(Q.shape[-1])


def probabilities(T: Tensor, allowed: Optional[Tensor], kind=SOFTMAX) -> Tensor:
    r"""Attention matrix :math:`\mathbf A` from scores ``T`` ``[..., L, L]`` (``kind``: a variant or its name).

    Softmax: row-wise softmax over allowed keys (masked entries are exactly 0).
    Linear: the masked raw scores :math:`\mathbf T\odot\text{mask}`.
    """
    return get_variant(kind).probabilities(T, allowed)


def attention_matrix(Q: Tensor, K: Tensor, allowed: Optional[Tensor], kind=SOFTMAX) -> Tensor:
    """``A = probabilities(scores(Q, K))``, ``[..., L, L]``."""
    return get_variant(kind).probabilities(scores(Q, K), allowed)


def softmax_jvp(A: Tensor, dT: Tensor, kind=SOFTMAX, allowed: Optional[Tensor] = None) -> Tensor:
    r"""Apply the row-wise Jacobian :math:`\mathbf J_i` of the variant (softmax:
    :math:`\mathrm{diag}(\mathbf a_i) - \mathbf a_i\mathbf a_i^\top`; linear: the mask) to ``dT``
    ``[..., L, L]``. The Jacobian is symmetric, so this is also the VJP."""
    return get_variant(kind).jvp(A, dT, allowed)


def core_forward(Q: Tensor, K: Tensor, V: Tensor, allowed: Optional[Tensor], kind=SOFTMAX):
    """Reference (math) forward. Returns ``(O, A)`` with ``O = A V`` ``[..., L, d_v]``."""
    A = attention_matrix(Q, K, allowed, kind)
    return A @ V, A


# ---------------------------------------------------------------------------------------------
# cache-sized chunks of the L x L work
# ---------------------------------------------------------------------------------------------
#: Bytes of ``[..., L, L]`` intermediates the closed forms handle at once on the CPU. The products
#: below make 5-20 passes over L x L matrices; one chunk of this size stays in the CPU's L2 cache
#: across them, which makes long sequences several times faster than whole-tensor ops (memory
#: bound).
CHUNK_BYTES = 1 << 20

#: The same on accelerators, where small slices would only add kernel launches: chunks there only
#: bound the memory of the ``[..., L, L]`` intermediates.
ACCELERATOR_CHUNK_BYTES = 1 << 28


def chunk_bytes(device: torch.device) -> int:
    """Chunk size for :func:`chunked` on ``device`` (:data:`CHUNK_BYTES` on the CPU)."""
    return CHUNK_BYTES if device.type == "cpu" else ACCELERATOR_CHUNK_BYTES


def chunked(f, *args: Optional[Tensor], L: int):
    """Apply ``f(*args)`` on slices of the (broadcast) leading dimensions of ``args``.

    ``args`` are ``[..., rows, cols]`` tensors (or ``None``) whose leading dimensions broadcast;
    ``f`` returns a tuple of tensors with the broadcast leading dimensions. The leading
    dimensions are split so that one slice's ``[..., L, L]`` intermediates are about
    :func:`chunk_bytes` of the device; results are concatenated. Exact: every output entry is
    computed from the same inputs as without chunking.
    """
    present = [a for a in args if a is not None]
    batch = torch.broadcast_shapes(*(a.shape[:-2] for a in present))
    itemsize = present[0].element_size()
    budget = chunk_bytes(present[0].device)
    nb = len(batch)

    def rec(args, dim: int):
        rest = math.prod(batch[dim + 1:]) * L * L * itemsize
        if dim == nb or rest * batch[dim] <= budget:
            return f(*args)
        step = max(1, budget // rest)
        pos = dim - nb - 2  # the dimension, counted from the right
        outs = []
        for i in range(0, batch[dim], step):
            n = min(step, batch[dim] - i)
            sl = [a if a is None or a.dim() < -pos or a.shape[pos] == 1 else a.narrow(pos, i, n) for a in args]
            outs.append(rec(sl, dim + 1) if step == 1 else f(*sl))
        if len(outs) == 1:
            return outs[0]
        return tuple(torch.cat(o, dim=pos) for o in zip(*outs))

    return rec(list(args), 0)


def _cat_last(a: Tensor, b: Tensor) -> Tensor:
    """``cat([a, b], -1)`` after broadcasting the leading dimensions (vmap-safe)."""
    shape = torch.broadcast_shapes(a.shape[:-1], b.shape[:-1])
    return torch.cat([a.expand(*shape, a.shape[-1]), b.expand(*shape, b.shape[-1])], -1)


# ---------------------------------------------------------------------------------------------
# first- and second-order products of the core
# ---------------------------------------------------------------------------------------------
def core_jvp(Q, K, V, A, dQ, dK, dV, kind=SOFTMAX, allowed=None, O=None) -> Tensor:
    r"""Forward-mode product :math:`\mathrm d\mathbf O` of the core for tangents of Q, K, V.

    :math:`\mathrm d\mathbf T = (\mathrm d\mathbf Q\mathbf K^\top + \mathbf Q\,\mathrm d\mathbf K^\top)/\sqrt{d_K}`,
    :math:`\mathrm d\mathbf A = \mathbf J\,\mathrm d\mathbf T`,
    :math:`\mathrm d\mathbf O = \mathrm d\mathbf A\,\mathbf V + \mathbf A\,\mathrm d\mathbf V`.
    Any tangent may be ``None`` (zero); ``A`` may be ``None`` (recomputed chunk by chunk from
    ``Q, K``). Tangents may carry extra leading dimensions; they broadcast.

    With the core's output ``O = A V`` (softmax), the softmax Jacobian is applied without forming
    :math:`\mathrm d\mathbf A`: :math:`\mathrm d\mathbf A\,\mathbf V = (\mathbf A\odot\mathrm d\mathbf T)\mathbf V
    - \mathbf r\odot\mathbf O`, :math:`\mathbf r = \mathrm{rowsum}(\mathbf A\odot\mathrm d\mathbf T)`
    (fewer passes over L x L matrices).
    """
    if dQ is None and dK is None and dV is None:
        return torch.zeros_like(V if A is None else A @ V)
    variant = get_variant(kind)
    scale = 1.0 / math.sqrt(Q.shape[-1])
    use_O = O is not None and variant.output_rowsum

    def f(Q, K, V, A, dQ, dK, dV, allowed, O):
        if A is None:
            A = attention_matrix(Q, K, allowed, variant)
        dO = None
        if dQ is not None or dK is not None:
            if dQ is not None and dK is not None:
                dT = _cat_last(dQ * scale, Q * scale) @ _cat_last(K, dK).transpose(-1, -2)
            elif dQ is not None:
                dT = (dQ * scale) @ K.transpose(-1, -2)
            else:
                dT = (Q * scale) @ dK.transpose(-1, -2)
            if use_O:
                AdT = A * dT
                dO = AdT @ V - AdT.sum(-1, keepdim=True) * O
            else:
                dO = variant.jvp(A, dT, allowed) @ V
        if dV is not None:
            dO = A @ dV if dO is None else dO + A @ dV
        return (dO,)

    return chunked(f, Q, K, V, A, dQ, dK, dV, allowed, O if use_O else None, L=Q.shape[-2])[0]


def core_vjp(Q, K, V, A, dO, kind=SOFTMAX, allowed=None, O=None):
    r"""Reverse-mode product of the core: ``(G_Q, G_K, G_V)`` for an output cotangent ``dO``.

    :math:`\mathbf G_A = \mathbf G_O\mathbf V^\top`, :math:`\mathbf G_V = \mathbf A^\top\mathbf G_O`,
    :math:`\mathbf G_T = \mathbf J\,\mathbf G_A`, :math:`\mathbf G_Q = \mathbf G_T\mathbf K/\sqrt{d_K}`,
    :math:`\mathbf G_K = \mathbf G_T^\top\mathbf Q/\sqrt{d_K}`.
    ``dO`` may carry extra leading dimensions (e.g. ``[C, N, H, L, d_v]``); they broadcast.
    ``A`` may be ``None`` (recomputed chunk by chunk from ``Q, K``: no ``[..., L, L]`` tensor
    is ever materialised whole).

    With the core's output ``O = A V`` (softmax), the row sums of the softmax Jacobian come from
    ``O`` as in flash attention's backward: :math:`\mathbf G_T = \mathbf A\odot(\mathbf G_A - \boldsymbol\rho)`,
    :math:`\boldsymbol\rho = \mathrm{rowsum}(\mathbf G_O\odot\mathbf O)` (an ``[..., L, d]`` reduction
    instead of an ``[..., L, L]`` one).
    """
    variant = get_variant(kind)
    scale = 1.0 / math.sqrt(Q.shape[-1])
    use_O = O is not None and variant.output_rowsum

    def f(Q, K, V, A, dO, allowed, O):
        if A is None:
            A = attention_matrix(Q, K, allowed, variant)
        G_V = A.transpose(-1, -2) @ dO
        dO = dO * scale
        G_A = dO @ V.transpose(-1, -2)
        if use_O:
            G_T = (G_A - (dO * O).sum(-1, keepdim=True)) * A
        else:
            G_T = variant.jvp(A, G_A, allowed)
        return G_T @ K, G_T.transpose(-1, -2) @ Q, G_V

    return chunked(f, Q, K, V, A, dO, allowed, O if use_O else None, L=Q.shape[-2])


def core_hvp(Q, K, V, A, G_O, dQ, dK, dV, kind=SOFTMAX, allowed=None, O=None):
    r"""Second-order product of the core for a fixed output cotangent ``G_O``.

    The core's VJP :math:`(\mathbf G_Q, \mathbf G_K, \mathbf G_V) = \nabla_{Q,K,V}\langle\mathbf G_O,
    \mathbf O\rangle` is differentiated along ``(dQ, dK, dV)`` at fixed ``G_O``: returns
    ``(dG_Q, dG_K, dG_V, dO)``, the first three the Hessian of :math:`\langle\mathbf G_O,
    \mathbf O(\mathbf Q, \mathbf K, \mathbf V)\rangle` applied to the tangent (symmetric, so also the
    transposed product) and ``dO`` the core's output tangent (= :func:`core_jvp`, sharing
    :math:`\mathrm d\mathbf A`). With :math:`s = 1/\sqrt{d_K}`,
    :math:`\mathbf G_A = \mathbf G_O\mathbf V^\top`, :math:`\boldsymbol\rho = \mathrm{rowsum}(\mathbf A\odot\mathbf G_A)`,
    :math:`\mathbf G_T = s\,\mathbf J\mathbf G_A`, :math:`\mathrm d\mathbf A = \mathbf J\,\mathrm d\mathbf T`:

    * :math:`\mathrm d\mathbf G_V = \mathrm d\mathbf A^\top\mathbf G_O`
    * softmax: :math:`\mathrm d\mathbf G_T = s[\mathbf S - \mathrm d\mathbf A\odot\boldsymbol\rho
      - \mathbf A\odot\mathrm{rowsum}(\mathbf S)]`,
      :math:`\mathbf S = \mathrm d\mathbf A\odot\mathbf G_A + \mathbf A\odot(\mathbf G_O\,\mathrm d\mathbf V^\top)`;
      linear: :math:`s\,(\mathbf G_O\,\mathrm d\mathbf V^\top)\odot\text{mask}`
    * :math:`\mathrm d\mathbf G_Q = \mathrm d\mathbf G_T\mathbf K + \mathbf G_T\,\mathrm d\mathbf K`,
      :math:`\mathrm d\mathbf G_K = \mathrm d\mathbf G_T^\top\mathbf Q + \mathbf G_T^\top\mathrm d\mathbf Q`.

    ``G_A``, ``rho`` and ``G_T`` are recomputed chunk by chunk (cheaper than reading them back
    from memory for long sequences). ``None`` tangents are zero. With the core's output
    ``O = A V`` (softmax), :math:`\boldsymbol\rho = \mathrm{rowsum}(\mathbf G_O\odot\mathbf O)`
    (as in :func:`core_vjp`: an ``[..., L, d]`` reduction instead of an ``[..., L, L]`` one).
    """
    variant = get_variant(kind)
    scale = 1.0 / math.sqrt(Q.shape[-1])
    use_O = O is not None and variant.output_rowsum

    def f(Q, K, V, A, G_O, dQ, dK, dV, allowed, O):
        if A is None:
            A = attention_matrix(Q, K, allowed, variant)
        zero = torch.zeros((), dtype=Q.dtype, device=Q.device)
        dQ_ = zero.expand_as(Q) if dQ is None else dQ
        dK_ = zero.expand_as(K) if dK is None else dK
        dV_ = zero.expand_as(V) if dV is None else dV
        G_A = G_O @ V.transpose(-1, -2)
        dT = _cat_last(dQ_, Q) @ _cat_last(K, dK_).transpose(-1, -2)
        dT.mul_(scale)
        dG_A = G_O @ dV_.transpose(-1, -2)
        rho = None
        if use_O:  # rowsum(A * G_A) from the core output: an [..., L, d] reduction
            rho = (G_O * O).sum(-1, keepdim=True)
            G_T = (G_A - rho).mul_(A).mul_(scale)
        elif variant.output_rowsum:
            AG = A * G_A
            rho = AG.sum(-1, keepdim=True)
            G_T = (AG - A * rho).mul_(scale)
        else:
            G_T = variant.jvp(A, G_A, allowed) * scale
        dA = variant.jvp(A, dT, allowed)
        dG_T = variant.second_order(A, dA, G_A, dG_A, rho, allowed)
        dG_T = dG_T * scale
        dG_V = dA.transpose(-1, -2) @ G_O
        dG_Q = dG_T @ K + G_T @ dK_
        dG_K = dG_T.transpose(-1, -2) @ Q + G_T.transpose(-1, -2) @ dQ_
        dO = dA @ V + A @ dV_
        return dG_Q, dG_K, dG_V, dO

    return chunked(f, Q, K, V, A, G_O, dQ, dK, dV, allowed, O if use_O else None, L=Q.shape[-2])
