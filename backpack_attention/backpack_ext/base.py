"""Small building blocks shared by the module extensions."""

from __future__ import annotations

from backpack.extensions.module_extension import ModuleExtension

from backpack_attention.backpack_ext.derivatives import clear_module_cache


class ClearsAttentionCache:
    """Mixin: drop the attention forward/cotangent cache once the module extension has run.

    :class:`~backpack_attention.backpack_ext.derivatives.MHSADerivatives` caches the recomputed forward (Q, K, V, A, Z) and the core
    cotangents on the module while BackPACK calls its parameter methods and ``backpropagate``
    on the same quantity; this mixin frees that memory right after.
    """

    def __call__(self, extension, module, g_inp, g_out):
        try:
            super().__call__(extension, module, g_inp, g_out)
        finally:
            clear_module_cache(module)


class Unsupported(ModuleExtension):
    """Module extension that refuses to run: raises ``NotImplementedError`` naming both sides.

    Args:
        reason: why, and what to use instead (appended to the message).
    """

    def __init__(self, reason: str = ""):
        self.reason = reason
        super().__init__()

    def __call__(self, extension, module, g_inp, g_out):
        raise NotImplementedError(
            f"BackPACK extension {type(extension).__name__} is not supported for module "
            f"{type(module).__name__}" + (f": {self.reason}" if self.reason else "")
        )
