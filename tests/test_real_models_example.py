"""examples/real_models.py (--quick, in-process): GPT-2, BERT and a timm ViT converted, whole-model
curvature ours vs curvlinops. Structural facts of its output, and its numbers against references
computed here: a dense double-backward Hessian of each quick model (right through LayerNorm)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from reference import dense_hessian_double_backward, rel_error

pytest.importorskip("transformers")
pytest.importorskip("timm")

ROOT = Path(__file__).resolve().parents[1]


def _example():
    spec = importlib.util.spec_from_file_location("real_models_example", ROOT / "examples" / "real_models.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    ex = _example()
    out = tmp_path_factory.mktemp("real_models")
    threads = torch.get_num_threads()
    res = ex.main(["--quick", "--out", str(out)])
    assert torch.get_num_threads() == threads  # restored
    return ex, res, out


def test_outputs_and_structure(run):
    ex, res, out = run
    assert res["quick"] is True and list(res["models"]) == list(ex.MODELS)
    for f in ("summary.md", "results.json", "block_eigenvalues.png"):
        assert (out / f).stat().st_size > 0
    assert json.loads((out / "results.json").read_text())["quick"] is True
    text = (out / "summary.md").read_text()
    assert "python examples/real_models.py --quick" in text
    kinds = {"gpt2": "transformers.GPT2Attention", "bert": "transformers.BertSelfAttention", "vit": "timm.Attention"}
    k = ex.SIZES[True]["k"]
    for name, r in res["models"].items():
        assert f"| {name} | top-{k} Hessian eigenvalues" in text
        assert [kind for _, kind in r["converted"]] == [kinds[name]] * ex.SIZES[True]["layers"]
        assert r["output_rel_diff"] < 1e-12
        for kind in ("hessian", "ggn"):
            top = r[f"top_{kind}"]
            assert len(top["ours"]) == len(top["curvlinops"]) == k
            assert top["ours"] == sorted(top["ours"], reverse=True)
            assert top["mv_ours"] > 0 and top["t_ours"] > 0 and top["t_curvlinops"] > 0
        # the GGN has no LayerNorm problem: curvlinops and ours agree to rounding
        assert np.allclose(r["top_ggn"]["ours"], r["top_ggn"]["curvlinops"], rtol=1e-8, atol=0)
        assert r["trace_ggn"]["ours"] == pytest.approx(r["trace_ggn"]["curvlinops"], rel=1e-10)
        assert r["top_ggn"]["ours"][0] > 0
        # attention weight blocks: no LayerNorm rows in them, so both agree
        assert [(b["layer"], b["block"]) for b in r["blocks"]] == [("layer 1", b) for b in ex.SIZES[True]["blocks"]]
        for b in r["blocks"]:
            assert b["ours"] == pytest.approx(b["curvlinops"], rel=1e-6, abs=1e-12)
        ln = r["layernorm"]
        assert ln["rows"] == r["layernorm_weights"] > 0
        assert ln["ours_ln"] < 1e-10 and ln["ours_other"] < 1e-10 and ln["curvlinops_other"] < 1e-10
        assert ln["ggn_curvlinops_vs_ours"] < 1e-10


def test_layernorm_error_of_curvlinops_is_shown(run):
    _, res, _ = run
    errs = [r["layernorm"]["curvlinops_ln"] for r in res["models"].values()]
    if max(errs) < 1e-8:  # pragma: no cover - a future torch may fix forward-over-reverse through layer_norm
        pytest.skip(f"curvlinops' Hessian is right on LayerNorm weights in torch {torch.__version__}")
    assert min(errs) > 1e-3


@pytest.mark.parametrize("name", ["gpt2", "bert", "vit"])
def test_against_dense_double_backward_hessian(run, name):
    """Top eigenvalues, block eigenvalues and the Hutchinson trace (same probes) of our operator
    equal those of a dense Hessian built by double backward on the unconverted model."""
    ex, res, _ = run
    r = res["models"][name]
    p = ex.build(name, quick=True)  # the same model and data (seeded)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: more threads only synchronise (slow on a loaded machine)
    try:
        H = dense_hessian_double_backward(p.ref, p.loss_func, p.params("ref"), p.data, chunk=256)
    finally:
        torch.set_num_threads(threads)
    assert rel_error(H, H.T) < 1e-12
    evals = torch.linalg.eigvalsh(H).flip(0)
    k = len(r["top_hessian"]["ours"])
    np.testing.assert_allclose(r["top_hessian"]["ours"], evals[:k].numpy(), rtol=1e-7)
    assert abs(r["top_hessian"]["curvlinops"][0] - evals[0].item()) > 1e-12  # LayerNorm error (reported)
    # blocks: the dense submatrix at the block's rows of the layer's attention weights
    offsets, i = {}, 0
    for n, q in p.ref.named_parameters():
        offsets[n] = i
        i += q.numel()
    _, names, blocks = p.layers[0]
    sizes = [dict(p.ref.named_parameters())[n].numel() for n in names]
    for b in r["blocks"]:
        local = blocks[b["block"]]
        glob = torch.cat([offsets[n] + torch.arange(s) for n, s in zip(names, sizes)])[local]
        top = torch.linalg.eigvalsh(H[glob][:, glob])[-1].item()
        assert b["ours"] == pytest.approx(top, rel=1e-6, abs=1e-12), (b["block"], b["ours"], top)
    # Hutchinson with the example's seed draws the same probes for a dense matrix
    torch.manual_seed(1234)
    tr = ex.hutchinson_trace(H, r["trace_hessian"]["probes"]).item()
    assert r["trace_hessian"]["ours"] == pytest.approx(tr, rel=1e-10)
