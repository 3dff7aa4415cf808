"""Extension classes and the registration of all module extensions.

:func:`register` adds, to one BackPACK extension instance, the module extensions for
:class:`~backpack_attention.MultiheadSelfAttention`, ``nn.LayerNorm``, ``nn.GELU``, 3-D
``nn.Linear`` (KFAC/KFLR), ``nn.Embedding`` (KFAC/KFLR, DiagHessian), ``Permute`` /
``SumModule`` / ``Identity`` where BackPACK lacks them, and ``nn.MSELoss`` on ``[N, *, C]``.
Extensions that cannot handle a module get an entry raising ``NotImplementedError`` that
names the module and the extension.
"""

from __future__ import annotations

from backpack import extensions as bpext
from backpack.custom_module.branching import SumModule
from backpack.custom_module.permute import Permute
from backpack.custom_module.scale_module import ScaleModule
from backpack.extensions.secondorder.diag_ggn import losses as diag_ggn_losses
from backpack.extensions.secondorder.hbp import losses as hbp_losses
from backpack.extensions.secondorder.diag_hessian import losses as diag_h_losses
from backpack.extensions.secondorder.sqrt_ggn import losses as sqrt_ggn_losses
from torch import nn

from backpack_attention.backpack_ext import firstorder, ggn, hessian, kfac
from backpack_attention.backpack_ext.base import Unsupported
from backpack_attention.backpack_ext.encoder import register_readouts
from backpack_attention.backpack_ext.derivatives import (
    IgnoreIndexCrossEntropyLossDerivatives,
    SequenceMSELossDerivatives,
)
from backpack_attention.module import MultiheadSelfAttention


# --------------------------------------------------------------------------------------
# Extension classes that differ from BackPACK's
# --------------------------------------------------------------------------------------
class KFAC(bpext.KFAC):
    """BackPACK's KFAC plus ``kfac_approx`` (``"expand"``, ``"reduce"`` for weight sharing, or
    ``"attention"``: attention-aware factors for attention layers, expand elsewhere)."""

    def __init__(self, mc_samples: int = 1, kfac_approx: str = "expand"):
        kfac.check_kfac_approx(kfac_approx)
        self.kfac_approx = kfac_approx
        super().__init__(mc_samples=mc_samples)


class KFLR(bpext.KFLR):
    """BackPACK's KFLR plus ``kfac_approx`` and a sum rule at branch points (residual blocks)."""

    def __init__(self, kfac_approx: str = "expand"):
        kfac.check_kfac_approx(kfac_approx)
        self.kfac_approx = kfac_approx
        super().__init__()

    def accumulate_backpropagated_quantities(self, existing, other):
        return existing + other


class _MergesFactors:
    """DiagHessian variants that support branching (see :mod:`.hessian`)."""

    def accumulate_backpropagated_quantities(self, existing, other):
        return hessian.merge_factors(existing, other)


class DiagHessian(_MergesFactors, bpext.DiagHessian):
    """BackPACK's DiagHessian, extended to transformers and residual connections (small models)."""


class BatchDiagHessian(_MergesFactors, bpext.BatchDiagHessian):
    """BackPACK's BatchDiagHessian, extended to transformers and residual connections (small models)."""


# --------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------
def _set(ext, table: dict) -> None:
    for cls, module_ext in table.items():
        ext.set_module_extension(cls, module_ext, overwrite=True)


def _unsupported(ext, classes, reason: str) -> None:
    _set(ext, {cls: Unsupported(reason) for cls in classes})


def _register_first_order(ext) -> None:
    table = {
        bpext.BatchGrad: (firstorder.BatchGradMHSA, firstorder.BatchGradLayerNorm),
        bpext.BatchL2Grad: (firstorder.BatchL2GradMHSA, firstorder.BatchL2GradLayerNorm),
        bpext.SumGradSquared: (firstorder.SGSMHSA, firstorder.SGSLayerNorm),
        bpext.Variance: (firstorder.VarianceMHSA, firstorder.VarianceLayerNorm),
    }
    for cls, (mhsa, ln) in table.items():
        if isinstance(ext, cls):
            emb = firstorder.embedding_extensions()[cls.__name__]
            _set(ext, {MultiheadSelfAttention: mhsa(), nn.LayerNorm: ln(), nn.Embedding: emb})
            return
    raise TypeError(f"no first-order registration for {type(ext).__name__}")


def _sequence_mse(loss_ext):
    loss_ext.derivatives = SequenceMSELossDerivatives()
    return loss_ext


def _masked_ce(loss_ext):
    loss_ext.derivatives = IgnoreIndexCrossEntropyLossDerivatives()
    return loss_ext


def _register_diag_ggn(ext, sum_batch: bool) -> None:
    _set(ext, {
        MultiheadSelfAttention: ggn.DiagGGNMHSA(sum_batch=sum_batch),
        nn.Linear: ggn.DiagGGNLinearShared(sum_batch=sum_batch),
        nn.LayerNorm: ggn.DiagGGNLayerNorm(sum_batch=sum_batch),
        nn.GELU: ggn.DiagGGNGELU(),
        nn.Embedding: ggn.DiagGGNEmbedding(sum_batch=sum_batch),
        nn.MSELoss: _sequence_mse(diag_ggn_losses.DiagGGNMSELoss()),
        nn.CrossEntropyLoss: _masked_ce(diag_ggn_losses.DiagGGNCrossEntropyLoss()),
    })


