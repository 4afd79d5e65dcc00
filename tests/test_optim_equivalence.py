"""Each optimizer class, on each usable backend, equals the fp64 oracle (and torch.optim
where torch has the algorithm) over 50 driven steps; low-precision storage step by step."""

from __future__ import annotations

import copy
import math

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
            for key in ("k", "lr_max", "weight_sum"):  # ScheduleFreeAdamW's host schedule
                if key in group:
                    oracle_group[key] = group[key]
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


# ---------------------------------------------------------------- memory layouts (issue #13)
def _strided_params(model: torch.nn.Module, dtype: torch.dtype, device: str = "cpu"):
    """Non-dense leaf copies of the model's params ([note: non-dense params]): a weight as
    ``base[:, ::2]``, the other transposed then sliced (``base.t()[1:]``), a bias with stride 2
    (the unused param too); the last bias stays dense. Every element between them in the
    bases is NaN: nothing may write there. Returns the params and their bases."""
    params, bases = [], []
    for q in model.parameters():
        q = q.detach().to(device=device, dtype=dtype)
        if q.dim() == 2 and not any(p.dim() == 2 for p in params):
            base = torch.full((q.shape[0], 2 * q.shape[1]), math.nan, dtype=dtype, device=device)
            view = base[:, ::2]
        elif q.dim() == 2:
            base = torch.full((q.shape[1], q.shape[0] + 1), math.nan, dtype=dtype, device=device)
            view = base.t()[1:]
        elif q.shape[0] == 3:
            base = view = q.clone()
        else:
            base = torch.full((2 * q.shape[0],), math.nan, dtype=dtype, device=device)
            view = base[::2]
        view.copy_(q)
        p = torch.nn.Parameter(view)
        assert p.data_ptr() == view.data_ptr() and p.stride() == view.stride()
        params.append(p)
        bases.append(base)
    assert sum(not p.is_contiguous() for p in params) == 4
    return params, bases


def _gaps_untouched(params, bases) -> bool:
    """The elements of each base outside its param are still NaN."""
    for p, base in zip(params, bases, strict=True):
        if p.data_ptr() == base.data_ptr() and p.is_contiguous():
            continue
        mask = torch.ones_like(base, dtype=torch.bool)
        view = mask.t()[1:] if base.dim() == 2 and p.stride()[0] == 1 else None
        if view is None:
            view = mask[:, ::2] if base.dim() == 2 else mask[::2]
        view.fill_(False)
        if not base[mask].isnan().all():
            return False
    return True


