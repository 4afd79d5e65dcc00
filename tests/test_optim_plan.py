"""[note: cached plan]: a step reuses the last step's op calls while nothing they were built
from changed, and every change makes it plan again, so that a cached step always equals a
step planned from scratch."""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
from optim_cases import clone_params, make_model, random_grads

import fusedopt
from fusedopt.optim import _plan
from fusedopt.optim._base import FusedOptimizer

CLASSES = [
    (fusedopt.AdamW, {}),
    (fusedopt.SGD, {"momentum": 0.9}),
    (fusedopt.Lion, {}),
    (fusedopt.LAMB, {}),
]
IDS = [cls.__name__ for cls, _ in CLASSES]


@pytest.fixture(autouse=True, params=["native", "python"])
def per_tensor_check(request, monkeypatch):
    """Every test runs with the per-tensor part of the per-step check in C++ (fusedopt._C's
    plan_grads) and in Python (the fallback where _C is not built)."""
    if request.param == "python":
        monkeypatch.setattr(_plan, "_native_check", lambda: None)
    elif _plan._native_check() is None:
        pytest.skip("fusedopt._C is not built")
    return request.param


@pytest.fixture
def plan_builds(count_calls):
    """Counts the steps that planned from scratch."""
    return count_calls(FusedOptimizer, "_plan")


@pytest.mark.parametrize("cls,kwargs", CLASSES, ids=IDS)
def test_steady_steps_plan_once(cls, kwargs, plan_builds):
    """New grads every step and an lr schedule change nothing the plan holds."""
    params = clone_params(make_model(), torch.float32)
    opt = cls([{"params": params[:2]}, {"params": params[2:], "lr": 1e-3}], lr=1e-2, **kwargs)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for step in range(5):
        random_grads(params[:-1], step)
        opt.step()
        sched.step()
    assert plan_builds[0] == 1


def _unused_gets_a_grad(params, opt):
    params[-1].grad = torch.ones_like(params[-1])


def _grad_dropped(params, opt):
    params[0].grad = None


def _amsgrad_on(params, opt):
    opt.param_groups[0]["amsgrad"] = True


def _new_group(params, opt):
    """(The optimizer of this case does not hold the last param at first.)"""
    opt.add_param_group({"params": [params[-1]], "lr": 1e-3})
    params[-1].grad = torch.ones_like(params[-1])


def _state_replaced(params, opt):
    """A state tensor replaced by one that fits: the step must update the new one."""
    state = opt.state[params[0]]
    state["exp_avg"] = state["exp_avg"].clone() * 0.5


def _state_dict_replaced(params, opt):
    """A param's whole state dict replaced by a new one: the step must use the new one."""
    opt.state[params[0]] = {k: v.clone() * 0.5 for k, v in opt.state[params[0]].items()}


def _state_dict_loaded(params, opt):
    saved = copy.deepcopy(opt.state_dict())
    for state in saved["state"].values():
        state["exp_avg_sq"] = state["exp_avg_sq"] * 2.0
    opt.load_state_dict(saved)


def _param_data_swapped(params, opt):
    """The same param object with new storage of the same layout steps that storage: no new
    plan needed (the plan holds the param, not its storage)."""
    params[1].data = params[1].data.clone() + 1.0


def _grad_in_fp32(params, opt):
    for p in params:
        if p.grad is not None:
            p.grad_dtype = None  # torch >= 2.10 checks a grad's dtype unless told not to
            p.grad = p.grad.float()


def _param_data_relaid(params, opt):
    """A column-major ``.data`` of the same values: the states are re-laid ([note: re-laid
    state])."""
    for p in params:
        if p.dim() == 2:
            p.data = p.data.t().contiguous().t()


def _param_data_reshaped(params, opt):
    """A ``.data`` of another shape (with a grad that fits it): the states no longer fit, which
    only a new plan finds."""
    p = next(p for p in params if p.dim() == 2)
    p.data = p.data.reshape(-1)
    p.grad = p.grad.reshape(-1)


def _grad_of_other_strides(params, opt):
    """A grad of the right shape in another memory layout: copied into the param's layout
    ([note: cached plan] compares strides)."""
    for p in params:
        if p.dim() == 2 and p.grad is not None:
            p.grad = p.grad.t().contiguous().t()