def _register_sqrt_ggn(ext) -> None:
    _set(ext, {
        MultiheadSelfAttention: ggn.SqrtGGNMHSA(),
        nn.LayerNorm: ggn.SqrtGGNLayerNorm(),
        nn.GELU: ggn.SqrtGGNGELU(),
        Permute: ggn.SqrtGGNPermute(),
        nn.Embedding: ggn.SqrtGGNEmbedding(),
        nn.MSELoss: _sequence_mse(sqrt_ggn_losses.SqrtGGNMSELoss()),
        nn.CrossEntropyLoss: _masked_ce(sqrt_ggn_losses.SqrtGGNCrossEntropyLoss()),
    })


def _register_hbp(ext) -> None:
    if isinstance(ext, bpext.KFRA):
        _unsupported(ext, (MultiheadSelfAttention, nn.LayerNorm, nn.GELU, nn.Embedding, Permute),
                     "KFRA's batch-averaged backpropagation is not implemented; use KFAC or KFLR")
        return
    _set(ext, {
        nn.Linear: kfac.HBPLinearShared(),
        MultiheadSelfAttention: kfac.HBPMHSA(),
        nn.LayerNorm: kfac.HBPLayerNorm(),
        nn.GELU: kfac.HBPGELU(),
        nn.Embedding: kfac.HBPEmbedding(),
        Permute: kfac.HBPPermute(),
        nn.MSELoss: _sequence_mse(hbp_losses.HBPMSELoss()),
        nn.CrossEntropyLoss: _masked_ce(hbp_losses.HBPCrossEntropyLoss()),
    })


def _register_diag_hessian(ext, sum_batch: bool) -> None:
    stock = dict(ext._BackpropExtension__module_extensions)
    stock[nn.MSELoss] = _sequence_mse(diag_h_losses.DiagHMSELoss())
    stock[nn.CrossEntropyLoss] = _masked_ce(diag_h_losses.DiagHCrossEntropyLoss())
    stock.update({
        MultiheadSelfAttention: hessian.DiagHMHSA(sum_batch=sum_batch),
        nn.LayerNorm: hessian.DiagHLayerNorm(sum_batch=sum_batch),
        nn.GELU: hessian.DiagHGELU(),
        nn.Embedding: hessian.DiagHEmbedding(sum_batch=sum_batch),
        SumModule: hessian.DiagHSumModule(),
        ScaleModule: hessian.DiagHScaleModule(),
        nn.Identity: hessian.DiagHScaleModule(),
        Permute: hessian.DiagHPermute(),
    })
    _set(ext, {cls: hessian.Tagged(m) for cls, m in stock.items()})


def _register_curvature_products(ext) -> None:
    _unsupported(ext, (MultiheadSelfAttention, nn.LayerNorm, nn.GELU),
                 "curvature-matrix products are not implemented for it; use "
                 "backpack_attention's curvature operators (AttentionGGNLinearOperator, "
                 "AttentionHessianLinearOperator) instead")


def _name_extension_in_errors(ext) -> None:
    """Make "no module extension" errors name the extension class, not only its savefield."""
    lookup = ext._BackpropExtension__get_module_extension
    if getattr(lookup, "_bpa_named", False):
        return

    def named_lookup(module):
        try:
            return lookup(module)
        except NotImplementedError as e:
            raise NotImplementedError(
                f"BackPACK extension {type(ext).__name__} does not support module "
                f"{type(module).__name__} ({e})"
            ) from None

    named_lookup._bpa_named = True
    ext._BackpropExtension__get_module_extension = named_lookup


def register(ext):
    """Register every ``backpack_attention`` module extension on BackPACK extension ``ext``.

    Returns ``ext``. Raises ``TypeError`` for an object that is not a BackPACK extension.
    """
    if isinstance(ext, (bpext.BatchGrad, bpext.BatchL2Grad, bpext.SumGradSquared, bpext.Variance)):
        _register_first_order(ext)
    elif isinstance(ext, (bpext.DiagGGNExact, bpext.DiagGGNMC)):
        _register_diag_ggn(ext, sum_batch=True)
    elif isinstance(ext, (bpext.BatchDiagGGNExact, bpext.BatchDiagGGNMC)):
        _register_diag_ggn(ext, sum_batch=False)
    elif isinstance(ext, (bpext.SqrtGGNExact, bpext.SqrtGGNMC)):
        _register_sqrt_ggn(ext)
    elif isinstance(ext, (bpext.KFAC, bpext.KFLR, bpext.KFRA)):
        _register_hbp(ext)
    elif isinstance(ext, bpext.BatchDiagHessian):
        _register_diag_hessian(ext, sum_batch=False)
    elif isinstance(ext, bpext.DiagHessian):
        _register_diag_hessian(ext, sum_batch=True)
    elif isinstance(ext, (bpext.HMP, bpext.GGNMP, bpext.PCHMP)):
        _register_curvature_products(ext)
    elif isinstance(ext, bpext.backprop_extension.BackpropExtension):
        raise TypeError(f"backpack_attention has no registration for extension {type(ext).__name__}")
    else:
        raise TypeError(f"ext must be a BackPACK extension instance, got {type(ext).__name__}")
    register_readouts(ext)  # TokenMean, Slicing (readouts of encoder models)
    _name_extension_in_errors(ext)
    return ext
