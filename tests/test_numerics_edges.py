"""Issue #13 regressions on every backend: a NaN in Lion's update direction, a zero weight
decay, and fp64 clipping (DESIGN.md §3).

* Lion: ``sign(NaN) = 0``, as ``torch.sign`` in lion-pytorch (the anchor): the param only
  decays, its moment becomes NaN.
* ``weight_decay == 0`` is no decay, per tensor, as torch (``if weight_decay != 0``): not
  ``g + 0*p`` (NaN for an infinite param) nor ``p * (1 - lr*0)`` (NaN for ``lr = inf``).
  Lion keeps lion-pytorch's unconditional ``p *= 1 - lr*wd``.
* fp64 params: the global grad norm and the clip coefficient stay fp64 ([note: opmath
  scalars] in fusedopt/_contract.py), so a clipped fp64 trajectory equals a plain fp64 one to
  ~1e-15 per step, not to fp32's ~1e-8 relative rounding of the coefficient.
"""

from __future__ import annotations

import math

import pytest
import torch
from optim_cases import usable_backends

import fusedopt
from fusedopt import ops

BACKENDS = usable_backends("cpu")
INF, NAN = math.inf, math.nan


def _assert_same(got: torch.Tensor, want: torch.Tensor, what: str, rtol: float, atol: float):
    """Equal within tolerance, with the same infinities and NaNs in the same places."""
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, equal_nan=True, msg=what)


TOL = {torch.float32: (2e-6, 1e-7), torch.float64: (1e-14, 1e-16)}


# --------------------------------------------------------------------------------------------
# Lion: sign(NaN) = 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", BACKENDS)
def test_lion_nan_direction_is_sign_zero(backend, dtype):
    p = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0], dtype=dtype)
    g = torch.tensor([NAN, 0.25, NAN, -1.0, 2.0], dtype=dtype)
    m = torch.tensor([0.5, -0.5, NAN, 0.125, 0.0], dtype=dtype)
    lr, b1, b2, wd = 0.125, 0.5, 0.75, 0.5
    # lion-pytorch, in plain torch: p *= 1 - lr*wd; p -= lr*sign(c); m = b2*m + (1-b2)*g.
    want_p = p * (1 - lr * wd) - lr * torch.sign(b1 * m + (1 - b1) * g)
    want_m = b2 * m + (1 - b2) * g
    assert not want_p.isnan().any()  # sign(NaN) = 0: the NaN lanes only decay
    ps, ms = [p.clone()], [m.clone()]
    ops.lion_(ps, [g], ms, lr=lr, beta1=b1, beta2=b2, weight_decay=wd, backend=backend)
    _assert_same(ps[0], want_p, "param", *TOL[dtype])
    _assert_same(ms[0], want_m, "exp_avg", *TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_lion_zero_decay_follows_lion_pytorch(backend):
    """lion-pytorch multiplies by 1 - lr*wd even for wd = 0: with lr = inf that is NaN."""
    p = torch.tensor([1.0, -2.0])
    g = torch.tensor([0.5, -0.5])
    ps, ms = [p.clone()], [torch.zeros(2)]
    ops.lion_(ps, [g], ms, lr=INF, beta1=0.9, beta2=0.99, weight_decay=0.0, backend=backend)
    assert ps[0].isnan().all()


# --------------------------------------------------------------------------------------------
# weight_decay == 0 is no decay (per tensor)


def _adam_against_torch(backend, dtype, decoupled, lr, params, wds):
    """One fusedopt Adam/AdamW step against torch's, one param group per tensor."""
    grads = [torch.linspace(-1.0, 1.0, p.numel(), dtype=dtype).reshape(p.shape) for p in params]
    theirs = [torch.nn.Parameter(p.clone()) for p in params]
    for q, g in zip(theirs, grads, strict=True):
        q.grad = g.clone()
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    opt = cls([{"params": [q], "weight_decay": wd} for q, wd in zip(theirs, wds, strict=True)],
              lr=lr, foreach=False)  # fmt: skip
    opt.step()
    ours = [p.clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    steps = [torch.zeros(()) for _ in params]
    ops.adamw_(ours, grads, m, v, steps, lr=lr, weight_decay=wds, decoupled=decoupled,
               backend=backend)  # fmt: skip
    for i, q in enumerate(theirs):
        st = opt.state[q]
        _assert_same(ours[i], q.detach(), f"param {i}", *TOL[dtype])
        _assert_same(m[i], st["exp_avg"], f"exp_avg {i}", *TOL[dtype])
        _assert_same(v[i], st["exp_avg_sq"], f"exp_avg_sq {i}", *TOL[dtype])
    return ours


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", BACKENDS)
def test_adam_l2_zero_decay_keeps_an_infinite_param(backend, dtype):
    """Tensor 0 has wd = 0 and holds -inf and inf; tensor 1 decays (wd 0.1) in the same call."""
    params = [torch.tensor([-INF, 1.0, INF, -0.5], dtype=dtype), torch.ones(3, dtype=dtype)]
    ours = _adam_against_torch(backend, dtype, False, 1e-2, params, [0.0, 0.1])
    assert ours[0][0] == -INF and ours[0][2] == INF and ours[0].isfinite()[1::2].all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", BACKENDS)
def test_adamw_zero_decay_with_infinite_lr(backend, dtype):
    """lr = inf, wd = 0: torch never forms 1 - inf*0, so a param with a non-zero grad goes
    to +-inf, not NaN (a zero grad gives inf*0 = NaN in torch too)."""
    params = [torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=dtype), torch.ones(3, dtype=dtype)]
    ours = _adam_against_torch(backend, dtype, True, INF, params, [0.0, 0.0])
    assert ours[0].isinf().any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_sgd_and_lamb_zero_decay_keep_an_infinite_param(backend):
    p = torch.tensor([-INF, 1.0, 2.0])
    g = torch.tensor([0.5, -0.5, 0.25])
    ps = [p.clone()]
    ops.sgd_(ps, [g], lr=0.1, weight_decay=0.0, backend=backend)
    assert ps[0][0] == -INF and ps[0][1:].isfinite().all()
    ps, m, v, steps = [p.clone()], [torch.zeros(3)], [torch.zeros(3)], [torch.zeros(())]
    ops.lamb_(ps, [g], m, v, steps, lr=0.1, weight_decay=0.0, backend=backend)
    assert ps[0][0] == -INF and ps[0][1:].isfinite().all()


# --------------------------------------------------------------------------------------------
# fp64 clipping: fp64 norm, fp64 coefficient


STEPS = 6
SHAPES = [(6, 5), (7,), (3, 3)]


def _fp64_run(make_opt, reference_step):
    """Runs the fusedopt optimizer and a plain-torch fp64 step on the same random grads
    (norm ~4-8, so that a max_grad_norm of 1 clips at every step)."""
    gen = torch.Generator().manual_seed(3)
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    ours = [torch.nn.Parameter(p.clone()) for p in init]
    theirs = [torch.nn.Parameter(p.clone()) for p in init]
    opt = make_opt(ours)
    state: dict = {}
    for _ in range(STEPS):
        for a, b in zip(ours, theirs, strict=True):
            g = 2.0 * torch.randn(a.shape, generator=gen, dtype=torch.float64)
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        reference_step(theirs, state)
    assert opt.last_grad_norm.dtype == torch.float64
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        # Each step adds a few fp64 roundings; an fp32 coefficient is off by ~1e-8.
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-15, msg=f"param {i}")


