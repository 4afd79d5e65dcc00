"""AMP: torch's GradScaler protocol, fusedopt's own scaler, skipped steps, accumulation."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from optim_cases import TORCH_TOLERANCE, assert_close, clone_params, make_model

import fusedopt
from fusedopt import ops
from fusedopt.optim._base import FusedOptimizer
from fusedopt.optim._plan import PlannedNorm

INF_STEPS = {2, 5, 6}  # steps whose grads hold an inf: skipped, scale backs off


def _grads(params, seed, scale, inf):
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(p.shape, generator=gen) for p in params]
    if inf:
        grads[1][0] = float("inf")
    for p, g in zip(params, grads, strict=True):
        p.grad = (g * scale).to(p.dtype)


def _scale(scaler):
    """The current loss scale, through ``scaler.scale`` (which also initialises it)."""
    return scaler.scale(torch.ones((), device=scaler._device)).item()


def _scaler(cls, **kw):
    return cls("cpu", init_scale=2.0**10, growth_interval=3, **kw)


def _run_torch_recipe(steps, clip):
    """torch's documented recipe: unscale_, clip_grad_norm_, scaler.step, update."""
    params = clone_params(make_model(), torch.float32)
    opt = torch.optim.AdamW(params, lr=1e-2)
    scaler = _scaler(torch.amp.GradScaler)
    scales = []
    for step in range(steps):
        _grads(params, step, _scale(scaler), step in INF_STEPS)
        if clip:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
    return params, opt, scales


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("scaler_cls", [torch.amp.GradScaler, fusedopt.GradScaler])
def test_scaled_training_equals_torch_recipe(scaler_cls, clip):
    steps = 12
    want_params, want_opt, want_scales = _run_torch_recipe(steps, clip)
    params = clone_params(make_model(), torch.float32)
    opt = fusedopt.AdamW(params, lr=1e-2, max_grad_norm=1.0 if clip else None)
    scaler = _scaler(scaler_cls)
    scales = []
    for step in range(steps):
        _grads(params, step, _scale(scaler), step in INF_STEPS)
        scaler.step(opt)  # no unscale_: the optimizer unscales (and clips) on load
        scaler.update()
        scales.append(scaler.get_scale())
        assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")
    assert scales == want_scales  # grows and backs off exactly as torch's
    changes = [b / a for a, b in itertools.pairwise(scales)]
    assert 0.5 in changes and 2.0 in changes  # it did back off and grow
    for i, (p, q) in enumerate(zip(params, want_params, strict=True)):
        assert_close(p, q, TORCH_TOLERANCE, f"param {i}")
        assert opt.state[p]["step"].item() == want_opt.state[q]["step"].item() == steps - 3


@pytest.mark.parametrize("scaler_cls", [torch.amp.GradScaler, fusedopt.GradScaler])
@pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.bfloat16, True)])
def test_skipped_step_changes_nothing(scaler_cls, dtype, master):
    params = clone_params(make_model(), dtype)
    opt = fusedopt.AdamW(params, lr=1e-2, max_grad_norm=1.0, master_weights=master)
    scaler = _scaler(scaler_cls)
    _grads(params, 0, _scale(scaler), inf=False)
    scaler.step(opt)
    scaler.update()
    before = [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())
    _grads(params, 1, _scale(scaler), inf=True)
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0**9
    assert all(torch.equal(p, q) for p, q in zip(params, before[0], strict=True))
    for pid, state in opt.state_dict()["state"].items():
        for key, value in state.items():
            assert torch.equal(value, before[1]["state"][pid][key]), key
            if key == "step":
                assert value.item() == 1.0


def test_found_inf_two_skips_and_preset_grad_scale_multiplies_in():
    """found_inf != 0 (torch sums it over devices: 2.0 is a skip); a preset opt.grad_scale
    (gradient accumulation) multiplies into the scaler's scale."""
    params = clone_params(make_model(), torch.float32)
    opt = fusedopt.SGD(params, lr=0.1)
    _grads(params, 0, 1.0, inf=False)
    before = [p.detach().clone() for p in params]
    opt.found_inf = torch.tensor(2.0)
    opt.step()
    del opt.found_inf
    assert all(torch.equal(p, q) for p, q in zip(params, before, strict=True))

    twin = clone_params(make_model(), torch.float32)
    plain = torch.optim.SGD(twin, lr=0.1)
    scaler = fusedopt.GradScaler("cpu", init_scale=8.0)
    assert _scale(scaler) == 8.0
    for p, q in zip(params, twin, strict=True):
        q.grad = p.grad.clone() / 4.0
        p.grad = p.grad * 8.0  # scaled loss
    opt.grad_scale = 4.0  # four accumulated micro-batches: the mean
    scaler.step(opt)
    plain.step()
    assert not hasattr(opt, "grad_scale")  # deleted after the step, as torch's scaler does
    for p, q in zip(params, twin, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=0)