def _weight_decay_changed(params, opt):
    """Hyperparameters are read every step: no new plan needed."""
    opt.param_groups[0]["weight_decay"] = 0.5


def _param_removed_from_group(params, opt):
    """``group["params"]`` edited by hand: the removed param (it keeps its grad) is no longer
    stepped."""
    opt.param_groups[0]["params"].pop(0)


def _requires_grad_off(params, opt):
    """A param that no longer requires grad but still has one is stepped, as torch does: no
    new plan needed."""
    params[0].requires_grad_(False)


def _state_key_deleted(params, opt):
    """A state tensor deleted by hand is made again (zeros), as in a fresh plan."""
    del opt.state[params[0]]["exp_avg"]


def _param_state_dropped(params, opt):
    """A param's whole state dropped from ``opt.state``: made again."""
    del opt.state[params[0]]


def _state_dict_replaced_by_a_mapping(params, opt):
    """A param's state replaced by a dict subclass: the check looks its tensors up through
    the mapping's own ``__getitem__`` from then on."""
    opt.state[params[0]] = OrderedDict(
        (k, v.clone() * 0.5) for k, v in opt.state[params[0]].items()
    )


#: Changes made once, before the third step.
ONCE = [_amsgrad_on, _new_group, _state_replaced, _state_dict_replaced, _state_dict_loaded,
        _param_data_swapped, _param_data_relaid, _weight_decay_changed,
        _param_removed_from_group, _requires_grad_off, _state_key_deleted,
        _param_state_dropped, _state_dict_replaced_by_a_mapping]  # fmt: skip
#: Changes to the grads, made before every step from the third on.
EVERY_STEP = [_unused_gets_a_grad, _grad_dropped, _grad_in_fp32, _grad_of_other_strides]
CHANGES = ONCE + EVERY_STEP


def _cached_and_fresh(make_opt, change, dtype=torch.float32):
    """Four steps of an optimizer that caches its plan and of one that plans every step,
    ``change`` applied before the third (and, for EVERY_STEP changes, each later) step; both
    must end with the same params and states, bit for bit. Returns the cached run."""
    model = make_model()
    runs = []
    for cache in (True, False):
        params = clone_params(model, dtype)
        opt = make_opt(params)
        for step in range(4):
            random_grads(params[:-1], step)
            if step == 2 or (step > 2 and change in EVERY_STEP):
                change(params, opt)
            if not cache:
                opt._step_out.pop("plan", None)
            opt.step()
        runs.append((params, opt))
    (params, opt), (fresh, fresh_opt) = runs
    for p, q in zip(params, fresh, strict=True):
        assert torch.equal(p, q)
    assert len(opt.state) == len(fresh_opt.state)
    for p, q in zip(params, fresh, strict=True):
        got, want = opt.state.get(p, {}), fresh_opt.state.get(q, {})
        assert got.keys() == want.keys()
        for key in got:
            assert torch.equal(got[key], want[key]), key
    return params, opt


@pytest.mark.parametrize("change", CHANGES, ids=[c.__name__.strip("_") for c in CHANGES])
def test_a_change_plans_again_and_equals_a_fresh_plan(change, plan_builds):
    """After each change the cached optimizer steps exactly as one that plans every step."""
    _cached_and_fresh(
        lambda params: fusedopt.AdamW(params[:-1] if change is _new_group else params, lr=1e-2),
        change,
        torch.bfloat16 if change is _grad_in_fp32 else torch.float32,
    )
    # The cached run planned at its first step and once more after a change that needs it;
    # the fresh run planned at every one of its 4 steps. After _param_data_relaid the grads
    # _grads makes stay contiguous while the params are column-major: each is copied into its
    # param's layout, a step the plan does not cache, so both later steps plan; so do the grads
    # _grad_of_other_strides makes.
    replans = {_param_data_swapped: 0, _weight_decay_changed: 0, _requires_grad_off: 0,
               _param_data_relaid: 2, _grad_of_other_strides: 2}  # fmt: skip
    replans = replans.get(change, 1)
    assert plan_builds[0] == 1 + replans + 4