@pytest.mark.parametrize("device,backend", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_non_dense_params_step_as_dense_copies_and_as_torch(case, device, backend):
    """[note: non-dense params]: strided-view params step exactly (bit for bit) as dense copies
    of them do, and as torch.optim steps the same views; nothing between them is written, and
    their states are contiguous, as their dense copies' are."""
    params, bases = _strided_params(make_model(), torch.float32, device)
    dense = clone_params(make_model(), torch.float32, device)
    opt = case.cls(params, **case.kwargs, backend=backend)
    dense_opt = case.cls(dense, **case.kwargs, backend=backend)
    runs = [(opt, params, torch.float32), (dense_opt, dense, torch.float32)]
    if case.torch_cls is not None:
        torch_params, _ = _strided_params(make_model(), torch.float32, device)
        torch_opt = case.torch_cls(torch_params, **case.torch_kwargs)
        runs.append((torch_opt, torch_params, torch.float32))
    drive(case.kwargs, case.cls, runs, steps=8)
    assert _gaps_untouched(params, bases)
    for i, (p, q) in enumerate(zip(params, dense, strict=True)):
        assert torch.equal(p, q), f"param {i}"
        assert set(opt.state[p]) == set(dense_opt.state[q])
        for key, value in opt.state[p].items():
            assert torch.equal(value, dense_opt.state[q][key]), f"param {i} {key}"
            assert value.dim() == 0 or value.stride() == q.stride(), f"param {i} {key}"
    if case.torch_cls is not None:
        for i, (p, q) in enumerate(zip(params, torch_params, strict=True)):
            assert_close(p, q, TORCH_TOLERANCE, f"vs torch param {i}")
            for key, value in torch_opt.state[q].items():
                assert_close(opt.state[p][key], value, TORCH_TOLERANCE, f"vs torch {key}")


@pytest.mark.parametrize("device,backend", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("cls", [fusedopt.AdamW, fusedopt.LAMB], ids=["adamw", "lamb"])
def test_non_dense_bf16_params_with_master_weights(cls, device, backend):
    """A non-dense bf16 param's fp32 master is contiguous; the param stays the master rounded, bit
    for bit, and steps as a dense copy does."""
    params, bases = _strided_params(make_model(), torch.bfloat16, device)
    dense = clone_params(make_model(), torch.bfloat16, device)
    kwargs = dict(lr=1e-2, weight_decay=0.1, master_weights=True, backend=backend)
    opt, dense_opt = cls(params, **kwargs), cls(dense, **kwargs)
    drive({"lr": 1e-2, "weight_decay": 0.1}, cls,
          [(opt, params, torch.bfloat16), (dense_opt, dense, torch.bfloat16)], steps=4)  # fmt: skip
    assert _gaps_untouched(params, bases)
    for i, (p, q) in enumerate(zip(params, dense, strict=True)):
        if i == UNUSED:
            continue
        master = opt.state[p]["master_param"]
        assert master.stride() == q.stride() and torch.equal(p, master.to(torch.bfloat16))
        assert torch.equal(p, q) and torch.equal(master, dense_opt.state[q]["master_param"])


@pytest.mark.parametrize("device,backend", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_non_dense_params_skipped_step_changes_nothing(case, device, backend):
    """A step the scaler skips (found_inf set) leaves non-dense params, what lies between
    them and every state bit for bit as they were (the twin is written back unchanged)."""
    params, bases = _strided_params(make_model(), torch.float32, device)
    opt = case.cls(params, **case.kwargs, backend=backend)
    gen = torch.Generator().manual_seed(5)
    for step in range(2):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(device)
        if step == 1:
            before = [base.clone() for base in bases]
            states = {p: {k: v.clone() for k, v in opt.state[p].items()} for p in params}
            opt.found_inf = torch.ones((), device=device)  # as torch.amp.GradScaler sets it
            opt.grad_scale = torch.full((), 2.0, device=device)
        opt.step()
    for base, was in zip(bases, before, strict=True):
        assert torch.equal(base.view(torch.int32), was.view(torch.int32))
    for p in params:
        for key, value in opt.state[p].items():
            assert torch.equal(value, states[p][key]), key


def test_non_dense_params_state_dict_round_trips():
    """A non-dense param's (dense) states save and load, into fusedopt and torch.optim alike,
    and both go on stepping equal."""
    params, _ = _strided_params(make_model(), torch.float32)
    opt = fusedopt.AdamW(params, lr=1e-2)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())  # not aliased with opt's live states
    twins, _ = _strided_params(make_model(), torch.float32)
    with torch.no_grad():
        for t, p in zip(twins, params, strict=True):
            t.copy_(p)
    reloaded = fusedopt.AdamW(twins, lr=1e-2)
    reloaded.load_state_dict(copy.deepcopy(saved))  # a load may alias the step tensors
    torch_twins, _ = _strided_params(make_model(), torch.float32)
    with torch.no_grad():
        for t, p in zip(torch_twins, params, strict=True):
            t.copy_(p)
    torch_opt = torch.optim.AdamW(torch_twins, lr=1e-2)
    torch_opt.load_state_dict(copy.deepcopy(saved))
    for group in (params, twins, torch_twins):
        for p in group:
            p.grad = torch.full_like(p, 0.5)
    for o in (opt, reloaded, torch_opt):
        o.step()
    for p, t, q in zip(params, twins, torch_twins, strict=True):
        assert torch.equal(p, t)
        assert_close(p, q, TORCH_TOLERANCE, "vs torch after load")
        assert all(v.dim() == 0 or v.is_contiguous() for v in reloaded.state[t].values())


@pytest.mark.parametrize("backend", usable_backends("cpu"))
@pytest.mark.parametrize("cls", [fusedopt.AdamW, fusedopt.SGD, fusedopt.Lion, fusedopt.LAMB])
def test_overlapping_param_is_refused_before_anything_changes(cls, backend):
    """An expanded param (its elements share memory) cannot be updated in place; torch.optim
    raises on it too (and with fused=True writes out of bounds). The error names it."""
    base = torch.randn(1, 3)
    expanded = torch.nn.Parameter(base.expand(4, 3))
    dense = torch.nn.Parameter(torch.randn(3))
    expanded.grad, dense.grad = torch.randn(4, 3), torch.randn(3)
    before = (base.clone(), dense.detach().clone())
    opt = cls([dense, expanded], lr=1e-2, backend=backend)
    with pytest.raises(RuntimeError, match=r"param \(group 0, index 1\) overlaps itself"):
        opt.step()
    assert torch.equal(base, before[0]) and torch.equal(dense, before[1])
    with pytest.raises(RuntimeError, match="more than one element"):
        torch.optim.SGD([expanded], lr=1e-2).step()


def _layout_model(device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 3 * 3, 5))  # fmt: skip
    return model.to(device)


def _layout_swaps(model: torch.nn.Module, swap: str) -> None:
    """Swap every multi-dim param's ``.data`` for one of the same values in a new layout."""
    if swap == "channels_last":
        model.to(memory_format=torch.channels_last)
        assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
        return
    for p in model.parameters():
        if p.dim() == 2:
            p.data = p.data.t().contiguous().t()  # column-major
            assert not p.is_contiguous()


@pytest.mark.parametrize("device,backend", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("swap", ["channels_last", "column_major"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_a_layout_change_after_stepping_re_lays_the_states(case, swap, device, backend):
    """[note: re-laid state]: ``model.to(memory_format=torch.channels_last)`` (or a
    column-major ``.data`` swap) between steps: the states follow the params' new layout,
    values kept, and the run goes on as the same run without the swap, and as torch's."""
    runs = {}
    for name in ("swapped", "kept", "torch"):
        if name == "torch" and case.torch_cls is None:
            continue
        model = _layout_model(device)
        opt = (case.torch_cls(model.parameters(), **case.torch_kwargs) if name == "torch"
               else case.cls(model.parameters(), **case.kwargs, backend=backend))  # fmt: skip
        runs[name] = (model, opt)
    gen = torch.Generator().manual_seed(2)
    for step in range(4):
        x = torch.randn(2, 3, 5, 5, generator=gen).to(device)
        if step == 2:
            for name in ("swapped", "torch"):
                if name in runs:
                    _layout_swaps(runs[name][0], swap)
        for model, opt in runs.values():
            opt.zero_grad()
            model(x).square().sum().backward()
            opt.step()
    swapped, kept = runs["swapped"], runs["kept"]
    for p, q in zip(swapped[0].parameters(), kept[0].parameters(), strict=True):
        assert_close(p, q, TOLERANCES[torch.float32], "swapped vs kept")
        for key, value in swapped[1].state[p].items():
            assert value.dim() == 0 or value.stride() == p.stride(), key
            assert_close(value, kept[1].state[q][key], TOLERANCES[torch.float32], key)
    if "torch" in runs:
        for p, q in zip(swapped[0].parameters(), runs["torch"][0].parameters(), strict=True):
            assert_close(p, q, TORCH_TOLERANCE, "swapped vs torch")


@pytest.mark.parametrize("backend", usable_backends("cpu"))
def test_a_master_is_re_laid_with_its_param(backend):
    """A bf16 param with an fp32 master: after a channels_last swap of its ``.data`` the master
    follows, and the param stays the master rounded, bit for bit."""
    model = _layout_model("cpu").to(torch.bfloat16)
    opt = fusedopt.AdamW(model.parameters(), lr=1e-2, master_weights=True, backend=backend)
    x = torch.randn(2, 3, 5, 5, dtype=torch.bfloat16)
    for step in range(3):
        if step == 1:
            model.to(memory_format=torch.channels_last)
        opt.zero_grad()
        model(x).float().square().sum().backward()
        opt.step()
    weight = model[0].weight
    master = opt.state[weight]["master_param"]
    assert master.stride() == weight.stride() and opt.state[weight]["exp_avg"].stride() == (
        weight.stride()
    )
    assert torch.equal(weight, master.to(torch.bfloat16))


def test_a_shape_change_after_stepping_raises_saying_what_changed():
    model = _layout_model("cpu")
    opt = fusedopt.AdamW(model.parameters(), lr=1e-2)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    weight = model[2].weight
    weight.data = torch.zeros(5, 4 * 3 * 3 + 1)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    with pytest.raises(
        RuntimeError,
        match=r"state 'exp_avg' of param \(group 0, index 2\) no "
        r"longer fits it: it has shape \(5, 36\) but the param now has \(5, 37\)",
    ):
        opt.step()


@pytest.mark.parametrize("backend", usable_backends("cpu"))
def test_an_expanded_grad_is_read_as_its_copy(backend):
    """A grad that overlaps itself (``expand``, as a broadcast backward may leave) is only
    read: the clip norm and the step take it as its contiguous copy, as torch does."""
    p = torch.nn.Parameter(torch.randn(4, 3))
    q = torch.nn.Parameter(p.detach().clone())
    p.grad = torch.randn(1, 3).expand(4, 3)
    q.grad = p.grad.contiguous()
    for param in (p, q):
        fusedopt.AdamW([param], lr=1e-2, max_grad_norm=0.1, backend=backend).step()
    assert torch.equal(p, q)
