"""The paper's growth exponents (SPEC §6.1), measured from exact closed-form blocks."""

import numpy as np
import pytest

from backpack_attention.report.heterogeneity import EXPECTED, scale_sweep


@pytest.mark.parametrize("attention", ["softmax", "linear"])
def test_growth_exponents_match_paper(attention):
    res = scale_sweep(np.logspace(-3, -2, 3), attention=attention, num_sequences=4, progressbar=False)
    for key, expected in EXPECTED[attention].items():
        assert res.slopes[key] == pytest.approx(expected, abs=0.05), key
    # the value block's functional part vanishes for the (last) attention layer: no slope is fitted
    assert ("W_V", "functional") not in res.slopes


def test_sweep_rejects_bad_sigmas():
    with pytest.raises(ValueError, match="sigmas"):
        scale_sweep([0.1], progressbar=False)
    with pytest.raises(ValueError, match="sigmas"):
        scale_sweep([-1.0, 1.0], progressbar=False)