def test_gradient_accumulation_without_scaler():
    """opt.grad_scale = n divides summed micro-batch grads on load: the mean, no extra pass."""
    params = clone_params(make_model(), torch.float32)
    twin = clone_params(make_model(), torch.float32)
    opt, ref = fusedopt.AdamW(params, lr=1e-2), torch.optim.AdamW(twin, lr=1e-2)
    opt.grad_scale = 3
    for step in range(4):
        micro = [clone_params(make_model(step), torch.float32) for _ in range(3)]
        for p, q, *ms in zip(params, twin, *micro, strict=True):
            p.grad = sum(m.detach() for m in ms)
            q.grad = p.grad / 3
        opt.step()
        ref.step()
    for p, q in zip(params, twin, strict=True):
        assert_close(p, q, TORCH_TOLERANCE, "accumulated")


def test_fusedopt_scaler_reads_grads_twice_and_skips_torch_inf_check(monkeypatch):
    """A loss-scaled, clipped step: one grad_norm pass and one step pass; torch's inf check
    (a read-write pass) never runs."""
    calls = []
    real_norm, real_step = ops.grad_norm, ops.step

    def norm(tensors, *a, **k):
        calls.append(("grad_norm", len(tensors)))
        return real_norm(tensors, *a, **k)

    def step(op, lists, *a, **k):
        calls.append((op, len(lists["grads"])))
        return real_step(op, lists, *a, **k)

    real_planned = FusedOptimizer._run_planned

    def planned(self, call, *a, **k):  # a cached plan's op call ([note: planned calls])
        (planned_call,) = [c for c in self._step_out["plan"].calls if c.native is call]
        calls.append((self.OP, len(planned_call.params)))
        return real_planned(self, call, *a, **k)

    real_planned_norm = PlannedNorm.grad_norm

    def planned_norm(self, *a, **k):  # a cached plan's norm pass, its grads read in C++
        calls.append(("grad_norm", len(opt._step_out["plan"].stepped)))
        return real_planned_norm(self, *a, **k)

    def forbidden(*a, **k):
        raise AssertionError("torch's inf-check pass ran")

    monkeypatch.setattr(ops, "grad_norm", norm)
    monkeypatch.setattr(ops, "step", step)
    monkeypatch.setattr(FusedOptimizer, "_run_planned", planned)
    monkeypatch.setattr(PlannedNorm, "grad_norm", planned_norm)
    monkeypatch.setattr(torch, "_amp_foreach_non_finite_check_and_unscale_", forbidden)
    params = clone_params(make_model(), torch.float32)
    opt = fusedopt.AdamW(params, lr=1e-2, max_grad_norm=1.0)
    scaler = fusedopt.GradScaler("cpu")
    n = len(params) - 1  # the unused param has no grad
    for step_index in range(2):
        _grads(params[1:], step_index, _scale(scaler), inf=step_index == 1)
        scaler.step(opt)
        scaler.update()
    assert calls == [("grad_norm", n), ("adamw_", n)] * 2
    assert scaler.get_scale() == 2.0**15  # the inf step backed off


def test_fusedopt_scaler_without_clip_still_finds_inf():
    params = clone_params(make_model(), torch.float32)
    opt = fusedopt.Lion(params, lr=1e-3)  # no max_grad_norm: the norm pass gives found_inf
    scaler = fusedopt.GradScaler("cpu")
    _grads(params, 0, _scale(scaler), inf=True)
    before = [p.detach().clone() for p in params]
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(p, q) for p, q in zip(params, before, strict=True))
    assert scaler.get_scale() == 2.0**15


def test_fusedopt_scaler_after_unscale_falls_back_to_torch():
    params = clone_params(make_model(), torch.float32)
    twin = clone_params(make_model(), torch.float32)
    opt = fusedopt.AdamW(params, lr=1e-2)
    ref = torch.optim.AdamW(twin, lr=1e-2)
    scaler = fusedopt.GradScaler("cpu", init_scale=4.0)
    _grads(params, 0, _scale(scaler), inf=False)
    _grads(twin, 0, 1.0, inf=False)
    scaler.unscale_(opt)
    fusedopt.clip_grad_norm_(params, 1e9)
    scaler.step(opt)
    scaler.update()
    ref.step()
    for p, q in zip(params, twin, strict=True):
        assert_close(p, q, TORCH_TOLERANCE, "after unscale_")


@pytest.mark.cuda
def test_fusedopt_scaler_step_never_syncs_on_gpu():
    params = clone_params(make_model(), torch.float32, "cuda")
    opt = fusedopt.AdamW(params, lr=1e-2, max_grad_norm=1.0)
    scaler = fusedopt.GradScaler("cuda")
    for step in range(3):
        _grads(params, step, _scale(scaler), inf=step == 1)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            scaler.step(opt)
            scaler.update()
        finally:
            torch.cuda.set_sync_debug_mode("default")
