"""Clipping: fusedopt.clip_grad_norm_ against torch's, and max_grad_norm inside step()."""

from __future__ import annotations

import math

import pytest
import torch
from optim_cases import (
    TORCH_TOLERANCE,
    assert_close,
    assert_params_close,
    clone_params,
    make_model,
)

import fusedopt


def _with_grads(dtype=torch.float32, scale=10.0, seed=0):
    params = clone_params(make_model(), dtype)
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = (scale * torch.randn(p.shape, generator=gen)).to(dtype)
    return params


@pytest.mark.parametrize("norm_type", [2.0, math.inf, 1.0])
@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_clip_grad_norm_matches_torch(norm_type, max_norm):
    ours, theirs = _with_grads(), _with_grads()
    got = fusedopt.clip_grad_norm_(ours, max_norm, norm_type)
    want = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type)
    assert got.dtype == torch.float32 and got.dim() == 0
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    for p, q in zip(ours, theirs, strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)


def test_clip_grad_norm_returns_fp32_for_bf16_grads():
    params = _with_grads(torch.bfloat16)
    exact = torch.cat([p.grad.double().reshape(-1) for p in params]).norm()
    norm = fusedopt.clip_grad_norm_(params, 1.0)
    assert norm.dtype == torch.float32
    assert abs(norm.double() - exact) / exact < 1e-6  # fp32 accumulation of exact bf16 values
    for p in params:
        assert p.grad.dtype == torch.bfloat16


def test_clip_grad_norm_error_if_nonfinite():
    params = _with_grads()
    params[1].grad[0] = float("nan")
    with pytest.raises(RuntimeError, match="non-finite"):
        fusedopt.clip_grad_norm_(params, 1.0, error_if_nonfinite=True)


def test_clip_grad_norm_accepts_one_tensor_and_no_grads():
    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.full((4,), 3.0)
    torch.testing.assert_close(fusedopt.clip_grad_norm_(p, 1.0), torch.tensor(6.0))
    torch.testing.assert_close(p.grad, torch.full((4,), 3.0 / (6.0 + 1e-6)))
    assert fusedopt.clip_grad_norm_([torch.nn.Parameter(torch.ones(2))], 1.0).item() == 0.0


@pytest.mark.parametrize("cls,torch_cls,kwargs", [
    (fusedopt.AdamW, torch.optim.AdamW, dict(lr=1e-2)),
    (fusedopt.Adam, torch.optim.Adam, dict(lr=1e-2, weight_decay=0.1)),
    (fusedopt.SGD, torch.optim.SGD, dict(lr=1e-2, momentum=0.9)),
])  # fmt: skip
def test_max_grad_norm_equals_torch_clip_then_step(cls, torch_cls, kwargs):
    """max_grad_norm inside step() == torch's clip_grad_norm_ followed by torch's step."""
    params = clone_params(make_model(), torch.float32)
    twin = clone_params(make_model(), torch.float32)
    ours = cls(params, **kwargs, max_grad_norm=1.0)
    theirs = torch_cls(twin, **kwargs)
    for seed in range(10):
        grads = [g.grad for g in _with_grads(seed=seed)]
        for p, q, g in zip(params, twin, grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        want = torch.nn.utils.clip_grad_norm_(twin, 1.0)
        theirs.step()
        assert ours.last_grad_norm.dtype == torch.float32
        torch.testing.assert_close(ours.last_grad_norm, want, rtol=1e-6, atol=0)
        for p, g in zip(params, grads, strict=True):  # grads are read, never rewritten
            assert torch.equal(p.grad, g)
    for i, (p, q) in enumerate(zip(params, twin, strict=True)):
        assert_close(p, q, TORCH_TOLERANCE, f"param {i}")


@pytest.mark.parametrize("cls,kwargs", [
    (fusedopt.Lion, dict(lr=1e-3)),
    (fusedopt.LAMB, dict(lr=1e-2)),
])  # fmt: skip
def test_max_grad_norm_equals_pre_clipped_grads(cls, kwargs):
    """Lion clips as torch's clip_grad_norm_; LAMB as timm: g / max(1, norm / max_grad_norm).
    Each equals the same class without clipping fed the grads clipped by hand."""
    params = clone_params(make_model(), torch.float32)
    twin = clone_params(make_model(), torch.float32)
    ours = cls(params, **kwargs, max_grad_norm=0.5)
    plain = cls(twin, **kwargs, max_grad_norm=None)
    for seed in range(5):
        grads = [g.grad for g in _with_grads(seed=seed)]
        norm = torch.cat([g.reshape(-1) for g in grads]).norm()
        if cls is fusedopt.LAMB:
            coef = 1.0 / torch.clamp(norm / 0.5, min=1.0)
        else:
            coef = torch.clamp(0.5 / (norm + 1e-6), max=1.0)
        for p, q, g in zip(params, twin, grads, strict=True):
            p.grad, q.grad = g.clone(), g * coef
        ours.step()
        plain.step()
        torch.testing.assert_close(ours.last_grad_norm, norm, rtol=1e-6, atol=0)
    assert_params_close(params, twin)


def test_max_grad_norm_must_be_global_and_positive():
    params = clone_params(make_model(), torch.float32)
    with pytest.raises(ValueError, match="max_grad_norm"):
        fusedopt.AdamW(params, max_grad_norm=0.0)
    opt = fusedopt.AdamW(params[:2], max_grad_norm=1.0)
    with pytest.raises(ValueError, match="every group must have the same"):
        opt.add_param_group({"params": params[2:], "max_grad_norm": 2.0})
    assert len(opt.param_groups) == 1
