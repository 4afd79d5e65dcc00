"""Each optimizer class, on each usable backend, equals the fp64 oracle (and torch.optim
where torch has the algorithm) over 50 driven steps; low-precision storage step by step."""

from __future__ import annotations

import pytest
import torch
from optim_cases import (
    CASE_IDS,
    CASES,
    TOLERANCES,
    TORCH_TOLERANCE,
    UNUSED,
    assert_close,
    clone_params,
    drive,
    make_model,
    usable_backends,
)

import fusedopt

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BACKENDS = [(d, b) for d in DEVICES for b in usable_backends(d)]
BACKEND_IDS = [f"{d}-{b}" for d, b in BACKENDS]


def _compare_states(opt, params, oracle, tol, what):
    oracle_params = [p for g in oracle.param_groups for p in g["params"]]
    for i, (p, q) in enumerate(zip(params, oracle_params, strict=True)):
        state, want = opt.state[p], oracle.state[q]
        assert set(state) == set(want) | ({"master_param"} if "master_param" in state else set())
        for key in want:
            assert_close(state[key], want[key], tol, f"{what} param {i} state {key}")
        master = state.get("master_param", p)
        assert_close(master, q, tol, f"{what} param {i}")


@pytest.mark.parametrize("device,backend", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_fp32_trajectory_matches_oracle_and_torch(case, device, backend):
    params = clone_params(make_model(), torch.float32, device)
    opt = case.cls(params, **case.kwargs, backend=backend)
    runs = [(opt, params, torch.float32)]
    if case.torch_cls is not None:
        torch_params = clone_params(make_model(), torch.float32, device)
        runs.append(
            (case.torch_cls(torch_params, **case.torch_kwargs), torch_params, torch.float32)
        )
    _, oracle = drive(case.kwargs, case.cls, runs)
    _compare_states(opt, params, oracle, TOLERANCES[torch.float32], "vs oracle")
    assert params[UNUSED].grad is None and not opt.state[params[UNUSED]]
    if case.torch_cls is not None:
        for i, (p, q) in enumerate(zip(params, torch_params, strict=True)):
            assert_close(p, q, TORCH_TOLERANCE, f"vs torch param {i}")
            for key, value in runs[1][0].state[q].items():
                assert_close(opt.state[p][key], value, TORCH_TOLERANCE, f"vs torch {key}")


@pytest.mark.parametrize("device,backend", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_master_weights_trajectory(case, dtype, device, backend):
    """bf16/fp16 params with fp32 masters follow the fp64 oracle fed the same rounded grads;
    the param is always the master rounded to its dtype, bit for bit (DESIGN.md §3)."""
    params = clone_params(make_model(), dtype, device)
    opt = case.cls(params, **case.kwargs, master_weights=True, backend=backend)
    model = make_model()
    with torch.no_grad():
        for p, q in zip(params, model.parameters(), strict=True):
            q.copy_(p.double())
    _, oracle = drive(
        case.kwargs, case.cls, [(opt, params, dtype)], model=model, oracle_grad_dtype=dtype
    )
    _compare_states(opt, params, oracle, TOLERANCES[torch.float32], "master vs oracle")
    for i, p in enumerate(params):
        if i == UNUSED:
            continue
        master = opt.state[p]["master_param"]
        assert master.dtype == torch.float32
        assert torch.equal(p, master.to(dtype))
        for key, value in opt.state[p].items():
            assert value.dtype == torch.float32, key


@pytest.mark.parametrize("device,backend", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_low_precision_step_by_step(case, dtype, device, backend):
    """Without master weights, states take the param's dtype; each step from identical
    inputs equals the fp64 oracle's step rounded once (DESIGN.md §5)."""
    params = clone_params(make_model(), dtype, device)
    opt = case.cls(params, **case.kwargs, backend=backend)
    gen = torch.Generator().manual_seed(3)
    for step in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(device, dtype)
        # The oracle: fp64 copies of exactly the current params, grads and states.
        twins = [torch.nn.Parameter(p.detach().double()) for p in params]
        oracle = case.cls(twins, **case.kwargs, backend="reference")
        for p, t in zip(params, twins, strict=True):
            t.grad = p.grad.double()
            if opt.state[p]:
                oracle.state[t] = {k: v.double().clone() for k, v in opt.state[p].items()}
                if "step" in oracle.state[t]:
                    oracle.state[t]["step"] = opt.state[p]["step"].clone()
        for group, oracle_group in zip(opt.param_groups, oracle.param_groups, strict=True):
            if "step" in group:  # LAMB's one count per group ([note: LAMB group step])
                oracle_group["step"] = group["step"].clone()
        opt.step()
        oracle.step()
        for i, (p, t) in enumerate(zip(params, twins, strict=True)):
            tol = TOLERANCES[dtype]
            assert p.dtype == dtype
            assert_close(p, t, tol, f"step {step} param {i}")
            for key, value in oracle.state[t].items():
                want_dtype = torch.float32 if key == "step" else dtype
                assert opt.state[p][key].dtype == want_dtype, key
                assert_close(opt.state[p][key], value, tol, f"step {step} {key}")


def test_master_weights_on_fp32_params_keeps_no_copy():
    params = clone_params(make_model(), torch.float32)
    opt = fusedopt.AdamW(params, master_weights=True)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    for p in params:
        assert "master_param" not in opt.state[p]
        assert opt.state[p]["exp_avg"].dtype == torch.float32
