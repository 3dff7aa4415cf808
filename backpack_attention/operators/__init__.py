r"""curvlinops linear operators for the GGN and Hessian of models with attention.

:class:`AttentionGGNLinearOperator` and :class:`AttentionHessianLinearOperator` take the same
arguments as curvlinops 3.x ``GGNLinearOperator`` / ``HessianLinearOperator`` and represent the
same matrices, restricted to ``params``: any parameters of the model, in any order (attention
layers, several of them, any subset, and the rest of the network: MLPs, LayerNorms, embeddings,
read-outs), with exact cross terms, so they are drop-in replacements for curvlinops' operators on
models with attention. They are curvlinops ``PyTorchLinearOperator`` s, so ``@``, ``.to_scipy()``
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
GGN's double-VJP pass) unless their own parameters are selected. Everything is differentiated in
reverse mode only (double VJPs), which is right through ``layer_norm`` where torch's
forward-over-reverse (``torch.func.hessian``, curvlinops' ``HessianLinearOperator``) is wrong in
torch 2.13/2.14. The forward graph is kept; the rest of the network (projections, MLPs,
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

from backpack_attention.operators.base import AttentionCurvatureLinearOperator
from backpack_attention.operators.ggn import AttentionGGNLinearOperator
from backpack_attention.operators.hessian import PARTS, AttentionHessianLinearOperator
from backpack_attention.operators.kfac import AttentionEKFACLinearOperator, AttentionKFACLinearOperator

__all__ = [
    "AttentionCurvatureLinearOperator",
    "AttentionGGNLinearOperator",
    "AttentionHessianLinearOperator",
    "PARTS",
    "AttentionKFACLinearOperator",
    "AttentionEKFACLinearOperator",
]
