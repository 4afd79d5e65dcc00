"""``fusedopt.ScheduleFreeAdamW`` against the schedulefree package's ``AdamWScheduleFree`` (the
anchor): the constructor's names and defaults, trajectories over many steps (warmup, two
groups, ``r``, ``weight_lr_power``, weight decay, eval/train switches mid-run) on every
backend, the eval-mode refusal, state dicts in both directions (the trajectory continues),
master weights, clipping, both GradScalers (skipped steps do not advance the schedule) and
bad input that leaves the schedule as it was.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from optim_cases import TORCH_TOLERANCE, assert_close, usable_backends

import fusedopt
from fusedopt.reference.ops import join_master

schedulefree = pytest.importorskip("schedulefree")

BACKENDS = usable_backends("cpu")
SHAPES = [(7, 5), (5,), (3, 4, 2), (130,)]
#: The group keys the anchor advances on the host at every step: ours must be equal, exactly.
SCHEDULE_KEYS = ("k", "lr_max", "weight_sum", "scheduled_lr", "train_mode")
#: Two groups that differ in everything the schedule reads.
GROUPS = [
    dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, warmup_steps=6, r=0.0, weight_lr_power=2.0,
         weight_decay=0.05),
    dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6, warmup_steps=0, r=0.5, weight_lr_power=1.0,
         weight_decay=0.0),
]  # fmt: skip


def _params(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES]


def _groups(params):
    return [{"params": params[:2], **GROUPS[0]}, {"params": params[2:], **GROUPS[1]}]


def _set_grads(runs, step, dtype=torch.float32, scale=1.0, inf=False):
    """The same grads (rounded to ``dtype``) for every run's params; the anchor divides its
    grads in place, so each run gets its own copy."""
    gen = torch.Generator().manual_seed(100 + step)
    grads = [torch.randn(s, generator=gen).to(dtype) for s in SHAPES]
    if inf:
        grads[2].view(-1)[3] = float("inf")
    for params in runs:
        for p, g in zip(params, grads, strict=True):
            p.grad = (g.float() * scale).to(p.device, p.dtype)


def _assert_same_run(ours, ours_params, anchor, anchor_params, what, tol=TORCH_TOLERANCE):
    for g, h in zip(ours.param_groups, anchor.param_groups, strict=True):
        for key in SCHEDULE_KEYS:
            assert g[key] == h[key], f"{what}: group {key} {g[key]} != {h[key]}"
    for i, (p, q) in enumerate(zip(ours_params, anchor_params, strict=True)):
        assert_close(p, q, tol, f"{what}: param {i}")
        for key in ("z", "exp_avg_sq"):
            assert_close(ours.state[p][key], anchor.state[q][key], tol, f"{what}: {key} {i}")


def run_with_switches(backend: str, device: str = "cpu"):
    """40 steps from warmup on of ours (on ``device``) beside the anchor (on the CPU), two
    groups, eval()/train() switches (and an evaluation in eval mode) every 9 steps; returns
    (ours, its params, anchor, its params) in train mode. Shared with test_cuda_backend.py."""
    anchor_params = _params()
    ours_params = [torch.nn.Parameter(p.detach().to(device)) for p in _params()]
    ours = fusedopt.ScheduleFreeAdamW(_groups(ours_params), backend=backend)
    anchor = schedulefree.AdamWScheduleFree(_groups(anchor_params))
    anchor.train()
    ours.train()  # a no-op: ours starts in train mode
    for step in range(40):
        _set_grads([ours_params, anchor_params], step)
        ours.step()
        anchor.step()
        if step % 9 == 8:
            ours.eval()
            anchor.eval()
            _assert_same_run(ours, ours_params, anchor, anchor_params, f"eval after {step}")
            ours.train()
            anchor.train()
    return ours, ours_params, anchor, anchor_params


def test_constructor_names_and_defaults_are_the_anchors():
    ours = inspect.signature(fusedopt.ScheduleFreeAdamW).parameters
    theirs = inspect.signature(schedulefree.AdamWScheduleFree).parameters
    positional = [n for n, p in ours.items() if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert positional == list(theirs)
    for name, p in theirs.items():
        assert ours[name].default == p.default, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_trajectory_with_eval_train_switches_equals_the_anchor(backend):
    """40 steps from warmup on, two groups, eval()/train() switches (and an evaluation in
    eval mode) every 9 steps: params, z, exp_avg_sq and the group schedule match the anchor,
    in train mode and in eval mode (x) at the end."""
    ours, ours_params, anchor, anchor_params = run_with_switches(backend)
    _assert_same_run(ours, ours_params, anchor, anchor_params, "train, end")
    ours.eval()
    anchor.eval()
    _assert_same_run(ours, ours_params, anchor, anchor_params, "eval, end")
    assert ours.param_groups[0]["k"] == 40


def test_step_in_eval_mode_raises_as_the_anchor_and_changes_nothing():
    params = _params()
    opt = fusedopt.ScheduleFreeAdamW(params)
    _set_grads([params], 0)
    opt.step()
    opt.eval()
    before = [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())
    _set_grads([params], 1)
    with pytest.raises(RuntimeError, match="not in train mode"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, before[0], strict=True))
    assert opt.param_groups[0]["k"] == 1 and before[1]["param_groups"][0]["k"] == 1
    anchor = schedulefree.AdamWScheduleFree(_params())  # the anchor starts in eval mode
    with pytest.raises(Exception, match="not in train mode"):
        anchor.step()


@pytest.mark.parametrize("direction", ["anchor_to_ours", "ours_to_anchor"])
@pytest.mark.parametrize("saved_in", ["train", "eval"])
def test_state_dicts_load_both_ways_and_the_trajectory_continues(direction, saved_in):
    """12 steps with one optimizer, its state dict (saved in train or in eval mode, with the
    model's params) loaded into the other, 12 more steps: equal to a run of the anchor alone."""
    whole_params = _params()
    whole = schedulefree.AdamWScheduleFree(_groups(whole_params))
    whole.train()
    first_params, second_params = _params(), _params()
    make_ours = lambda ps: fusedopt.ScheduleFreeAdamW(_groups(ps))  # noqa: E731
    make_anchor = lambda ps: schedulefree.AdamWScheduleFree(_groups(ps))  # noqa: E731
    if direction == "anchor_to_ours":
        first, second = make_anchor(first_params), make_ours(second_params)
    else:
        first, second = make_ours(first_params), make_anchor(second_params)
    first.train()
    for step in range(24):
        if step == 12:
            if saved_in == "eval":
                first.eval()
                whole.eval()
            saved = copy.deepcopy(first.state_dict())
            with torch.no_grad():
                for p, q in zip(second_params, first_params, strict=True):
                    p.copy_(q)
            second.load_state_dict(saved)
            assert second.param_groups[0]["train_mode"] == (saved_in == "train")
            second.train()
            whole.train()
        runner, params = (first, first_params) if step < 12 else (second, second_params)
        _set_grads([params, whole_params], step)
        runner.step()
        whole.step()
    ours, ours_params = (second, second_params) if direction == "anchor_to_ours" else (
        first, first_params)  # fmt: skip
    if direction == "ours_to_anchor":  # compare the anchor that continued ours with `whole`
        for p, q in zip(second_params, whole_params, strict=True):
            assert_close(p, q, TORCH_TOLERANCE, "anchor after ours")
        for g, h in zip(second.param_groups, whole.param_groups, strict=True):
            assert all(g[key] == h[key] for key in SCHEDULE_KEYS)
    else:
        _assert_same_run(ours, ours_params, whole, whole_params, "ours after the anchor")


@pytest.mark.parametrize("backend", BACKENDS)
def test_master_weights_with_eval_train_follow_the_anchor_in_fp32(backend):
    """bf16 params with fp32 masters against the anchor on fp32 params (same bf16 values at
    the start, the same bf16-rounded grads): the masters follow the anchor within fp32
    rounding, through eval()/train(), and every param is its master rounded, bit for bit."""
    ours_params = _params(torch.bfloat16)
    anchor_params = [torch.nn.Parameter(p.detach().float()) for p in ours_params]
    ours = fusedopt.ScheduleFreeAdamW(_groups(ours_params), master_weights=True, backend=backend)
    anchor = schedulefree.AdamWScheduleFree(_groups(anchor_params))
    anchor.train()
    for step in range(20):
        _set_grads([ours_params, anchor_params], step, dtype=torch.bfloat16)
        ours.step()
        anchor.step()
        if step in (7, 15):
            ours.eval()
            anchor.eval()
            for p, q in zip(ours_params, anchor_params, strict=True):
                master = ours.state[p]["master_param"]
                assert torch.equal(p, master.to(torch.bfloat16))
                assert_close(master, q, TORCH_TOLERANCE, f"x after step {step}")
            ours.train()
            anchor.train()
    for p, q in zip(ours_params, anchor_params, strict=True):
        assert_close(ours.state[p]["master_param"], q, TORCH_TOLERANCE, "y at the end")
        assert_close(ours.state[p]["z"], anchor.state[q]["z"], TORCH_TOLERANCE, "z at the end")
        assert torch.equal(p, ours.state[p]["master_param"].to(torch.bfloat16))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compact_masters_move_through_eval_train_as_fp32_masters(backend):
    """[note: compact master]: eval()/train() join param and remainder, move the fp32 master
    and split it again, so a compact run's masters and z equal the fp32-master run's bit for
    bit through the switches (moving the bf16 param alone would lose the low bits)."""
    runs = []
    for mode in (True, "compact"):
        params = _params(torch.bfloat16)
        opt = fusedopt.ScheduleFreeAdamW(_groups(params), master_weights=mode, backend=backend)
        for step in range(12):
            _set_grads([params], step, dtype=torch.bfloat16)
            opt.step()
            if step in (4, 8):
                opt.eval()
                opt.train()
        opt.eval()
        runs.append((params, opt))
    (ref_params, ref), (params, opt) = runs
    for p, q in zip(params, ref_params, strict=True):
        joined = join_master(p, opt.state[p]["master_remainder"])
        master = ref.state[q]["master_param"]
        assert torch.equal(joined.view(torch.int32), master.view(torch.int32))
        assert torch.equal(opt.state[p]["z"], ref.state[q]["z"])


def test_eval_adopts_a_write_into_a_bf16_param_with_master_sync():
    """A value written into the param (in train mode) is taken by the master before eval()
    moves it ([note: master sync]); without master_sync the write is lost."""
    for sync in (True, False):
        params = _params(torch.bfloat16)
        opt = fusedopt.ScheduleFreeAdamW(params, master_weights=True, master_sync=sync)
        _set_grads([params], 0, dtype=torch.bfloat16)
        opt.step()
        with torch.no_grad():
            params[0].fill_(0.5)
        master = opt.state[params[0]]["master_param"].clone()
        z = opt.state[params[0]]["z"]
        opt.eval()
        start = torch.full_like(master, 0.5) if sync else master
        want = torch.lerp(start, z, 1 - 1 / 0.9)
        torch.testing.assert_close(opt.state[params[0]]["master_param"], want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_grad_norm_equals_the_anchor_after_torchs_clip(backend):
    ours_params, anchor_params = _params(), _params()
    ours = fusedopt.ScheduleFreeAdamW(_groups(ours_params), max_grad_norm=0.5, backend=backend)
    anchor = schedulefree.AdamWScheduleFree(_groups(anchor_params))
    anchor.train()
    for step in range(15):
        _set_grads([ours_params, anchor_params], step)
        ours.step()
        torch.nn.utils.clip_grad_norm_(anchor_params, 0.5)
        anchor.step()
    _assert_same_run(ours, ours_params, anchor, anchor_params, "clipped")


INF_STEPS = {3, 7, 8}


@pytest.mark.parametrize("scaler_cls", [torch.amp.GradScaler, fusedopt.GradScaler])
def test_grad_scalers_skip_steps_and_the_schedule_as_the_anchor(scaler_cls):
    """Loss-scaled grads with infs at some steps: the anchor under torch's scaler (which
    unscales its grads and does not call its step on an inf) against ours under either scaler
    (which unscales on load and skips on the device): same params, states, schedule; a
    skipped step advances no k, lr_max or weight_sum."""
    ours_params, anchor_params = _params(), _params()
    ours = fusedopt.ScheduleFreeAdamW(_groups(ours_params), max_grad_norm=1.0)
    anchor = schedulefree.AdamWScheduleFree(_groups(anchor_params))
    anchor.train()
    scalers = [scaler_cls("cpu", init_scale=2.0**10, growth_interval=3),
               torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)]  # fmt: skip
    for step in range(14):
        scale = scalers[0].scale(torch.ones(())).item()
        assert scale == scalers[1].scale(torch.ones(())).item()
        _set_grads([ours_params, anchor_params], step, scale=scale, inf=step in INF_STEPS)
        k = ours.param_groups[0]["k"]
        scalers[0].step(ours)
        scalers[1].unscale_(anchor)
        torch.nn.utils.clip_grad_norm_(anchor_params, 1.0)
        scalers[1].step(anchor)
        for s in scalers:
            s.update()
        assert ours.param_groups[0]["k"] == k + (step not in INF_STEPS)
        _assert_same_run(ours, ours_params, anchor, anchor_params, f"step {step}")
    assert ours.param_groups[0]["k"] == 14 - len(INF_STEPS)


def test_bad_grad_raises_before_the_schedule_advances():
    params = _params()
    opt = fusedopt.ScheduleFreeAdamW(_groups(params))
    _set_grads([params], 0)
    opt.step()
    groups = copy.deepcopy([{k: g[k] for k in SCHEDULE_KEYS} for g in opt.param_groups])
    params[1].grad = torch.zeros_like(params[1]).to_sparse()  # refused, naming the param
    with pytest.raises(RuntimeError, match=r"param \(group 0, index 1\) is sparse"):
        opt.step()
    assert [{k: g[k] for k in SCHEDULE_KEYS} for g in opt.param_groups] == groups
    # A complex param: refused (the anchor's lerp would take it; no semantics here).
    z = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))
    z.grad = torch.randn(3, dtype=torch.complex64)
    opt = fusedopt.ScheduleFreeAdamW([z])
    with pytest.raises(TypeError, match=r"param \(group 0, index 0\) is complex"):
        opt.step()
    assert opt.param_groups[0]["k"] == 0 and not opt.state[z]


def test_a_group_without_grads_advances_its_schedule_as_the_anchor():
    ours_params, anchor_params = _params(), _params()
    ours = fusedopt.ScheduleFreeAdamW(_groups(ours_params))
    anchor = schedulefree.AdamWScheduleFree(_groups(anchor_params))
    anchor.train()
    for step in range(5):
        _set_grads([ours_params, anchor_params], step)
        for p in (*ours_params[2:], *anchor_params[2:]):
            p.grad = None  # the second group has no grads at all
        ours.step()
        anchor.step()
    _assert_same_run(ours, ours_params[:2], anchor, anchor_params[:2], "first group")
    assert ours.param_groups[1]["k"] == anchor.param_groups[1]["k"] == 5
