"""Master weights and the user's writes (issue #13): [note: master sync] in
``fusedopt/_contract.py`` and [note: master weights switched] in ``fusedopt/optim/_base.py``.

* A value written into a bf16/fp16 param between steps (``model.load_state_dict``, a
  re-initialisation, ``p.clamp_()``) is adopted by its fp32 master at the next step, bit rule
  per element, on every backend; ``master_sync=False`` keeps the old behaviour (the write is
  lost); a step skipped by ``found_inf`` adopts nothing.
* ``master_weights`` switched on or off mid-run (or loaded the other way) creates or drops
  the master and casts the states at the next step.
"""

from __future__ import annotations

import pytest
import torch
from harness.cases import backend_device_params
from optim_cases import clone_params, make_model

import fusedopt
from fusedopt import ops

BACKENDS = backend_device_params()
STEP_OPS = (
    "adamw_",
    "lamb_",
    "lion_",
    "adan_",
    "schedulefree_adamw_",
    "sgd_",
    "adafactor_",
    "muon_apply_",
)


N = 1029  # not a multiple of any vector width; crosses a Triton block


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit, except that NaNs only need to be NaN on both sides: the backends round a
    NaN to a bf16/fp16 NaN of their own bits (torch's CPU cast gives 0xFFFF for fp32's
    default NaN, the kernels 0x7FC0), so a NaN master's rounding is a NaN of either."""
    nan = a.isnan()
    return torch.equal(nan, b.isnan()) and torch.equal(_bits(a)[~nan], _bits(b)[~nan])


def _op_call(op: str, n_tensors: int, device: str, gen: torch.Generator):
    """Fresh fp32 states, hyperparameters and flags of a step op (moments of a run in
    progress, so that the update is not trivial)."""
    moments = [(0.1 * torch.randn(N, generator=gen)).to(device) for _ in range(n_tensors)]
    squares = [(0.01 * torch.rand(N, generator=gen)).to(device) for _ in range(n_tensors)]
    steps = [torch.full((), 3.0, device=device) for _ in range(n_tensors)]
    if op == "adamw_":
        lists = dict(exp_avgs=moments, exp_avg_sqs=squares, steps=steps)
        hypers = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
        flags = dict(decoupled=True, amsgrad=False, maximize=False, bias_correction=True)
    elif op == "lamb_":
        lists = dict(exp_avgs=moments, exp_avg_sqs=squares, steps=steps)
        hypers = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.1)
        flags = dict(grad_averaging=True, bias_correction=True, trust_clip=False,
                     always_adapt=False)  # fmt: skip
    elif op == "lion_":
        lists = dict(exp_avgs=moments)
        hypers = dict(lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.1)
        flags = dict(maximize=False)
    elif op == "adan_":
        diffs = [(0.1 * torch.randn(N, generator=gen)).to(device) for _ in range(n_tensors)]
        prev = [(0.1 * torch.randn(N, generator=gen)).to(device) for _ in range(n_tensors)]
        lists = dict(exp_avgs=moments, exp_avg_sqs=squares, exp_avg_diffs=diffs,
                     neg_pre_grads=prev, steps=steps)  # fmt: skip
        hypers = dict(lr=1e-2, beta1=0.98, beta2=0.92, beta3=0.99, eps=1e-8, weight_decay=0.1)
        flags = dict(no_prox=False)
    elif op == "schedulefree_adamw_":
        lists = dict(zs=moments, exp_avg_sqs=squares)
        hypers = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, ckp1=0.25,
                      bias_correction2=0.05)  # fmt: skip
        flags = {}
    elif op == "adafactor_":  # vectors: a variance each, (0,) placeholders for the factors
        empty = [torch.zeros(0, device=device) for _ in range(n_tensors)]
        lists = dict(row_vars=empty, col_vars=[t.clone() for t in empty], variances=squares,
                     steps=steps)  # fmt: skip
        # eps1 given: None would floor the bf16 run at bf16's eps and its fp32 twin at fp32's
        hypers = dict(lr=1e-2, beta2_decay=-0.8, eps1=1e-30, eps2=1e-3, d=1.0, weight_decay=0.1)
        flags = dict(maximize=False)
    elif op == "muon_apply_":  # the master is read (and adopted) by the apply pass
        ns = [torch.randn(N, generator=gen).to(device, torch.bfloat16) for _ in range(n_tensors)]
        lists = dict(momentum_buffers=moments, ns_buffers=ns)
        hypers = dict(lr=1e-2, momentum=0.95, weight_decay=0.1, lr_ratio=1.5, ns_a=3.4445,
                      ns_b=-4.7750, ns_c=2.0315, ns_eps=1e-7, ns_steps=5.0)  # fmt: skip
        flags = dict(nesterov=True)
    else:
        lists = dict(momentum_buffers=moments, steps=steps)
        hypers = dict(lr=1e-1, momentum=0.9, dampening=0.0, weight_decay=0.1)
        flags = dict(nesterov=False, maximize=False)
    return lists, hypers, flags


