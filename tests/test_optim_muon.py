"""``fusedopt.Muon`` against ``torch.optim.Muon`` (torch 2.14): constructor, checks, whole
trajectories on every option, state dicts both ways, the AdamW groups against
``torch.optim.AdamW``, master weights, a skipped step, the launch count per shape, and the
batched bf16 Newton-Schulz iteration within the bound its rounding implies."""

from __future__ import annotations

import inspect

import pytest
import torch
from optim_cases import assert_arguments_are_torchs, assert_params_close
from torch.optim._muon import _zeropower_via_newtonschulz

import fusedopt
from fusedopt import ops
from fusedopt.newton_schulz import newton_schulz_

NS = (3.4445, -4.7750, 2.0315)
SHAPES = [(6, 4), (6, 4), (4, 6), (8, 8), (5, 3), (6, 4)]

#: The backends usable on the CPU here (cuda: tests/test_optim_api.py's GPU cases).
BACKENDS = [b for b in ("reference", "cpu", "triton") if fusedopt.backends()[b].usable]


def _pair(shapes, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    ours = [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    return ours, theirs


def _grads(shapes, step, dtype=torch.float32):
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(s, generator=g).to(dtype) for s in shapes]


def _run(opt, params, grads):
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    opt.step()


def test_constructor_names_and_defaults_are_torchs():
    assert_arguments_are_torchs(fusedopt.Muon, torch.optim.Muon)
    ours = inspect.signature(fusedopt.Muon).parameters
    theirs = inspect.signature(torch.optim.Muon).parameters
    positional = [n for n, p in ours.items() if p.kind == p.POSITIONAL_OR_KEYWORD]
    assert positional == list(theirs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(lr=-1.0), "Learning rate should be >= 0"),
        (dict(momentum=-0.1), "momentum should be >= 0"),
        (dict(weight_decay=-0.1), "weight decay should be >= 0"),
        (dict(adjust_lr_fn="nope"), "Adjust learning rate function nope is not supported"),
        (dict(ns_coefficients=(1.0, 2.0)), "exactly 3 values"),
        (dict(ns_steps=100), "less than 100"),
    ],
)
def test_bad_arguments_raise_torchs_errors(kwargs, message):
    """torch's messages; torch raises the Newton-Schulz ones only inside its first step,
    fusedopt when the group is made, before any tensor is touched."""
    p = torch.nn.Parameter(torch.ones(3, 3))
    p.grad = torch.ones(3, 3)
    with pytest.raises(ValueError, match=message):
        torch.optim.Muon([p], **kwargs).step()
    with pytest.raises(ValueError, match=message):
        fusedopt.Muon([p], **kwargs)


def test_use_muon_true_on_a_vector_raises_torchs_error():
    with pytest.raises(ValueError, match="Muon only supports 2D parameters"):
        fusedopt.Muon([torch.nn.Parameter(torch.ones(3))], use_muon=True)


OPTIONS = {
    "default": {},
    "no_nesterov": dict(nesterov=False),
    "original": dict(adjust_lr_fn="original", weight_decay=0.0),
    "match_rms_adamw": dict(adjust_lr_fn="match_rms_adamw", momentum=0.9),
    "spectral_unclamped": dict(adjust_lr_fn="spectral_unclamped", lr=0.05),
    "ns_options": dict(ns_coefficients=(3.0, -3.2, 1.2), ns_steps=3, eps=1e-3),
    "small_momentum": dict(momentum=0.3, nesterov=True),  # lerp's other branch
    "tensor_lr": dict(lr=torch.tensor(0.02)),
}


