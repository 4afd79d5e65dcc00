"""What is specific to the ``cpu`` backend (fusedopt._C): bit-exact agreement with the fp32
reference where both round every operation once, thread-count independence of reductions,
and the binding's own input checks (the ops called directly, bypassing ``fusedopt.ops``)."""

from __future__ import annotations

import math

import pytest
import torch

import fusedopt
from fusedopt import ops

pytestmark = pytest.mark.skipif(
    not fusedopt.backends()["cpu"].usable, reason="fusedopt._C is not built"
)

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# Empty, shorter than a vector, odd, and spanning several 64K-element work items.
SIZES = (0, 1, 7, 33, 1000, 3 * 65536 + 5)


def _tensors(dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g).to(dtype) for n in SIZES]


@pytest.mark.parametrize("dtype", DTYPES)
def test_scale_matches_reference_bitwise(dtype):
    # One multiplication in opmath, one rounding: there is only one right answer.
    got, want = _tensors(dtype), _tensors(dtype)
    found_got, found_want = torch.zeros(()), torch.zeros(())
    ops.scale_(got, torch.tensor(1.7), found_got, backend="cpu")
    ops.scale_(want, torch.tensor(1.7), found_want, backend="reference")
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    assert found_got.item() == 0.0
    got[4][10] = math.inf
    ops.scale_(got, torch.tensor(1.0), found_got, backend="cpu")
    assert found_got.item() == 1.0


def test_scale_mixed_dtypes_in_one_call():
    got = [torch.randn(100).to(d) for d in DTYPES]
    want = [t.clone() for t in got]
    ops.scale_(got, torch.tensor(0.3), backend="cpu")
    ops.scale_(want, torch.tensor(0.3), backend="reference")
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
