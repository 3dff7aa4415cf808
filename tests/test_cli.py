"""The ``backpack-attention`` command line and its report."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from backpack_attention import report
from backpack_attention.report import cli
from backpack_attention.models import default_problem

ROOT = Path(__file__).resolve().parents[1]
SECTION_TITLES = ["## Model summary", "## Parameters per attention block", "## Gradient norms per attention block",
                  "## Attention Hessian blocks (closed form)", "## Block heterogeneity and growth exponents"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SMALL = ["--sequences", "8", "--no-progress"]
FAST = ["--sections", "model,attention_params,gradient_norms"]  # skips the curvature sections


def table_row(text, *cells):
    """Cells of the first Markdown table row starting with ``cells``."""
    prefix = "| " + " | ".join(cells) + " |"
    for line in text.splitlines():
        if line.startswith(prefix):
            return [c.strip() for c in line.strip().strip("|").split("|")]
    raise AssertionError(f"no row {prefix!r} in the report")


def test_report_default_options(tmp_path, capsys):
    out = tmp_path / "rep"
    assert cli.main(["report", "--out", str(out), *SMALL]) == 0
    text = (out / "report.md").read_text()
    positions = [text.index(t) for t in SECTION_TITLES]
    assert positions == sorted(positions)
    assert "failed" not in text.split("## Run log")[0]
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert {"gradient_norms.png", "hessian_heatmap.png", "hessian_growth.png"} <= set(pngs)
    for png in pngs:
        assert (out / png).read_bytes()[:8] == PNG_MAGIC
        assert f"]({png})" in text
    assert "report.md" in capsys.readouterr().out


def test_report_numbers_are_independent_of_the_report_code(tmp_path):
    """Parameter counts and gradient norms in report.md match a direct computation."""
    out = tmp_path / "rep"
    args = ["--layers", "2", "--d-model", "12", "--heads", "3", "--sequences", "6", "--seed", "3"]
    assert cli.main(["report", "--out", str(out), "--no-plots", "--no-progress", *FAST, *args]) == 0
    text = (out / "report.md").read_text()
    torch.manual_seed(0)
    model, loss_func, (X, y) = default_problem(seed=3, num_sequences=6, d_model=12, num_heads=3, num_layers=2,
                                               init_std=0.8 / math.sqrt(12))
    total = sum(p.numel() for p in model.parameters())
    assert f"**{total}**" in text
    assert table_row(text, "`blocks.1.attn`")[2] == str(4 * 12 * 12 + 4 * 12)
    loss = loss_func(model(X), y)
    assert table_row(text, "loss at initialisation")[1] == f"{loss.item():.4g}"
    loss.backward()
    d = 4
    for layer in (0, 1):
        attn = model.blocks[layer].attn
        W = attn.in_proj_weight.grad
        expected = {  # torch layout (SPEC §5.3)
            ("W_Q", 0): W[0:d], ("W_K", 2): W[12 + 2 * d: 12 + 3 * d], ("W_V", 1): W[24 + d: 24 + 2 * d],
            ("b_V", 2): attn.in_proj_bias.grad[24 + 2 * d: 24 + 3 * d],
            ("W_O", 1): attn.out_proj_weight.grad[:, d: 2 * d],
        }
        for (name, head), g in expected.items():
            cells = table_row(text, str(layer), f"`{name}`")
            assert float(cells[2 + head]) == pytest.approx(float(g.norm()), rel=1e-3), (layer, name, head)
        b_O = table_row(text, str(layer), "`b_O`")
        assert float(b_O[2]) == pytest.approx(float(attn.out_proj_bias.grad.norm()), rel=1e-3)
    assert list(out.glob("*.png")) == []  # --no-plots


def test_report_other_architectures(tmp_path):
    out = tmp_path / "rep"
    args = ["--layers", "2", "--d-model", "8", "--heads", "4", "--attention", "linear", "--norm", "pre",
            "--dtype", "float32"]
    sections = ["--sections", "model,attention_params,gradient_norms,hessian_blocks"]
    assert cli.main(["report", "--out", str(out), *SMALL, *sections, *args]) == 0
    text = (out / "report.md").read_text()
    assert all(t in text for t in SECTION_TITLES[:4])
    assert "| head 3 |" in text
    assert table_row(text, "1", "`W_V`")  # second layer present
    assert table_row(text, "attention")[1] == "linear, causal"
    assert table_row(text, "dtype")[1] == "float32"
    assert "LayerNorm" in text
    assert (out / "gradient_norms.png").read_bytes()[:8] == PNG_MAGIC


def test_failing_section_is_reported_and_exit_status_nonzero(tmp_path, capsys):
    @report.register_section("broken_for_test", "Broken section", order=15)
    def broken(ctx):
        raise ZeroDivisionError("deliberate failure")

    try:
        out = tmp_path / "rep"
        sections = ["--sections", "model,broken_for_test,attention_params,gradient_norms"]
        assert cli.main(["report", "--out", str(out), *SMALL, *sections]) == 1
    finally:
        report.SECTIONS.pop("broken_for_test", None)
    text = (out / "report.md").read_text()
    assert all(t in text for t in SECTION_TITLES[:3])  # the other sections still ran
    assert "## Broken section" in text
    assert "ZeroDivisionError: deliberate failure" in text
    assert "Traceback" in text
    assert (out / "gradient_norms.png").exists()
    assert "broken_for_test" in capsys.readouterr().err
    assert "broken_for_test" not in report.SECTIONS


def test_register_section_rejects_name_clash():
    with pytest.raises(ValueError, match="already registered"):
        report.register_section("model", "Another model summary")(lambda ctx: report.SectionResult(""))


@pytest.mark.parametrize("argv,words", [
    (["report", "--attention", "cosine"], ["--attention", "softmax", "linear"]),
    (["report", "--norm", "post"], ["--norm", "none", "pre"]),
    (["report", "--dtype", "float16"], ["--dtype", "float32", "float64"]),
    (["report", "--layers", "0"], ["--layers", "positive integer"]),
    (["report", "--d-model", "x"], ["--d-model", "positive integer"]),
    (["report", "--sequences", "-3"], ["--sequences", "positive integer"]),
    (["report", "--heads", "3"], ["--heads", "--d-model 16", "[1, 2, 4, 8, 16]"]),
    (["report", "--seed", "1.5"], ["--seed", "integer"]),
    (["report", "--bogus"], ["--bogus"]),
    (["report", "--sections", "model,nope"], ["--sections", "nope", "hessian_blocks"]),
    (["reprot"], ["report"]),
    ([], ["report"]),
])
def test_bad_options_are_argparse_errors(argv, words, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err
    for w in words:
        assert w in err
    assert not (tmp_path / "backpack-attention-report").exists()  # nothing was written


def test_help_is_informative(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["report", "--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split()).replace("- ", "-")  # undo argparse's line wrapping
    for opt in ["--out", "--layers", "--d-model", "--heads", "--sequences", "--seed", "--attention",
                "--norm", "--dtype", "--no-plots", "softmax", "linear", "backpack-attention-report",
                "addition", "exit status"]:
        assert opt in text, opt
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "report" in capsys.readouterr().out


def test_console_script_default_run_in_fresh_process(tmp_path):
    """The default report in a fresh interpreter: succeeds and never imports torchvision."""
    code = ("import sys; from backpack_attention.report.cli import main; rc = main(['report', '--no-progress']); "
            "assert 'torchvision' not in sys.modules, 'torchvision was imported'; sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "backpack-attention-report" / "report.md").exists()
    assert (tmp_path / "backpack-attention-report" / "gradient_norms.png").exists()


def test_fused_kernel_example_runs_and_shows_the_failures():
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "fused_kernels.py")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    section1 = out.split("\n2.")[0]
    section3 = out.split("\n3.")[1].split("\n4.")[0]
    assert section1.count("FAIL") == 5 and "OK" not in section1.split("1.", 1)[1]
    assert section3.count("OK") == 10 and "FAIL" not in section3
    errors = [float(m) for m in re.findall(r"math reference\| = ([0-9.e+-]+)", section3)]
    assert len(errors) == 10 and max(errors) < 1e-12


def test_readme_quickstart_has_two_one_line_commands():
    text = (ROOT / "README.md").read_text()
    quick = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(?:bash|sh|console)?\n(.*?)```", quick, flags=re.S)
    commands = [line for b in blocks for line in b.strip().splitlines() if line.strip()]
    assert commands == ['python -m pip install -e . && backpack-attention report',
                        'python -m pip install -e ".[test]" && python -m pytest']
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r'pip install -q -e "\.\[test(,\w+)*\]"', ci) and "python -m pytest -q" in ci  # + docs extra


def test_report_hessian_numbers_match_autodiff(tmp_path):
    """The Hessian-blocks table equals block norms of a torch.func Hessian (math kernel)."""
    import sys as _sys

    _sys.path.insert(0, str(ROOT / "tests"))
    from reference import dense_hessian_and_ggn

    from backpack_attention import param_index

    out = tmp_path / "rep"
    args = ["--d-model", "4", "--heads", "2", "--sequences", "3", "--seed", "1"]
    assert cli.main(["report", "--out", str(out), "--no-plots", "--no-progress", "--sections", "hessian_blocks", *args]) == 0
    text = (out / "report.md").read_text()
    model, loss_func, (X, y) = default_problem(seed=1, num_sequences=3, d_model=4, num_heads=2, num_layers=1,
                                               init_std=0.8 / math.sqrt(4))
    attn = model.blocks[0].attn
    H, G = dense_hessian_and_ggn(model, loss_func, list(attn.parameters()), [(X, y)])
    for name, head in (("W_Q", 1), ("W_V", 0)):
        i = param_index(attn, name, head)
        row = table_row(text, "0", name, str(head))
        outer, functional, full = (float(v) for v in row[3:6])
        assert outer == pytest.approx(G[i][:, i].norm().item(), rel=1e-3)
        assert full == pytest.approx(H[i][:, i].norm().item(), rel=1e-3)
        if name == "W_Q":
            assert functional == pytest.approx((H - G)[i][:, i].norm().item(), rel=1e-3)


def test_framework_docstring_example_runs(tmp_path, monkeypatch, capsys):
    """The "adding a section" example in backpack_attention.report.framework runs as printed."""
    import textwrap

    from backpack_attention.report import framework

    doc = framework.__doc__
    code = textwrap.dedent(doc.split("runs as printed", 1)[1].split("::\n", 1)[1].split("\n``draw``", 1)[0])
    assert "register_section(" in code and "run_report(" in code
    monkeypatch.chdir(tmp_path)
    try:
        exec(compile(code, "framework.__doc__", "exec"), {})
    finally:
        report.SECTIONS.pop("num_heads", None)
    text = (tmp_path / "my-report" / "report.md").read_text()
    assert "## Heads per attention layer" in text and "Heads per layer: [2]" in text
    assert "Sections: 2 of 2 succeeded" in text
    assert (tmp_path / "my-report" / "num_heads.png").read_bytes()[:8] == PNG_MAGIC


def test_python_dash_m_and_library_does_not_import_the_application():
    """``python -m backpack_attention.report`` is the CLI; ``import backpack_attention`` does not load it."""
    proc = subprocess.run([sys.executable, "-m", "backpack_attention.report", "report", "--help"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "--sections" in proc.stdout
    code = ("import sys, backpack_attention; "
            "assert not [m for m in sys.modules if m.startswith('backpack_attention.report')], 'report imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