@pytest.mark.parametrize(
    "spoil,match",
    [
        (lambda s: s.__setitem__("exp_avg", s["exp_avg"][:, :-1].clone()), "exp_avg"),
        (lambda s: s.__setitem__("exp_avg_sq", s["exp_avg_sq"].double()), "exp_avg_sq"),
    ],
    ids=["shape", "dtype"],
)
def test_a_state_spoiled_after_planning_raises_before_any_change(spoil, match):
    params = clone_params(make_model(), torch.float32)
    opt = fusedopt.AdamW(params, lr=1e-2)
    random_grads(params[:-1], 0)
    opt.step()
    target = next(i for i, p in enumerate(params) if p.dim() == 2)
    spoil(opt.state[params[target]])
    before = [p.detach().clone() for p in params]
    steps = [s["step"].clone() for s in opt.state.values()]
    random_grads(params[:-1], 1)
    where = f"state '{match}' of param \\(group 0, index {target}\\)"
    with pytest.raises(RuntimeError, match=where):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
    assert all(torch.equal(s["step"], b) for s, b in zip(opt.state.values(), steps, strict=True))


def test_a_state_set_by_hand_in_another_layout_is_re_laid(plan_builds):
    """[note: re-laid state]: a state replaced by a column-major copy of itself is copied back
    into its param's layout (values kept) when the step plans again, and the step equals one
    that never saw the swap."""
    runs = []
    for swap in (False, True):
        params = clone_params(make_model(), torch.float32)
        opt = fusedopt.AdamW(params, lr=1e-2)
        random_grads(params[:-1], 0)
        opt.step()
        target = next(p for p in params if p.dim() == 2)
        if swap:
            state = opt.state[target]
            state["exp_avg"] = state["exp_avg"].t().contiguous().t()
        random_grads(params[:-1], 1)
        opt.step()
        assert opt.state[target]["exp_avg"].stride() == target.stride()
        runs.append((params, opt))
    for p, q in zip(runs[0][0], runs[1][0], strict=True):
        assert torch.equal(p, q)
        for key, value in runs[0][1].state[p].items():
            assert torch.equal(value, runs[1][1].state[q][key]), key


def test_non_dense_params_plan_once(plan_builds):
    """[note: non-dense params]: a strided-view param (with the contiguous grad autograd gives
    it) keeps the cached plan from step to step, and steps as a dense copy does."""
    base = torch.randn(6, 10)
    strided = torch.nn.Parameter(base[:, ::2])
    dense = torch.nn.Parameter(strided.detach().clone())
    opts = [fusedopt.AdamW([p], lr=1e-2) for p in (strided, dense)]
    for step in range(4):
        x = torch.randn(3, 6, generator=torch.Generator().manual_seed(step))
        for p, opt in zip((strided, dense), opts, strict=True):
            opt.zero_grad()
            (x @ p).square().sum().backward()
            assert p.grad.is_contiguous()
            opt.step()
    assert plan_builds[0] == 2  # once per optimizer
    assert torch.equal(strided, dense) and torch.equal(base[:, ::2], dense)


def test_param_changed_dtype_after_planning_raises():
    params = clone_params(make_model(), torch.float32)
    opt = fusedopt.AdamW(params, lr=1e-2)
    random_grads(params[:-1], 0)
    opt.step()
    params[0].data = params[0].data.double()
    random_grads(params[:-1], 1)
    with pytest.raises(RuntimeError, match="no longer fits"):
        opt.step()


def test_param_changed_shape_after_planning_raises():
    """A ``.data`` swap to another shape, its grad reshaped alike: the per-step check sees it
    (else the step would pair the param with states of the old shape)."""
    params = clone_params(make_model(), torch.float32)
    opt = fusedopt.AdamW(params, lr=1e-2)
    random_grads(params[:-1], 0)
    opt.step()
    random_grads(params[:-1], 1)
    _param_data_reshaped(params, opt)
    with pytest.raises(RuntimeError, match=r"has shape .* but the param now has"):
        opt.step()


def test_a_sparse_param_without_a_grad_keeps_the_plan(plan_builds):
    """A sparse param that has no grad (nothing to step; it has no strides to record) does
    not stop the plan of the others from being cached; once it gets a grad, the step plans
    again and rejects it, as a fresh plan does."""
    dense = torch.nn.Parameter(torch.randn(3))
    sparse = torch.sparse_coo_tensor([[0, 2]], [1.0, 2.0], (4,), check_invariants=False)
    sparse.requires_grad_()
    opt = fusedopt.AdamW([dense, sparse], lr=1e-2)
    for _ in range(3):
        dense.grad = torch.randn(3)
        opt.step()
    assert plan_builds[0] == 1
    sparse.grad = sparse.detach().clone()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def _forget_by_add_param_group(opt, params):
    opt.add_param_group({"params": [params[-1]]})


