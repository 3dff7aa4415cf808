"""BackPACK derivatives of ``nn.Embedding`` (BackPACK's, fixed for ``float64``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from backpack.core.derivatives.embedding import EmbeddingDerivatives as _BPEmbeddingDerivatives
from backpack.utils.subsampling import subsample


class EmbeddingDerivatives(_BPEmbeddingDerivatives):
    """BackPACK's ``nn.Embedding`` derivatives, with the weight Jacobian in the weight's dtype.

    BackPACK 1.7.1 builds the one-hot indicator in ``float32`` and fails for ``float64`` models.
    """

    def _weight_jac_t_mat_prod(self, module, g_inp, g_out, mat, sum_batch=True, subsampling=None):
        """``[V, N, *, D] -> [V, (N,) K, D]``: scatter ``mat`` into the rows of the used tokens."""
        self._check_parameters(module)
        idx = subsample(module.input0, subsampling=subsampling)
        onehot = F.one_hot(idx, module.num_embeddings).to(mat.dtype)
        return torch.einsum(f"n...s,vn...h->v{'' if sum_batch else 'n'}sh", onehot, mat)
