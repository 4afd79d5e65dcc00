"""The walking skeleton: backends report truthfully and scale_ matches plain torch."""

from __future__ import annotations

import pytest
import torch

import fusedopt
from fusedopt import ops


def test_backends_report_every_backend_with_a_reason():
    report = fusedopt.backends()
    assert set(report) == {"cuda", "triton", "cpu", "reference"}
    assert report["reference"].usable
    for status in report.values():
        assert status.reason
        assert status.usable == bool(status.devices)


def test_unknown_or_unusable_backend_is_an_error():
    t = [torch.ones(3)]
    with pytest.raises(ValueError, match="unknown backend"):
        ops.scale_(t, torch.tensor(2.0), backend="nope")
    for name, status in fusedopt.backends().items():
        if not status.usable:
            with pytest.raises(RuntimeError, match="not usable"):
                ops.scale_(t, torch.tensor(2.0), backend=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_scale_reference_matches_foreach_mul(dtype):
    sizes = [0, 1, 7, 33, 1000]
    tensors = [torch.randn(n).to(dtype) for n in sizes]
    expected = [t.float().mul(1.5).to(dtype) for t in tensors]
    found_inf = torch.zeros(())
    ops.scale_(tensors, torch.tensor(1.5), found_inf, backend="reference")
    for got, want in zip(tensors, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert found_inf.item() == 0.0
    tensors[2][3] = float("nan")
    ops.scale_(tensors, torch.tensor(1.0), found_inf, backend="reference")
    assert found_inf.item() == 1.0


def test_package_layout_is_the_installed_one():
    """A checkout imports as an install does: the Triton kernels live inside the package, and
    nothing else in the repository (bench/, tests/) is reachable as ``fusedopt.<folder>``."""
    import importlib
    import os

    import fusedopt.triton_kernels

    package = os.path.dirname(os.path.abspath(fusedopt.__file__))
    assert os.path.dirname(os.path.abspath(fusedopt.triton_kernels.__file__)) == os.path.join(
        package, "triton_kernels"
    )
    assert fusedopt.__path__ == [package]
    for folder in ("bench", "tests", "scripts"):
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module(f"fusedopt.{folder}")
