"""No NaN or Inf ever reaches a decomposition: every route raises NumericalError first, and nothing is printed.

LAPACK builds differ on non-finite input: some print "On entry to SLASCL parameter number 4 had an illegal
value" to stdout, some raise, some (this torch, for Inf) return NaN singular values silently.
"""

from __future__ import annotations

import pytest
import torch

from runs import settings
from lorascale.errors import NumericalError
from lorascale.numerics.compare import base_spectrum, compare_to_base
from lorascale.numerics.gram import svd as gram_svd, svdvals as gram_svdvals
from lorascale.numerics.metrics import lora_delta_singular_values
from lorascale.numerics.svd import svd, svdvals


def _poisoned(value: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    m = torch.randn(12, 8, dtype=dtype, generator=torch.Generator().manual_seed(0))
    m[3, 2] = value
    return m


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("decompose", [
    lambda m: svd(m, backend="torch"), lambda m: svdvals(m, backend="torch"), lambda m: svd(m, backend="gram"), lambda m: svdvals(m, backend="gram"),
    gram_svd, gram_svdvals, lambda m: base_spectrum(m, ("left", "right"), backend="torch"),
])
def test_every_decomposition_refuses_non_finite_input(capfd, value, decompose):
    with pytest.raises(NumericalError, match="NaN or Inf"):
        decompose(_poisoned(value))
    assert capfd.readouterr().out == ""


def test_gram_of_finite_fp64_that_overflows():
    """Entries of 1e200 are finite in fp64, their squares are not: the Gram matrix is checked too."""
    with pytest.raises(NumericalError, match="Gram matrix holds NaN or Inf"):
        gram_svdvals(torch.full((6, 4), 1e200, dtype=torch.float64))


def test_full_difference_that_overflows():
    w0 = torch.eye(8) * -3e38
    w = torch.eye(8) * 3e38
    with pytest.raises(NumericalError, match="NaN or Inf"):
        compare_to_base(base_spectrum(w0, ("left",), backend="torch"), w, settings(), w0=w0)


def test_lora_core_that_overflows():
    a, b = torch.eye(4, 8), torch.eye(8, 4)
    assert torch.allclose(lora_delta_singular_values(a, b, 2.0), torch.full((4,), 2.0))
    with pytest.raises(NumericalError, match="4x4 .*NaN or Inf .*float32"):
        lora_delta_singular_values(a * 1e30, b * 1e30, 1.0)
