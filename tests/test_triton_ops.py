"""Quick equivalence of the triton backend with the reference backend (fp32 math both), on
small inputs, for every op and option. Runs under TRITON_INTERPRET=1 on CPU (tests/conftest.py)
and natively on a GPU. The shared harness (tests/harness) adds the float64-oracle matrix.

Tolerances: both backends compute the same fp32 expressions in the same order, with IEEE
division and square root and no contraction ([note: hyperparameter rounding] in
triton_kernels/common.py); the one deliberate difference is the bias correction (float64
``exp(t*log(beta))`` against Python's ``beta**t``, a few float64 ulps apart), which can move
an fp32 result by one ulp. So elementwise results must agree to 2 fp32 ulps, or exactly in
storage dtype up to one ulp of that dtype; reductions (norms) to a size-derived tolerance.
"""

from __future__ import annotations

import pytest
import torch

import fusedopt
from fusedopt import ops

if not fusedopt.backends()["triton"].usable:
    pytest.skip("triton backend not usable here", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LOW = (torch.bfloat16, torch.float16)


def close(got: torch.Tensor, want: torch.Tensor, ulps: int = 2) -> None:
    """Elementwise agreement within ``ulps`` units in the last place of the storage dtype."""
    assert got.dtype == want.dtype and got.shape == want.shape
    if got.numel() == 0:
        return
    eps = torch.finfo(got.dtype).eps
    tiny = torch.finfo(got.dtype).tiny
    torch.testing.assert_close(
        got.double(), want.double(), rtol=ulps * eps, atol=ulps * tiny, equal_nan=True
    )


def rand(sizes, dtype, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, generator=g) * scale).to(dtype).to(DEVICE) for n in sizes]


def clone(ts):
    return [t.clone() for t in ts]


SIZES = [0, 1, 7, 33, 1000, 4099]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_scale_matches_reference_exactly(dtype):
    ts = rand(SIZES, dtype)
    want = clone(ts)
    fi, fi_want = torch.zeros((), device=DEVICE), torch.zeros((), device=DEVICE)
    scale = torch.tensor(1.7, device=DEVICE)
    ops.scale_(ts, scale, fi, backend="triton")
    ops.scale_(want, scale, fi_want, backend="reference")
    for a, b in zip(ts, want, strict=True):
        assert torch.equal(a, b)
    assert fi.item() == 0.0
    ts[4][17] = float("nan")
    ops.scale_(ts, torch.ones((), device=DEVICE), fi, backend="triton")
    assert fi.item() == 1.0
    ops.scale_(ts, torch.ones((), device=DEVICE), fi, backend="triton")
    assert fi.item() == 1.0  # never cleared


def test_scale_mixed_dtypes_one_call_and_chunk_boundaries():
    ts = rand([70000], torch.bfloat16) + rand([5, 0], torch.float32, 1) + rand([9], torch.float64)
    ts.append(torch.randn(300).half().to(DEVICE)[1:])  # a view at an odd offset: unaligned path
    want = clone(ts)
    scale = torch.tensor(0.3, device=DEVICE)
    ops.scale_(ts, scale, None, backend="triton")
    ops.scale_(want, scale, None, backend="reference")
    for a, b in zip(ts, want, strict=True):
        assert torch.equal(a, b)
    ts[0][65537] = float("inf")  # second chunk of the big tensor
    fi = torch.zeros((), device=DEVICE)
    ops.scale_(ts, scale, fi, backend="triton")
    assert fi.item() == 1.0
