"""HuggingFace ``transformers`` attention (GPT-2, BERT-style, ViT, ...): recognise, check, switch to SDPA.

Recognised modules: those of a class defined in ``transformers.models`` whose methods dispatch
through ``ALL_ATTENTION_FUNCTIONS`` (transformers' attention interface) or call
``scaled_dot_product_attention`` themselves (older releases' ``*SdpaAttention`` classes), such as
``GPT2Attention`` (``Conv1D`` ``c_attn``), ``BertSelfAttention`` (``query``/``key``/``value``
Linears) and ``ViTAttention``. Their projections, reshapes and masks stay HuggingFace's code; only
the attention core changes:

* every ``PreTrainedModel`` in the model is switched to the ``"sdpa"`` attention implementation
  (``set_attn_implementation("sdpa")``; numerically the same function as ``"eager"``), so the
  core is one call of ``F.scaled_dot_product_attention``, which is then routed to the package's
  drop-in (:mod:`backpack_attention.adapters.patch`). transformers builds boolean masks for SDPA
  (padding, causal, both; fully padded query rows give 0, as torch's math kernel);
* refused at conversion, naming the module: cross-attention modules, rotary position embeddings
  (a ``position_embeddings`` argument or a rotary attribute), grouped-query attention
  (``num_key_value_groups > 1``), attention dropout > 0 in training mode, models that do not
  support SDPA;
* refused at a call: a head mask, encoder hidden states (cross-attention call), a KV cache that
  holds past keys (more keys than queries), dropout in training mode, additive biases (ALiBi, T5).

transformers is never imported here: modules are recognised by their class's package and code.
"""

from __future__ import annotations

from typing import List

from torch import nn

from backpack_attention.adapters._common import (
    Candidate,
    call_argument,
    class_code_names,
    dropout_probability,
    dropout_refusal,
    forward_parameters,
    from_package,
)
from backpack_attention.adapters.patch import _caller

PACKAGE = "transformers"
#: Per-call arguments whose presence makes a call inexact or cross-attention.
REFUSED_CALL_ARGUMENTS = {
    "head_mask": "a head mask",
    "layer_head_mask": "a head mask",
    "encoder_hidden_states": "encoder hidden states (cross-attention)",
    "key_value_states": "key/value states (cross-attention)",
}


def is_hf_attention(module: nn.Module) -> bool:
    """A transformers attention module: its model code calls the attention interface
    (``ALL_ATTENTION_FUNCTIONS``); models (``PreTrainedModel``, which refer to it to check
    implementations) are not attention modules."""
    if not (from_package(module, PACKAGE) and hasattr(module, "config")
            and not callable(getattr(module, "set_attn_implementation", None))):
        return False
    names = class_code_names(type(module), PACKAGE + ".models.")
    # transformers < 4.48 wrote SDPA classes by hand (e.g. BertSdpaSelfAttention)
    return "ALL_ATTENTION_FUNCTIONS" in names or "scaled_dot_product_attention" in names


def check_call(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Refuse a call with a head mask or cross-attention inputs (run before each forward)."""
    bad = call_argument(module, args, kwargs, REFUSED_CALL_ARGUMENTS)
    if bad:
        what = sorted({REFUSED_CALL_ARGUMENTS[n] for n in bad})
        raise ValueError(f"{_caller(module)}: called with {', '.join(what)} ({', '.join(sorted(bad))}); "
                         "the converted attention supports self-attention without head masks only")


def _refusals(module: nn.Module) -> List[str]:
    out = []
    cls = type(module).__name__
    if getattr(module, "is_cross_attention", False) or "Cross" in cls or hasattr(module, "q_attn"):
        out.append("cross-attention is not supported (self-attention only)")
    rotary = "position_embeddings" in forward_parameters(module) or any(
        "rotary" in n.lower() or "rope" == n.lower() for n in list(vars(module)) + [c for c, _ in module.named_children()])
    if rotary:
        out.append("rotary position embeddings are not supported yet")
    groups = getattr(module, "num_key_value_groups", 1)
    if isinstance(groups, int) and groups > 1:
        out.append(f"grouped-query attention ({groups} query heads per key/value head) is not supported yet")
    out += dropout_refusal(module, dropout_probability(module, "attn_dropout", "dropout", "attention_dropout"))
    return out


def _pretrained_models(model: nn.Module):
    """The ``PreTrainedModel``s in ``model`` (outermost first): modules with ``set_attn_implementation``."""
    return [(n, m) for n, m in model.named_modules()
            if from_package(m, PACKAGE) and callable(getattr(m, "set_attn_implementation", None))]


def candidates(model: nn.Module, skip: set) -> List[Candidate]:
    """HuggingFace attention modules of ``model`` (ids in ``skip`` left out), with refusals and the switch."""
    found = [Candidate(n, m, f"{PACKAGE}.{type(m).__name__}", _refusals(m), check=check_call)
             for n, m in model.named_modules() if id(m) not in skip and is_hf_attention(m)]
    if not found:
        return []
    owners = _pretrained_models(model)
    for n, pm in owners:
        if getattr(pm, "_supports_sdpa", True) is False:
            for c in found:
                if c.name.startswith(n + ".") or not n:
                    c.refusals.append(f"{type(pm).__name__} does not support the 'sdpa' attention implementation")

    def prepare():
        # Switch every PreTrainedModel to SDPA: its config decides both the attention function and
        # the mask format (boolean for SDPA). Then every recognised module's own config.
        for _, pm in owners:
            if getattr(pm.config, "_attn_implementation", None) != "sdpa":
                pm.set_attn_implementation("sdpa")
        for c in found:
            if getattr(c.module.config, "_attn_implementation", None) != "sdpa":
                c.module.config._attn_implementation = "sdpa"

    for c in found:
        c.prepare = prepare  # idempotent; run once per candidate
    return found