def _forget_by_load_state_dict(opt, params):
    opt.load_state_dict(opt.state_dict())


def _forget_by_setstate(opt, params):
    opt.__setstate__(opt.__getstate__())


FORGETS = [_forget_by_add_param_group, _forget_by_load_state_dict, _forget_by_setstate]


@pytest.mark.parametrize("change", FORGETS, ids=[c.__name__[11:] for c in FORGETS])
def test_the_optimizers_own_changes_forget_the_plan_at_once(change, plan_builds):
    """[note: cached plan]: what the optimizer changes itself drops the plan where it changes
    it, not at the next step's check; the next step plans again."""
    params = clone_params(make_model(), torch.float32)
    opt = fusedopt.AdamW(params[:-1], lr=1e-2)
    random_grads(params[:-1], 0)
    opt.step()
    assert "plan" in opt._step_out
    change(opt, params)
    assert "plan" not in opt._step_out
    random_grads(params[:-1], 1)
    opt.step()
    assert plan_builds[0] == 2


def test_the_native_check_holds_a_record_only_plan_record_made(per_tensor_check):
    """plan_grads trusts its argument only if plan_record made it (the record's storage
    deleter); anything else, a copy of a record too, raises."""
    if per_tensor_check != "native":
        pytest.skip("the C++ check")
    native = _plan._native_check()
    record_op, grads_op = native.record, native.grads
    params = clone_params(make_model(), torch.float32)
    random_grads(params[:-1], 0)
    record = record_op(params)
    matched, grads = grads_op(record)
    assert matched and len(grads) == len(params) - 1
    assert all(g is p.grad for g, p in zip(grads, params, strict=False))
    for other in (torch.empty(0, dtype=torch.uint8), record.clone(), copy.deepcopy(record)):
        with pytest.raises(RuntimeError, match="not a tensor plan_record made"):
            grads_op(other, True)
        with pytest.raises(RuntimeError, match="not a tensor plan_record made"):
            native.grad_norm(other, "cpu", 2.0, None)


def _sgd_momentum_on(params, opt):
    opt.param_groups[0]["momentum"] = 0.9


def test_sgd_momentum_switched_on_plans_again(plan_builds):
    """SGD's state keys follow its momentum (a schedule may cycle it away from 0): the step
    after the switch creates buffers, as a fresh plan does."""
    params, opt = _cached_and_fresh(
        lambda params: fusedopt.SGD(params, lr=1e-2, momentum=0.0), _sgd_momentum_on
    )
    assert "momentum_buffer" in opt.state[params[0]]
    assert plan_builds[0] == 2 + 4


@pytest.mark.parametrize("cls,kwargs", CLASSES, ids=IDS)
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "amp"])
def test_a_cached_step_looks_up_no_param(cls, kwargs, amp, monkeypatch):
    """[note: cached plan]: the per-step check runs over whole lists; it looks up no param in
    ``self.state`` (or any dict), since a tensor's ``__hash__`` is a Python call per param:
    the host time per step was ~3 us per tensor with one lookup and a dozen comparisons per
    param (issue #14 item 5)."""
    dtype = torch.bfloat16 if amp else torch.float32
    params = clone_params(make_model(), dtype)
    extra = {"master_weights": True, "max_grad_norm": 1.0} if amp else {}
    opt = cls(params, lr=1e-2, **kwargs, **extra)
    for step in range(2):
        random_grads(params[:-1], step)
        opt.step()
    hashes = [0]
    real = torch.Tensor.__hash__

    def counting(self):
        hashes[0] += 1
        return real(self)

    monkeypatch.setattr(torch.Tensor, "__hash__", counting)
    random_grads(params[:-1], 2)
    opt.step()
    monkeypatch.undo()
    assert hashes[0] == 0