def _written(dtype: torch.dtype, device: str, gen: torch.Generator, nan: bool = False):
    """(master, param): an fp32 master with more precision than the param, and a param equal
    to ``master.to(dtype)`` except for the user's writes: new values, +0 over a -0 master
    (same value, other bits); with ``nan``, a NaN master whose param is its rounding (what
    the last step wrote: not a write)."""
    master = torch.randn(N, generator=gen)
    master[10] = -0.0
    if nan:
        master[20] = float("nan")
    param = master.to(dtype)
    param[::7] = torch.randn(param[::7].shape, generator=gen).to(dtype)  # the user's writes
    param[10] = 0.0  # +0 over the -0 master: adopted (bits, not values)
    param[20] = master[20].to(dtype)
    return master.to(device), param.to(device)


@pytest.mark.parametrize("target", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("sync", [True, False], ids=["sync", "nosync"])
@pytest.mark.parametrize("op", STEP_OPS)
def test_master_adopts_written_params(op, sync, dtype, target):
    """The master steps exactly as an fp32 param equal to the adopted master would (sync), or
    to the old master (no sync: the write is lost), bit for bit; the param is always
    ``master.to(dtype)``. LAMB's trust ratio thus uses the norm of the adopted master."""
    backend, device = target
    gen = torch.Generator().manual_seed(1)
    # A NaN in the second tensor only, and not for LAMB (its norms would make it all NaN).
    pairs = [_written(dtype, device, gen, nan=i == 1 and op != "lamb_") for i in range(2)]
    masters = [m for m, _ in pairs]
    params = [p for _, p in pairs]
    grads = [torch.randn(N, generator=gen).to(device=device, dtype=dtype) for _ in pairs]
    lists, hypers, flags = _op_call(op, len(pairs), device, gen)
    twin_lists = {k: [t.clone() for t in v] for k, v in lists.items()}
    adopted = [
        torch.where(_bits(m.to(dtype)) != _bits(p), p.float(), m) if sync else m.clone()
        for m, p in pairs
    ]
    assert sync is False or not torch.equal(_bits(adopted[0]), _bits(masters[0]))

    ops.step(op, dict(params=params, grads=grads, master_params=masters, **lists), hypers,
             {**flags, "master_sync": sync}, backend=backend)  # fmt: skip
    # The twin: fp32 params holding the adopted masters, fp32 copies of the grads (a bf16
    # grad widens exactly), the same fp32 states.
    ops.step(op, dict(params=adopted, grads=[g.float() for g in grads], **twin_lists), hypers,
             flags, backend=backend)  # fmt: skip
    for p, m, want in zip(params, masters, adopted, strict=True):
        assert _same(m, want)
        assert _same(p, m.to(dtype))
    for name, got in lists.items():
        for a, b in zip(got, twin_lists[name], strict=True):
            assert _same(a, b), name


@pytest.mark.parametrize("target", BACKENDS)
@pytest.mark.parametrize("op", STEP_OPS)
def test_skipped_step_adopts_nothing(op, target):
    """A step skipped by found_inf changes nothing, the master included: the next step that
    runs adopts the write."""
    backend, device = target
    gen = torch.Generator().manual_seed(2)
    master, param = _written(torch.bfloat16, device, gen)
    grads = [torch.randn(N, generator=gen).to(device=device, dtype=torch.bfloat16)]
    lists, hypers, flags = _op_call(op, 1, device, gen)
    before = master.clone(), param.clone()
    ops.step(op, dict(params=[param], grads=grads, master_params=[master], **lists), hypers,
             flags, found_inf=torch.ones((), device=device), backend=backend)  # fmt: skip
    assert torch.equal(_bits(master), _bits(before[0]))
    assert torch.equal(_bits(param), _bits(before[1]))


def _bf16_model():
    return clone_params(make_model(), torch.bfloat16)


def _set_grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)