def _timm_lamb_fp64(params, state, *, lr, wd, max_grad_norm, betas=(0.9, 0.999), eps=1e-6):
    """timm's Lamb.step (grad_averaging, bias correction, no trust clip), in fp64."""
    grads = [p.grad for p in params]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    clip = torch.where(norm > max_grad_norm, norm / max_grad_norm, torch.ones((), dtype=norm.dtype))
    b1, b2 = betas
    for p, g in zip(params, grads, strict=True):
        g = g / clip
        s = state.setdefault(id(p), {"t": 0, "m": torch.zeros_like(p), "v": torch.zeros_like(p)})
        s["t"] += 1
        s["m"] = b1 * s["m"] + (1 - b1) * g
        s["v"] = b2 * s["v"] + (1 - b2) * g * g
        bc1, bc2 = 1 - b1 ** s["t"], 1 - b2 ** s["t"]
        update = (s["m"] / bc1) / (s["v"].sqrt() / math.sqrt(bc2) + eps) + wd * p.detach()
        w_norm, u_norm = p.detach().norm(), update.norm()
        ratio = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, 1.0)
        with torch.no_grad():
            p -= lr * (update * ratio)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp64_lamb_global_clip_is_fp64(backend):
    kw = dict(lr=1e-2, wd=0.01, max_grad_norm=1.0)
    _fp64_run(
        lambda ps: fusedopt.LAMB(ps, lr=kw["lr"], weight_decay=kw["wd"],
                                 max_grad_norm=kw["max_grad_norm"], backend=backend),
        lambda ps, state: _timm_lamb_fp64(ps, state, **kw),
    )  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp64_adamw_max_grad_norm_is_fp64(backend):
    """AdamW's max_grad_norm is torch's clip_grad_norm_ followed by torch's AdamW."""
    torch_opts: dict = {}

    def torch_step(ps, state):
        opt = torch_opts.setdefault("opt", torch.optim.AdamW(ps, lr=1e-2, foreach=False))
        torch.nn.utils.clip_grad_norm_(ps, 1.0, foreach=False)
        opt.step()

    _fp64_run(
        lambda ps: fusedopt.AdamW(ps, lr=1e-2, max_grad_norm=1.0, backend=backend), torch_step
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp64_step_takes_fp64_scalars_and_fp32_ones(backend):
    """An fp64 call reads an fp64 clip_coef unrounded; an fp32 one still works (widened
    exactly); fp32 params reject an fp64 scalar with a clear error."""
    coef = 1.0 / 3.0
    for scalar_dtype in (torch.float64, torch.float32):
        p = torch.ones(4, dtype=torch.float64)
        g = torch.full((4,), 3.0, dtype=torch.float64)
        c = torch.tensor(coef, dtype=scalar_dtype)
        ps = [p.clone()]
        ops.sgd_(ps, [g], lr=1.0, weight_decay=0.0, clip_coef=c, backend=backend)
        want = p - 3.0 * c.double()  # c widened to fp64 exactly
        assert torch.equal(ps[0], want)
    with pytest.raises(TypeError, match="clip_coef must be a one-element float32 tensor"):
        ops.sgd_([torch.ones(2)], [torch.ones(2)], lr=1.0,
                 clip_coef=torch.tensor(0.5, dtype=torch.float64), backend=backend)  # fmt: skip
