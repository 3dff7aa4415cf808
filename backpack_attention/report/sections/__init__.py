"""The built-in sections of ``backpack-attention report``, one module per section or group.

Importing this package registers them; the report shows them by their ``order``:

* ``model`` (10), ``attention_params`` (20): :mod:`.summary`, model summary and parameters per block;
* ``gradient_norms`` (30): :mod:`.gradients`, gradient norms per block, layer and head;
* ``hessian_blocks`` (40): :mod:`.hessian`, closed-form Hessian block norms and a heat map;
* ``growth`` (45): :mod:`.growth`, the paper's block heterogeneity and growth exponents;
* ``phases`` (47): :mod:`.phases`, a short training run: the Q/K-vs-V GGN ratio and the Q/K
  functional-to-GGN ratio over the steps (the two phases of the co-occurrence example);
* ``kfac`` (50): :mod:`.kfac`, KFAC and EKFAC errors against the exact GGN per block and head;
* ``spectra`` (60): :mod:`.spectra`, extreme eigenvalues per block.
"""

from backpack_attention.report.sections import gradients, growth, hessian, kfac, phases, spectra, summary  # noqa: F401