@pytest.mark.parametrize("cls", [fusedopt.AdamW, fusedopt.SGD, fusedopt.Lion, fusedopt.LAMB])
def test_optimizer_keeps_a_clamp_between_steps(cls):
    """WGAN's ``p.clamp_()`` between steps: the next step starts from the clamped values. A
    step with lr 0 and no decay changes no value, so the params must stay as clamped; with
    ``master_sync=False`` they return to the old masters (the write is lost)."""
    for sync in (True, False):
        params = _bf16_model()
        opt = cls(params, lr=1e-2, master_weights=True, master_sync=sync)
        _set_grads(params, 0)
        opt.step()
        for p in params:
            p.data.clamp_(-0.01, 0.01)
        clamped = [p.detach().clone() for p in params]
        old = [opt.state[p]["master_param"].clone() for p in params]
        for group in opt.param_groups:
            group["lr"] = 0.0
            group["weight_decay"] = 0.0
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
        for p, c, m in zip(params, clamped, old, strict=True):
            master = opt.state[p]["master_param"]
            if sync:
                assert torch.equal(_bits(p), _bits(c))
                assert torch.equal(master, torch.where(_bits(m.to(p.dtype)) != _bits(c),
                                                       c.float(), m))  # fmt: skip
            else:
                assert torch.equal(_bits(p), _bits(m.to(p.dtype)))
                assert torch.equal(master, m)


def test_master_sync_group_key_switches_mid_run():
    """``group["master_sync"]`` is read at every step (it is an op flag)."""
    params = _bf16_model()
    opt = fusedopt.SGD(params, lr=0.0, master_weights=True)
    _set_grads(params, 0)
    opt.step()
    opt.param_groups[0]["master_sync"] = False
    with torch.no_grad():
        params[0].fill_(0.5)
    opt.step()
    assert not torch.equal(params[0], torch.full_like(params[0], 0.5))  # lost: no sync
    opt.param_groups[0]["master_sync"] = True
    with torch.no_grad():
        params[0].fill_(0.5)
    opt.step()
    assert torch.equal(params[0], torch.full_like(params[0], 0.5))
    assert torch.equal(
        opt.state[params[0]]["master_param"], torch.full_like(params[0], 0.5).float()
    )


# ----------------------------------------------------------------- master_weights switched


