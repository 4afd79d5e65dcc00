"""state_dict: exact round trips, torch.optim interchange, and state dicts that do not fit."""

from __future__ import annotations

import copy

import pytest
import torch
from optim_cases import (
    CASE_IDS,
    CASES,
    TORCH_TOLERANCE,
    assert_close,
    clone_params,
    make_model,
    random_grads,
)

import fusedopt


def _train(opt, params, seeds):
    for seed in seeds:
        random_grads(params, seed)
        opt.step()


@pytest.mark.parametrize("master", [False, True])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_round_trip_is_exact(case, master):
    dtype = torch.bfloat16 if master else torch.float32
    params = clone_params(make_model(), dtype)
    opt = case.cls(params, **case.kwargs, master_weights=master)
    _train(opt, params, range(3))
    saved = copy.deepcopy(opt.state_dict())
    if master:
        assert all("master_param" in s for s in saved["state"].values())
    twin_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    twin = case.cls(twin_params, **case.kwargs, master_weights=master)
    twin.load_state_dict(saved)
    reloaded = twin.state_dict()
    assert reloaded["param_groups"] == saved["param_groups"]
    for pid, state in saved["state"].items():
        assert set(reloaded["state"][pid]) == set(state)
        for key, value in state.items():
            assert reloaded["state"][pid][key].dtype == value.dtype
            assert torch.equal(reloaded["state"][pid][key], value), key
    _train(opt, params, range(3, 6))
    _train(twin, twin_params, range(3, 6))
    for p, q in zip(params, twin_params, strict=True):
        assert torch.equal(p, q)


TORCH_CASES = [case for case in CASES if case.torch_cls is not None]


@pytest.mark.parametrize("case", TORCH_CASES, ids=[c.name for c in TORCH_CASES])
def test_torch_state_dict_loads_and_goes_back(case):
    """torch trains 3 steps -> fusedopt loads and trains 3 -> torch loads and trains 3; equal
    to torch alone for 9 steps."""
    ref_params = clone_params(make_model(), torch.float32)
    ref = case.torch_cls(ref_params, **case.torch_kwargs)
    _train(ref, ref_params, range(9))

    params = clone_params(make_model(), torch.float32)
    torch_opt = case.torch_cls(params, **case.torch_kwargs)
    _train(torch_opt, params, range(3))
    ours = case.cls(params, **case.kwargs)
    ours.load_state_dict(copy.deepcopy(torch_opt.state_dict()))
    for state in ours.state.values():
        if "step" in state:
            assert state["step"].dtype == torch.float32 and state["step"].dim() == 0
    _train(ours, params, range(3, 6))
    back = case.torch_cls(params, **case.torch_kwargs)
    back.load_state_dict(copy.deepcopy(ours.state_dict()))
    _train(back, params, range(6, 9))
    for i, (p, q) in enumerate(zip(params, ref_params, strict=True)):
        assert_close(p, q, TORCH_TOLERANCE, f"param {i}")


def test_torch_sgd_state_without_step_gets_step_one():
    params = clone_params(make_model(), torch.float32)
    torch_opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    _train(torch_opt, params, range(1))
    ours = fusedopt.SGD(params, lr=0.1, momentum=0.9)
    ours.load_state_dict(torch_opt.state_dict())
    for state in ours.state.values():
        assert state["step"].item() == 1.0
    # The next step must use the loaded buffer (buf = mu*buf + g), not restart it (buf = g).
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    torch_twin = torch.optim.SGD(twin, lr=0.1, momentum=0.9)
    torch_twin.load_state_dict(torch_opt.state_dict())
    _train(ours, params, [7])
    _train(torch_twin, twin, [7])
    for p, q in zip(params, twin, strict=True):
        assert_close(p, q, TORCH_TOLERANCE, "after load")


def _trained_adamw():
    params = clone_params(make_model(), torch.float32)
    opt = fusedopt.AdamW(params, lr=1e-2)
    _train(opt, params, range(2))
    return params, opt


def _snapshot(opt, params):
    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())


