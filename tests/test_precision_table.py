"""docs/precision.md keeps its promises: float32 errors stay below the stated tolerances (the
constant ``BOUNDS`` of benchmarks/precision.py, which writes the page), and the page quotes the
error that float16/bfloat16 get."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import backpack_attention as ba
from backpack_attention.models import language_model

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "precision.md"


def _script():
    sys.path.insert(0, str(ROOT / "benchmarks"))  # the script imports `common` from its folder
    try:
        spec = importlib.util.spec_from_file_location("precision_script", ROOT / "benchmarks" / "precision.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return module


precision = _script()


def test_float32_errors_below_the_stated_bounds():
    errors = precision.errors(precision.SIZES[0], seed=5)  # a seed the page's table does not use
    assert set(errors) == set(precision.BOUNDS)
    for quantity, err in errors.items():
        assert 0 < err < precision.BOUNDS[quantity], (quantity, err)  # 0: float32 was not float64
    text = DOC.read_text()
    for quantity, bound in precision.BOUNDS.items():
        assert f"| {quantity} |" in text and f"| {precision.format_bound(bound)} |" in text


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_refusal_message_is_the_documented_one(dtype):
    torch.manual_seed(0)
    model = language_model(8, 8, 2, 1, dtype=dtype)
    X = torch.randint(0, 8, (2, 4))
    params = [p for m in model.attention_layers() for p in m.parameters()]
    with pytest.raises(TypeError) as info:
        ba.AttentionHessianLinearOperator(model, nn.CrossEntropyLoss(), params, [(X, X)])
    message = str(info.value)
    assert "float16/bfloat16" in message
    documented = message.replace(str(dtype), "torch.float16")  # the page quotes the float16 case
    assert documented in DOC.read_text()