def _twin_from(opt, params, master: bool):
    """A fresh optimizer of the same class whose state is what [note: master weights
    switched] promises after the switch: the master made from the param (or none), the
    moments cast to fp32 (or to the param dtype), the step counts as they were."""
    twin_params = [p.detach().clone().requires_grad_() for p in params]
    twin = type(opt)(twin_params, lr=1e-2, master_weights=master)
    dtype = torch.float32 if master else params[0].dtype
    for p, q in zip(params, twin_params, strict=True):
        state = opt.state.get(p)
        if not state:
            continue
        twin.state[q] = {
            k: (v.clone() if k == "step" else v.to(dtype).clone())
            for k, v in state.items()
            if k != "master_param"
        }
        if master:
            twin.state[q]["master_param"] = q.detach().float().clone()
    for group, twin_group in zip(opt.param_groups, twin.param_groups, strict=True):
        if "step" in group:  # LAMB counts per group ([note: LAMB group step])
            twin_group["step"] = group["step"].clone()
    return twin, twin_params


@pytest.mark.parametrize("cls", [fusedopt.AdamW, fusedopt.SGD, fusedopt.Lion, fusedopt.LAMB])
@pytest.mark.parametrize("switch_to", [True, False], ids=["on", "off"])
def test_master_weights_switched_mid_run(cls, switch_to):
    """Two steps with one setting, then ``group["master_weights"]`` flipped: the next steps
    run (no "no longer fits" error) and equal an optimizer that starts from the switched
    state, bit for bit."""
    kwargs = {"momentum": 0.9} if cls is fusedopt.SGD else {}
    params = _bf16_model()
    opt = cls(params, lr=1e-2, master_weights=not switch_to, **kwargs)
    for step in range(2):
        _set_grads(params, step)
        opt.step()
    for group in opt.param_groups:
        group["master_weights"] = switch_to
    twin, twin_params = _twin_from(opt, params, switch_to)
    for group in twin.param_groups:
        group.update(kwargs)
    for step in range(2, 4):
        _set_grads(params, step)
        _set_grads(twin_params, step)
        opt.step()
        twin.step()
    for p, q in zip(params, twin_params, strict=True):
        assert torch.equal(_bits(p), _bits(q))
        state, want = opt.state.get(p, {}), twin.state.get(q, {})
        assert state.keys() == want.keys()
        assert ("master_param" in state) == (switch_to and bool(state))
        for key in state:
            assert state[key].dtype == want[key].dtype, key
            assert torch.equal(state[key], want[key]), key


def test_state_dict_saved_with_masters_loads_without():
    """A state dict saved with master weights, loaded with ``master_weights=False`` in its
    groups: the master is dropped and the moments take the param's dtype."""
    params = _bf16_model()
    opt = fusedopt.AdamW(params, lr=1e-2, master_weights=True)
    _set_grads(params, 0)
    opt.step()
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        group["master_weights"] = False
    other = fusedopt.AdamW(params, lr=1e-2, master_weights=True)
    other.load_state_dict(saved)
    for p in params:
        state = other.state[p]
        assert "master_param" not in state
        assert state["exp_avg"].dtype == torch.bfloat16
    _set_grads(params, 1)
    other.step()
    other.param_groups[0]["master_weights"] = True  # and back on
    _set_grads(params, 2)
    other.step()
    assert all(other.state[p]["master_param"].dtype == torch.float32 for p in params)


@pytest.mark.parametrize("target", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_a_single_written_element_is_found_anywhere(dtype, target):
    """One write, alone in its vector, block or tail (the CPU checks 8 lanes at a time and
    skips blocks without a write; Triton and CUDA compare whole vectors): it is adopted, and
    nothing else moves (SGD with lr 0)."""
    backend, device = target
    gen = torch.Generator().manual_seed(3)
    for index in (0, 5, 7, 8, 511, 512, 1023, 1024, N - 1):
        master = torch.randn(N, generator=gen).to(device)
        param = master.to(dtype)
        param[index] = 3.0
        before = master.clone()
        ops.sgd_([param], [torch.ones_like(param)], lr=0.0, master_params=[master],
                 backend=backend)  # fmt: skip
        want = before.clone()
        want[index] = 3.0
        assert torch.equal(master, want), index
        assert torch.equal(_bits(param), _bits(want.to(dtype))), index