def _unchanged(opt, params, before):
    values, sd = before
    assert all(torch.equal(p, v) for p, v in zip(params, values, strict=True))
    now = opt.state_dict()
    assert now["param_groups"] == sd["param_groups"]
    for pid, state in sd["state"].items():
        for key, value in state.items():
            assert torch.equal(now["state"][pid][key], value)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda sd: sd["state"][1].__setitem__("exp_avg", torch.zeros(2, 2)), "group 0, index 1"),
        (lambda sd: sd["state"][2].__setitem__("momentum_buffer", torch.zeros(1)), "unknown state"),
        (lambda sd: sd["param_groups"].append(dict(sd["param_groups"][0])), "number of parameter"),
        (lambda sd: sd["param_groups"][0]["params"].pop(), "size of optimizer's group"),
        (lambda sd: sd["param_groups"][0].__setitem__("eps", -1.0), "Invalid epsilon"),
        (lambda sd: sd["state"][0].__setitem__("step", torch.zeros(3)), "step must hold one"),
    ],
    ids=["shape", "unknown-key", "groups", "params", "hyper", "step"],
)
def test_state_dict_that_does_not_fit_raises_before_changing_anything(mutate, match):
    params, opt = _trained_adamw()
    before = _snapshot(opt, params)
    bad = copy.deepcopy(opt.state_dict())
    mutate(bad)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(bad)
    _unchanged(opt, params, before)


def test_master_param_for_fp32_param_is_refused():
    params, opt = _trained_adamw()
    bad = copy.deepcopy(opt.state_dict())
    bad["state"][0]["master_param"] = params[0].detach().clone()
    with pytest.raises(ValueError, match="master_param"):
        opt.load_state_dict(bad)


def test_state_replaced_by_hand_that_does_not_fit_raises_before_changing_anything():
    params, opt = _trained_adamw()
    before = [p.detach().clone() for p in params]
    p = next(q for q in params if q.dim() == 2)
    opt.state[p]["exp_avg"] = torch.zeros(p.shape[::-1])
    _train_error = pytest.raises(RuntimeError, match="state 'exp_avg' of param")
    with _train_error:
        _train(opt, params, [9])
    assert all(torch.equal(q, b) for q, b in zip(params, before, strict=True))


def test_loaded_states_take_the_params_memory_layout():
    """A channels_last param loads contiguous saved states into its own layout (the kernels
    pair elements by position) and steps as torch does."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(4, 3, 2, 2).to(memory_format=torch.channels_last))
    twin = torch.nn.Parameter(weight.detach().clone())
    ref = torch.optim.AdamW([twin], lr=1e-2)
    _train(ref, [twin], range(2))
    saved = copy.deepcopy(ref.state_dict())
    for key in ("exp_avg", "exp_avg_sq"):
        saved["state"][0][key] = saved["state"][0][key].contiguous()
    with torch.no_grad():
        weight.copy_(twin)
    ours = fusedopt.AdamW([weight], lr=1e-2)
    ours.load_state_dict(saved)
    assert ours.state[weight]["exp_avg"].stride() == weight.stride()
    _train(ours, [weight], [5])
    _train(ref, [twin], [5])
    assert_close(weight, twin, TORCH_TOLERANCE, "channels_last")


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_loaded_groups_and_states_are_copies_not_shared_with_the_source(case):
    """torch deep-copies the saved groups (issue #13, item 4): a scheduler's in-place update
    of the source's tensor lr must not reach the loaded optimizer, nor the source's steps."""
    params = clone_params(make_model(), torch.float32)
    lr = case.kwargs.get("lr", 1e-3)
    source = case.cls(params, **{**case.kwargs, "lr": torch.tensor(lr)})
    _train(source, params, range(2))
    twin_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    twin = case.cls(twin_params, **{**case.kwargs, "lr": torch.tensor(lr)})
    twin.load_state_dict(source.state_dict())
    loaded_lr = twin.param_groups[0]["lr"]
    assert loaded_lr is not source.param_groups[0]["lr"]
    source.param_groups[0]["lr"].fill_(123.0)  # what LRScheduler does to a tensor lr
    assert float(loaded_lr) == float(torch.tensor(lr))
    for p, q in zip(params, twin_params, strict=True):
        for key, value in source.state[p].items():
            assert twin.state[q][key].data_ptr() != value.data_ptr(), key


# ----------------------------------------------------------------------------- LAMB's group step
def _lamb_and_params(**kwargs):
    params = clone_params(make_model(), torch.float32)
    return fusedopt.LAMB(params, lr=1e-2, weight_decay=0.0, **kwargs), params


def _timm_state_dict(opt, step):
    """What timm's ``Lamb.state_dict()`` holds: per param only the moments, the step count in
    each group (an int in timm 0.x, a 0-d fp32 tensor in timm 1.x); timm's group keys."""
    saved = copy.deepcopy(opt.state_dict())
    for state in saved["state"].values():
        state.pop("step", None)
    for group in saved["param_groups"]:
        for key in ("capturable", "master_weights", "backend"):
            group.pop(key)
        group.update(step=step, corrected_weight_decay=False, foreach=None)
    return saved


@pytest.mark.parametrize("step_form", ["int", "tensor"])
def test_lamb_loads_a_timm_state_dict_and_continues_its_count(step_form):
    """issue #13, item 5: timm's ``group['step']`` is the count the bias corrections continue
    from (before, it was dropped and the count restarted at 0)."""
    opt, params = _lamb_and_params()
    _train(opt, params, range(3))
    saved = _timm_state_dict(opt, 3 if step_form == "int" else torch.tensor(3.0))
    twin, twin_params = _lamb_and_params()
    for p, q in zip(params, twin_params, strict=True):
        q.data.copy_(p)
    twin.load_state_dict(saved)
    _train(opt, params, range(3, 6))
    _train(twin, twin_params, range(3, 6))
    for p, q in zip(params, twin_params, strict=True):
        assert torch.equal(p, q)
    assert float(twin.param_groups[0]["step"]) == 6.0


def test_lamb_saves_one_step_per_group_in_timms_form():
    opt, params = _lamb_and_params()
    opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(4))]})  # never has a grad
    _train(opt, params, range(2))
    saved = opt.state_dict()
    _train(opt, params, range(2, 3))
    for group in saved["param_groups"]:  # timm counts a group without grads too
        assert isinstance(group["step"], torch.Tensor) and float(group["step"]) == 2.0
        assert group["step"].dtype == torch.float32
    assert all(set(state) == {"exp_avg", "exp_avg_sq"} for state in saved["state"].values())
    assert [float(g["step"]) for g in opt.param_groups] == [3.0, 3.0]