@pytest.mark.parametrize("cls,kwargs", CLASSES, ids=IDS)
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "amp"])
def test_planned_calls_step_as_the_op_calls(cls, kwargs, amp, per_tensor_check, count_calls):
    """[note: planned calls]: with fusedopt._C, a cached plan's calls hand their lists to C++
    once and every step passes only the handle (no ``ops.step``, so the dispatcher converts
    no list; LAMB, whose ``_run`` steps per group, keeps ``ops.step``); the params and states
    come out bit for bit as from the op calls with lists."""
    if per_tensor_check != "native":
        pytest.skip("the planned calls need fusedopt._C")
    dtype = torch.bfloat16 if amp else torch.float32
    extra = {"master_weights": True, "max_grad_norm": 1.0} if amp else {}
    planned_params = clone_params(make_model(), dtype)
    listed_params = clone_params(make_model(), dtype)

    def make(params):
        return cls([{"params": params[:2]}, {"params": params[2:], "lr": 1e-3}], lr=1e-2,
                   backend="cpu", **kwargs, **extra)  # fmt: skip

    planned, listed = make(planned_params), make(listed_params)
    op_calls = count_calls(fusedopt.ops, "step")
    planned_calls = count_calls(FusedOptimizer, "_run_planned")
    _step_three_times(planned, planned_params)
    uses_plan = cls._run is FusedOptimizer._run
    assert (op_calls[0] == 0) == uses_plan and (planned_calls[0] == 3) == uses_plan
    _assert_listed_steps_equal(planned, planned_params, listed, listed_params, amp)


def _step_three_times(optimizer, params):
    for step in range(3):
        random_grads(params[:-1], step)
        optimizer.step()