def _ns_input(ref: torch.optim.Optimizer, p: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The bf16 Newton-Schulz input torch.optim.Muon formed for ``p`` in its last step."""
    group = ref.param_groups[0]
    buf = ref.state[p]["momentum_buffer"]
    update = grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
    return update.bfloat16()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("option", list(OPTIONS))
def test_fp32_trajectory_follows_torch(option, backend):
    """The elementwise passes are torch's arithmetic (torch's vectorised lerp, mul_ and add_,
    an FMA where torch's has one): the momentum buffers, which depend on the grads alone,
    equal torch's bit for bit. The params differ only through the Newton-Schulz outputs
    (batched bmm vs torch's per-matrix mm: the same on this CPU for most inputs, one bf16
    ulp apart on some, e.g. a 5x5 one in test_reference_oracle), and such a difference does
    not feed back (the next buffers are the grads'): so |p - p_torch|_F stays within the sum
    over steps of lr * ratio * the tolerance [note: muon ns tolerance] of that step's input
    (the decay only shrinks earlier differences)."""
    from fusedopt.optim.muon import adjust_lr_ratio

    kwargs = OPTIONS[option]
    ours, theirs = _pair(SHAPES)
    opt = fusedopt.Muon(ours, backend=backend, **kwargs)
    ref = torch.optim.Muon(theirs, **kwargs)
    group = ref.param_groups[0]
    a, b, c = group["ns_coefficients"]
    lr = float(group["lr"])
    bounds = [0.0] * len(SHAPES)
    for step in range(4):
        grads = _grads(SHAPES, step)
        _run(opt, ours, grads)
        _run(ref, theirs, grads)
        for i, (q, g) in enumerate(zip(theirs, grads, strict=True)):
            x = _ns_input(ref, q, g)
            tolerance = ns_rounding_tolerance(x, a, b, c, group["ns_steps"], group["eps"])
            bounds[i] += lr * adjust_lr_ratio(group["adjust_lr_fn"], q.shape) * tolerance
    for i, (p, q) in enumerate(zip(ours, theirs, strict=True)):
        assert torch.equal(opt.state[p]["momentum_buffer"], ref.state[q]["momentum_buffer"])
        assert (p.double() - q.double()).norm().item() <= bounds[i], i


def test_groups_split_and_adamw_params_follow_torch_adamw():
    g = torch.Generator().manual_seed(3)
    w = torch.nn.Parameter(torch.randn(6, 4, generator=g))
    bias = torch.nn.Parameter(torch.randn(6, generator=g))
    emb = torch.nn.Parameter(torch.randn(10, 4, generator=g))
    opt = fusedopt.Muon(
        [{"params": [w, bias]}, {"params": [emb], "use_muon": False, "lr": 3e-3}],
        lr=0.02, weight_decay=0.01, adamw_betas=(0.8, 0.95), adamw_eps=1e-6,
    )  # fmt: skip
    assert [(len(gr["params"]), gr["use_muon"]) for gr in opt.param_groups] == [
        (1, True), (1, False), (1, False),
    ]  # fmt: skip
    w2, bias2, emb2 = (torch.nn.Parameter(t.detach().clone()) for t in (w, bias, emb))
    muon = torch.optim.Muon([w2], lr=0.02, weight_decay=0.01)
    adamw = torch.optim.AdamW(
        [{"params": [bias2]}, {"params": [emb2], "lr": 3e-3}],
        lr=0.02, weight_decay=0.01, betas=(0.8, 0.95), eps=1e-6,
    )  # fmt: skip
    for step in range(3):
        grads = _grads([(6, 4), (6,), (10, 4)], step)
        _run(opt, [w, bias, emb], grads)
        for p, gr in zip((w2, bias2, emb2), grads, strict=True):
            p.grad = gr.clone()
        muon.step()
        adamw.step()
    assert torch.equal(w, w2)
    torch.testing.assert_close(bias, bias2, rtol=2e-6, atol=1e-7)  # fused AdamW vs for-loop
    torch.testing.assert_close(emb, emb2, rtol=2e-6, atol=1e-7)
    assert set(opt.state[emb]) == {"step", "exp_avg", "exp_avg_sq"}


def test_torch_state_dict_loads_and_ours_loads_into_torch():
    ours, theirs = _pair(SHAPES)
    ref = torch.optim.Muon(theirs, lr=0.02, momentum=0.9)
    for step in range(2):
        _run(ref, theirs, _grads(SHAPES, step))
    with torch.no_grad():
        for a, b in zip(ours, theirs, strict=True):
            a.copy_(b)
    opt = fusedopt.Muon(ours, lr=0.02)
    opt.load_state_dict(ref.state_dict())
    assert opt.param_groups[0]["momentum"] == 0.9 and opt.param_groups[0]["use_muon"]
    back = torch.optim.Muon([torch.nn.Parameter(p.detach().clone()) for p in ours], lr=0.02)
    for step in range(2, 4):
        grads = _grads(SHAPES, step)
        _run(opt, ours, grads)
        _run(ref, theirs, grads)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)
    saved = opt.state_dict()
    assert set(saved["state"][0]) == {"momentum_buffer"}
    back.load_state_dict(saved)
    assert torch.equal(
        back.state_dict()["state"][0]["momentum_buffer"], ref.state[theirs[0]]["momentum_buffer"]
    )


def test_named_params_step_and_save_their_names_as_torchs():
    """torch.optim.Muon takes (name, param) pairs and saves the names in its groups; so does
    ours, also where a group of both kinds is split (the names follow their params)."""
    ours, theirs = _pair(SHAPES[:3])
    opt = fusedopt.Muon([(f"w{k}", p) for k, p in enumerate(ours)], lr=0.02)
    ref = torch.optim.Muon([(f"w{k}", p) for k, p in enumerate(theirs)], lr=0.02)
    for step in range(2):
        grads = _grads(SHAPES[:3], step)
        _run(opt, ours, grads)
        _run(ref, theirs, grads)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)
    assert opt.state_dict()["param_groups"][0]["param_names"] == ["w0", "w1", "w2"]
    assert ref.state_dict()["param_groups"][0]["param_names"] == ["w0", "w1", "w2"]
    vector = torch.nn.Parameter(torch.ones(5))
    mixed = fusedopt.Muon([("bias", vector), ("w", torch.nn.Parameter(torch.ones(3, 2)))])
    assert [(g["use_muon"], g["param_names"]) for g in mixed.param_groups] == [
        (True, ["w"]),
        (False, ["bias"]),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_master_weights_follow_torch_on_the_fp32_master(backend):
    """bf16 params with masters: the master steps as torch.optim.Muon's fp32 param fed the
    bf16 grads (upcast exactly), and the param is the rounded master."""
    ours, _ = _pair(SHAPES, torch.bfloat16)
    masters = [torch.nn.Parameter(p.detach().float()) for p in ours]
    opt = fusedopt.Muon(ours, lr=0.02, master_weights=True, backend=backend)
    ref = torch.optim.Muon(masters, lr=0.02)
    for step in range(3):
        grads = _grads(SHAPES, step, torch.bfloat16)
        _run(opt, ours, grads)
        _run(ref, masters, [g.float() for g in grads])
    for p, m in zip(ours, masters, strict=True):
        assert torch.equal(opt.state[p]["master_param"], m)
        assert torch.equal(p, m.to(torch.bfloat16))


def test_bf16_without_masters_steps_once_rounded():
    """bf16 params without masters: buffer and update as torch's (the buffer rounded to bf16
    before the Nesterov lerp reads it); the param is rounded once, where torch rounds after
    the decay (half an ulp of p*(1 - lr*wd), kept through the update's cancellation) and
    again after the update (half an ulp of the result, as ours): so at most
    ulp(p*d)/2 + ulp(result) apart, checked from identical inputs."""
    ours, theirs = _pair(SHAPES, torch.bfloat16)
    before = [p.detach().float() for p in ours]
    opt = fusedopt.Muon(ours, lr=0.02)
    ref = torch.optim.Muon(theirs, lr=0.02)
    grads = _grads(SHAPES, 0, torch.bfloat16)
    _run(opt, ours, grads)
    _run(ref, theirs, grads)
    eps = torch.finfo(torch.bfloat16).eps  # one ulp relative to the binade's bottom
    for a, b, p0 in zip(ours, theirs, before, strict=True):
        assert torch.equal(opt.state[a]["momentum_buffer"], ref.state[b]["momentum_buffer"])
        larger = torch.maximum(a.float().abs(), b.float().abs())
        tolerance = eps / 2 * (p0 * (1 - 0.02 * 0.1)).abs() + eps * larger
        assert ((a.float() - b.float()).abs() <= tolerance).all()


def test_torchs_bf16_buffer_is_normalised_in_place_without_nesterov():
    """A difference from torch, on purpose: torch.optim.Muon with a bf16 momentum buffer and
    nesterov=False passes the buffer itself to the Newton-Schulz iteration
    (``buf.bfloat16()`` is ``buf``), whose ``div_`` normalises the buffer in place. fusedopt
    keeps the buffer the momentum average (README, differences)."""
    ours, theirs = _pair([(6, 4)], torch.bfloat16)
    opt = fusedopt.Muon(ours, lr=0.02, nesterov=False)
    ref = torch.optim.Muon(theirs, lr=0.02, nesterov=False)
    grads = _grads([(6, 4)], 0, torch.bfloat16)
    _run(opt, ours, grads)
    _run(ref, theirs, grads)
    expected = (0.05 * grads[0].float()).to(torch.bfloat16)  # lerp(0, g, 0.05)
    assert torch.equal(opt.state[ours[0]]["momentum_buffer"], expected)
    assert not torch.equal(ref.state[theirs[0]]["momentum_buffer"], expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_found_inf_skips_everything(backend):
    ours, _ = _pair([*SHAPES, (7,)])
    opt = fusedopt.Muon(ours, lr=0.02, backend=backend)
    _run(opt, ours, _grads([*SHAPES, (7,)], 0))
    before = [p.detach().clone() for p in ours]
    states = [{k: v.clone() for k, v in opt.state[p].items()} for p in ours]
    opt.found_inf = torch.tensor(1.0)
    _run(opt, ours, _grads([*SHAPES, (7,)], 1))
    del opt.found_inf
    for p, b in zip(ours, before, strict=True):
        assert torch.equal(p, b)
    for p, saved in zip(ours, states, strict=True):
        assert all(torch.equal(v, saved[k]) for k, v in opt.state[p].items())


@pytest.mark.parametrize("copies", [1, 4])
def test_launches_grow_with_shapes_not_params(copies, monkeypatch, count_calls):
    """Per step: one muon_momentum_ and one muon_apply_ call, one Newton-Schulz call and
    3*ns_steps batched GEMMs per distinct shape, however many params share it."""
    shapes = [(6, 4), (4, 6), (8, 8)] * copies
    ours, _ = _pair(shapes)
    opt = fusedopt.Muon(ours, lr=0.02, ns_steps=5)
    calls: list[str] = []
    real = ops.step

    def counting(op, *args, **kwargs):
        calls.append(op)
        return real(op, *args, **kwargs)

    monkeypatch.setattr(ops, "step", counting)
    gemms = {name: count_calls(torch, name) for name in ("bmm", "baddbmm", "mm", "addmm")}
    ns_calls = count_calls(torch.ops.fusedopt, "newton_schulz_")
    for p, g in zip(ours, _grads(shapes, 0), strict=True):
        p.grad = g
    opt.step()
    assert calls == ["muon_momentum_", "muon_apply_"]
    assert ns_calls[0] == 3  # three shapes
    assert {name: n[0] for name, n in gemms.items()} == {
        "bmm": 3 * 5, "baddbmm": 3 * 5 * 2, "mm": 0, "addmm": 0,
    }  # fmt: skip


# ------------------------------------------------------------------ Newton-Schulz bound
def exact_newton_schulz(
    x: torch.Tensor, a: float, b: float, c: float, steps: int, eps: float = 1e-7
) -> torch.Tensor:
    """torch.optim.Muon's iteration on the same bf16 input, in float64 throughout."""
    y = x.double()
    tall = y.shape[0] > y.shape[1]
    y = (y.T if tall else y) / y.norm().clamp(min=eps)
    for _ in range(steps):
        gram = y @ y.T
        y = a * y + (b * gram + c * gram @ gram) @ y
    return y.T if tall else y


def ns_rounding_tolerance(
    x: torch.Tensor, a: float, b: float, c: float, steps: int, eps: float = 1e-7
) -> float:
    """[note: muon ns tolerance] How far two bf16 Newton-Schulz runs on the same bf16 input
    ``x`` may end apart (Frobenius norm) when they round at the same points and differ only
    in the order of the fp32 sums inside each GEMM and reduction (torch's per-matrix
    mm/addmm vs fusedopt's batched bmm/baddbmm, in the params' layout for tall matrices).

    Derivation. Both runs round the same 2 + 3*steps results to bf16 (the norm, the
    division, and per step A = X X^T, U = b*A + c*A A, X' = a*X + U X, each formed in fp32
    and rounded once). Their errors are those of one arithmetic, so neither is further from
    the exact iteration E (float64, :func:`exact_newton_schulz`) than the other by more than
    the chance of which elements' roundings flip; by the triangle inequality
    |ours - torch| <= |ours - E| + |torch - E| ~ 2 |torch - E|. So the tolerance is twice
    the error torch's own bf16 rounding makes on this input, computed, not fitted.

    An a-priori bound was tried first and is vacuous: propagating a relative error of one
    bf16 ulp (2^-7) per rounding to first order along each singular value's trajectory
    (s -> s*q(s), q = a + b s^2 + c s^4; a relative error e becomes |p'(s)/q(s)| e, up to
    ~5 where q is small) gives 2.25 for a 16x24 Gaussian input whose output has norm 3.65,
    while the actual bf16 error there is 0.053: the worst case adds every rounding with
    the same sign and the largest gain. Hence the per-input computation above.
    """
    from torch.optim._muon import _zeropower_via_newtonschulz as torch_ns

    exact = exact_newton_schulz(x, a, b, c, steps, eps)
    return 2 * (torch_ns(x, (a, b, c), steps, eps).double() - exact).norm().item()


@pytest.mark.parametrize("shape", [(8, 16), (16, 8), (32, 32), (7, 5), (64, 24)])
def test_newton_schulz_within_its_rounding_bound(shape):
    g = torch.Generator().manual_seed(shape[0] * 100 + shape[1])
    x = torch.randn(3, *shape, generator=g).bfloat16()
    ours = newton_schulz_(x.clone(), *NS, 5, 1e-7)
    for k in range(3):
        theirs = _zeropower_via_newtonschulz(x[k], NS, 5, 1e-7)
        bound = ns_rounding_tolerance(x[k], *NS, 5)
        assert (ours[k].double() - theirs.double()).norm().item() <= bound


@pytest.mark.parametrize(
    "wrong",
    [
        dict(steps=4),
        dict(coefficients=(3.4445, -4.7750 * 1.05, 2.0315)),
        dict(unnormalised=True),
    ],
)
def test_the_newton_schulz_bound_fails_wrong_math(wrong):
    """The bound is not vacuous: a step too few, a coefficient 5% off or a wrong
    normalisation (by 4x the norm) each land outside it."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(16, 24, generator=g).bfloat16()
    theirs = _zeropower_via_newtonschulz(x, NS, 5, 1e-7)
    coefficients = wrong.get("coefficients", NS)
    steps = wrong.get("steps", 5)
    # unnormalised: eps = 4|x|_F makes clamp(min=eps) divide by 4|x|_F instead of |x|_F
    eps = 4 * x.float().norm().item() if wrong.get("unnormalised") else 1e-7
    source = x.clone()
    ours = newton_schulz_(source, *coefficients, steps, eps)
    bound = ns_rounding_tolerance(x, *NS, 5)
    assert (ours.double() - theirs.double()).norm().item() > bound


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scaler_cls", [torch.amp.GradScaler, fusedopt.GradScaler])
def test_grad_scalers_step_as_torch_on_unscaled_grads(scaler_cls, backend):
    """Both scalers: the scale is a power of two, so unscaling on load is exact and the run
    equals torch.optim.Muon on the plain grads, bit for bit; the step whose grads hold an
    inf is skipped by both (params and buffers untouched) and the scale backs off."""
    shapes = [*SHAPES, (5,)]
    ours, theirs = _pair(shapes)
    opt = fusedopt.Muon(ours, lr=0.02, backend=backend)
    ref = torch.optim.Muon(theirs[:-1], lr=0.02)
    ref_adamw = torch.optim.AdamW(theirs[-1:], lr=0.02, weight_decay=0.1)
    scaler = scaler_cls("cpu", init_scale=2.0**10, growth_interval=100)
    for step in range(4):
        grads = _grads(shapes, step)
        if step == 2:
            grads[1][0, 0] = float("inf")
        loss = sum((p * g).sum() for p, g in zip(ours, grads, strict=True))
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        if step != 2:
            _run(ref, theirs[:-1], grads[:-1])
            _run(ref_adamw, theirs[-1:], grads[-1:])
    assert scaler.get_scale() == 2.0**9
    for a, b in zip(ours[:-1], theirs[:-1], strict=True):
        assert torch.equal(a, b)
        assert torch.equal(opt.state[a]["momentum_buffer"], ref.state[b]["momentum_buffer"])
    torch.testing.assert_close(ours[-1], theirs[-1], rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_grad_norm_clips_as_torch_clip_grad_norm(backend):
    """``max_grad_norm`` scales the grads on load by clip_grad_norm_'s coefficient over all
    params (the AdamW ones too). The norm's summation order may differ from torch's by an
    fp32 ulp of the coefficient; Newton-Schulz normalises its input, so only the momentum
    buffer's scale sees it: 1e-6 relative."""
    shapes = [*SHAPES, (5,)]
    ours, theirs = _pair(shapes)
    opt = fusedopt.Muon(ours, lr=0.02, max_grad_norm=0.5, backend=backend)
    ref = torch.optim.Muon(theirs[:-1], lr=0.02)
    ref_adamw = torch.optim.AdamW(theirs[-1:], lr=0.02, weight_decay=0.1)
    for step in range(3):
        grads = _grads(shapes, step)
        _run(opt, ours, grads)
        for p, g in zip(theirs, grads, strict=True):
            p.grad = g.clone()
        norm = torch.nn.utils.clip_grad_norm_(theirs, 0.5)
        ref.step()
        ref_adamw.step()
        torch.testing.assert_close(opt.last_grad_norm, norm, rtol=1e-6, atol=0)
    assert_params_close(ours, theirs)


def test_pickled_optimizer_steps():
    """The per-shape scratch is not state: an unpickled optimizer makes its own."""
    import pickle

    ours, _ = _pair(SHAPES)
    opt = fusedopt.Muon(ours, lr=0.02)
    _run(opt, ours, _grads(SHAPES, 0))
    copy = pickle.loads(pickle.dumps(opt))
    params = [p for g in copy.param_groups for p in g["params"]]
    _run(copy, params, _grads(SHAPES, 1))
    _run(opt, ours, _grads(SHAPES, 1))
    for a, b in zip(ours, params, strict=True):
        assert torch.equal(a, b)


#: (param dtype, master weights) of the op-level comparison: every storage of DESIGN.md §3.
PASS_STORAGES = [
    (torch.float32, False),
    (torch.bfloat16, False),
    (torch.float16, False),
    (torch.float64, False),
    (torch.bfloat16, True),
    (torch.float16, True),
]


def _pass_tensors(dtype, master, seed):
    g = torch.Generator().manual_seed(seed)
    shapes = [(6, 4), (33, 17), (1, 1029)]
    state = torch.float32 if master else dtype
    params = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    return dict(
        params=params,
        grads=[torch.randn(s, generator=g).to(dtype) for s in shapes],
        momentum_buffers=[(0.1 * torch.randn(s, generator=g)).to(state) for s in shapes],
        ns_buffers=[torch.zeros(s, dtype=torch.bfloat16) for s in shapes],
        master_params=[p.float() for p in params] if master else [],
    )


@pytest.mark.parametrize("nesterov", [True, False], ids=["nesterov", "plain"])
@pytest.mark.parametrize("momentum", [0.95, 0.3])
@pytest.mark.parametrize(("dtype", "master"), PASS_STORAGES, ids=lambda x: str(x))
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_passes_equal_the_reference_bit_for_bit(backend, dtype, master, momentum, nesterov):
    """muon_momentum_ then muon_apply_ on ``backend`` leave the same bits as the reference's
    (both round once per store, as torch: the stored buffer, the bf16 Newton-Schulz input,
    the param), with a grad scale, a clip, two groups and a tensor lr; momentum 0.3 takes
    torch's other lerp form. The apply pass reads the momentum pass's bf16 output as the
    iteration's (the iteration is torch's in every backend)."""
    runs = {}
    for name in ("reference", backend):
        t = _pass_tensors(dtype, master, seed=3)
        opmath = torch.float64 if dtype == torch.float64 else torch.float32
        kwargs = dict(
            lr=[2e-2, 3e-2, 2e-2], momentum=momentum, weight_decay=[0.1, 0.0, 0.1],
            lr_ratio=[1.5, 1.0, 0.5], nesterov=nesterov, grad_scale=torch.tensor(4.0, dtype=opmath),
            clip_coef=torch.tensor(0.75, dtype=opmath), backend=name,
        )  # fmt: skip
        ops.muon_momentum_(**t, **kwargs)
        ops.muon_apply_(**t, **kwargs)
        runs[name] = t
    for key, tensors in runs["reference"].items():
        for k, (want, got) in enumerate(zip(tensors, runs[backend][key], strict=True)):
            if dtype == torch.float64 and backend == "cpu":
                # The reference's fp64 FMA rounds twice (reference.ops._fma: torch has no
                # fused fp64 multiply-add), the C++ one once: each lerp or update may differ
                # by an ulp of its result (at most 2^-53 relative, twice: the buffer, then
                # the update built on it); bounded by 2^-52 of the tensor's largest value.
                # (Triton's interpreter rounds fp64 FMAs twice too: [note: interpreter fma].)
                bound = 2.0**-52 * want.abs().max().item()
                torch.testing.assert_close(got, want, rtol=0, atol=bound, msg=f"{key}[{k}]")
                continue
            assert torch.equal(want.view(-1).view(torch.uint8), got.view(-1).view(torch.uint8)), (
                f"{key}[{k}]"
            )