def test_lamb_loads_an_older_per_param_step_dict_with_the_largest_count():
    """Older fusedopt LAMB dicts counted per param; the group count becomes their largest."""
    opt, params = _lamb_and_params()
    _train(opt, params, range(4))
    saved = copy.deepcopy(opt.state_dict())
    for group in saved["param_groups"]:
        del group["step"]
    for pid, state in saved["state"].items():
        state["step"] = torch.tensor(4.0 if pid == 0 else 2.0)
    twin, twin_params = _lamb_and_params()
    for p, q in zip(params, twin_params, strict=True):
        q.data.copy_(p)
    twin.load_state_dict(saved)
    assert float(twin.param_groups[0]["step"]) == 4.0
    assert all("step" not in twin.state[p] for p in twin_params)
    _train(opt, params, range(4, 6))
    _train(twin, twin_params, range(4, 6))
    for p, q in zip(params, twin_params, strict=True):
        assert torch.equal(p, q)


def test_lamb_skipped_step_keeps_the_count_and_the_op_gets_distinct_step_tensors(monkeypatch):
    """A found_inf step leaves the group count as it was; the op's per-param step tensors are
    distinct (it increments each), all holding the group count ([note: LAMB group step])."""
    seen = []
    real = fusedopt.ops.step

    def spy(op, lists, *args, **kwargs):
        seen.append([(t.data_ptr(), float(t)) for t in lists["steps"]])
        return real(op, lists, *args, **kwargs)

    monkeypatch.setattr(fusedopt.ops, "step", spy)
    opt, params = _lamb_and_params()
    _train(opt, params, range(2))
    before = [p.detach().clone() for p in params]
    opt.found_inf = torch.tensor(1.0)
    _train(opt, params, range(2, 3))
    del opt.found_inf
    assert float(opt.param_groups[0]["step"]) == 2.0
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
    _train(opt, params, range(3, 4))
    assert float(opt.param_groups[0]["step"]) == 3.0
    for call, count in zip(seen, [0.0, 1.0, 2.0, 2.0], strict=True):
        assert len({ptr for ptr, _ in call}) == len(call)
        assert {value for _, value in call} == {count}