def _assert_listed_steps_equal(planned, planned_params, listed, listed_params, amp):
    """Step `listed` as `planned` was stepped, but with its lists kept in Python and its grads
    checked in Python for the norm pass, and assert that both ended bit for bit equal."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_plan, "native_calls", lambda: None)
        patch.setattr(_plan._Plan, "checked_grads", property(lambda self: False))
        _step_three_times(listed, listed_params)
    assert all(c.native is None for c in listed._step_out["plan"].calls)
    if amp:
        assert torch.equal(planned.last_grad_norm, listed.last_grad_norm)
    for p, q in zip(planned_params, listed_params, strict=True):
        assert torch.equal(p, q)
        got, want = planned.state.get(p, {}), listed.state.get(q, {})
        assert got.keys() == want.keys()
        for key in got:
            assert torch.equal(got[key], want[key]), key


def test_a_planned_call_keeps_the_ops_checks(per_tensor_check):
    """A state resized in place after planning is not seen by the plan (as in torch), but
    the op's own checks still run on a planned call: it raises naming the list, before any
    tensor is touched ([note: planned calls])."""
    params = clone_params(make_model(), torch.float32)
    opt = fusedopt.AdamW(params, lr=1e-2, backend="cpu")
    random_grads(params[:-1], 0)
    opt.step()
    target = next(i for i, p in enumerate(params) if p.dim() == 2)
    opt.state[params[target]]["exp_avg"].resize_(1)
    before = [p.detach().clone() for p in params]
    steps = [s["step"].clone() for s in opt.state.values()]
    random_grads(params[:-1], 1)
    with pytest.raises(RuntimeError, match=rf"exp_avgs\[{target}\] has shape \[1\]"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
    assert all(torch.equal(s["step"], b) for s, b in zip(opt.state.values(), steps, strict=True))


def test_plan_call_step_takes_only_a_handle_plan_call_made(per_tensor_check):
    """plan_call_step trusts its argument only if plan_call made it (its storage deleter)."""
    if per_tensor_check != "native":
        pytest.skip("the C++ planned calls")
    plan_call, plan_call_step = _plan.native_calls()
    record_op = _plan._native_check().record
    params = clone_params(make_model(), torch.float32)
    table = torch.zeros((1, 5), dtype=torch.float64)
    for other in (torch.empty(0, dtype=torch.uint8), record_op(params)):
        with pytest.raises(RuntimeError, match="not a tensor plan_call made"):
            plan_call_step(other, table, [len(params)], None, None, None, None)
    with pytest.raises(ValueError, match="no step op nope_"):
        plan_call("nope_", "cpu", params, [len(params), 0], [])


@pytest.mark.parametrize("cls,kwargs", CLASSES, ids=IDS)
def test_a_cached_norm_pass_runs_no_python_per_grad(cls, kwargs, count_calls):
    """The norm pass of a cached plan (clipping, fusedopt's scaler) takes the plan's word for
    its grads (plain, dense, one device: ``_Plan.checked_grads``): no Python check or
    bucketing runs per grad; the op still checks each in C++. At 1,000 tensors that took an
    amp step from ~3.4 to ~0.8 ms (2-core CPU VM, bench/host_time.py)."""
    from fusedopt import clip

    params = clone_params(make_model(), torch.bfloat16)
    opt = cls(params, lr=1e-2, master_weights=True, max_grad_norm=1.0, **kwargs)
    for step in range(2):
        random_grads(params[:-1], step)
        opt.step()
    checks = count_calls(fusedopt.ops, "check_tensor")
    locals_ = count_calls(clip, "local_tensor")
    random_grads(params[:-1], 2)
    opt.step()
    assert checks[0] == 0 and locals_[0] == 0
    assert opt.last_grad_norm is not None


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "amp"])
def test_planned_calls_take_their_grads_by_position(amp, per_tensor_check, count_calls):
    """[note: step grads]: the grads plan_grads holds for the step are in param order; a
    plan of several calls (params of two dtypes, interleaved) hands each call its own, by
    position, and the norm pass all of them: bit for bit as the op calls with lists."""
    if per_tensor_check != "native":
        pytest.skip("the planned calls need fusedopt._C")
    extra = {"master_weights": True, "max_grad_norm": 1.0} if amp else {}
    dtypes = [torch.float32, torch.bfloat16 if amp else torch.float64]

    def make_params():
        base = clone_params(make_model(), torch.float32)
        return [torch.nn.Parameter(p.detach().to(dtypes[i % 2])) for i, p in enumerate(base)]

    planned_params, listed_params = make_params(), make_params()
    planned = fusedopt.AdamW(planned_params, lr=1e-2, backend="cpu", **extra)
    listed = fusedopt.AdamW(listed_params, lr=1e-2, backend="cpu", **extra)
    planned_calls = count_calls(FusedOptimizer, "_run_planned")
    _step_three_times(planned, planned_params)
    assert len(planned._step_out["plan"].calls) == 2 and planned_calls[0] == 3 * 2
    _assert_listed_steps_equal(planned, planned_params, listed, listed_params, amp)


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "amp"])
def test_a_step_keeps_no_grad_alive(amp):
    """[note: step grads]: the grads a cached step reads in C++ are let go at the step's end,
    so ``zero_grad()`` frees them as it does without fusedopt."""
    import gc
    import weakref

    dtype = torch.bfloat16 if amp else torch.float32
    extra = {"master_weights": True, "max_grad_norm": 1.0} if amp else {}
    params = clone_params(make_model(), dtype)
    opt = fusedopt.AdamW(params, lr=1e-2, **extra)
    for step in range(3):
        random_grads(params[:-1], step)
        opt.step()
    assert "plan" in opt._step_out
    grads = [weakref.ref(p.grad) for p in params[:-1]]
    opt.zero_grad()
    gc.collect()
    assert all(g() is None for g in grads)


def test_a_step_under_a_dispatch_mode_takes_no_planned_call(count_calls):
    """[note: planned calls]: plan_call_step mutates tensors its schema does not show, which a
    tracer (make_fx, FakeTensorMode, functionalization: all dispatch modes) would record as
    pure; under a dispatch mode the step plans afresh and calls the ops with their lists,
    uses and caches no plan, and steps as in eager."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recording(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    runs = []
    for mode in (False, True):
        params = clone_params(make_model(), torch.float32)
        opt = fusedopt.AdamW(params, lr=1e-2, backend="cpu")
        random_grads(params[:-1], 0)
        opt.step()
        planned = count_calls(FusedOptimizer, "_run_planned")
        random_grads(params[:-1], 1)
        if mode:
            cached = opt._step_out["plan"]
            recording = Recording()
            with recording:
                opt.step()
            assert planned[0] == 0 and opt._step_out["plan"] is cached  # neither used nor set
            assert not any("plan_" in op for op in recording.ops)
            assert any("adamw" in op for op in recording.ops)
        else:
            opt.step()
        runs.append(params)
    for p, q in zip(*runs, strict=True):
        assert torch.equal(p, q)
