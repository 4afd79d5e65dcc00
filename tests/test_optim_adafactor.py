"""``fusedopt.Adafactor`` against ``torch.optim.Adafactor``: the constructor's names, defaults
and checks, state dicts both ways (torch's keys: ``row_var``, ``col_var``, ``variance``,
``step``), and whole trajectories over matrices, batched 3-d params, vectors and scalars, with
weight decay and maximize, on every usable backend."""

from __future__ import annotations

import pytest
import torch
from optim_cases import assert_arguments_are_torchs, usable_backends

import fusedopt

#: Params of every kind Adafactor treats apart: matrices (factored over the last two dims),
#: batched 3-d (leading dim batched), a column and a row matrix (a factor of size 1), vectors
#: and a scalar (unfactored). (torch.optim.Adafactor fails on an empty param: 0/0.)
SHAPES = [(5, 7), (3, 4, 6), (8, 1), (1, 9), (11,), (), (2, 3, 1, 5)]


def _params(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=dtype) for s in SHAPES]


def _grads(steps, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g, dtype=dtype) for s in SHAPES] for _ in range(steps)]


def test_constructor_names_and_defaults_are_torchs():
    assert_arguments_are_torchs(fusedopt.Adafactor, torch.optim.Adafactor)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(lr=-1.0), "Learning rate should be >= 0"),
        (dict(beta2_decay=0.5), "beta2_decay should be <= 0"),
        (dict(eps=(-1.0, 1e-3)), "epsilon1 should be >= 0"),
        (dict(eps=(None, -1.0)), "epsilon2 should be >= 0"),
        (dict(d=0.5), "Clipping threshold d should be >= 1"),
        (dict(weight_decay=-0.1), "weight_decay should be >= 0"),
    ],
)
def test_bad_arguments_raise_torchs_errors(kwargs, message):
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match=message):
        torch.optim.Adafactor([p], **kwargs)
    with pytest.raises(ValueError, match=message):
        fusedopt.Adafactor([p], **kwargs)


CONFIGS = {
    "default": dict(),
    "wd_maximize": dict(lr=0.05, weight_decay=0.1, maximize=True),
    "eps_d_decay": dict(lr=0.5, eps=(1e-20, 1e-2), d=1.5, beta2_decay=-0.5),
}


def _run(cls, params, grads, **kwargs):
    opt = cls(params, **kwargs)
    for step_grads in grads:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g.clone()
        opt.step()
    return opt


@pytest.mark.parametrize("backend", usable_backends("cpu"))
@pytest.mark.parametrize("config", list(CONFIGS))
def test_trajectory_equals_torch_in_float64(backend, config):
    """25 steps of random grads on fp64 params; the backends compute in fp64 for fp64 params,
    so they match torch to float64 rounding (torch squares a norm where we sum squares, and
    takes rsqrt where we divide by sqrt: a few ulps per step). ``eps_d_decay``'s lr 0.5 makes
    ``rho = min(lr, 1/sqrt(t))`` take ``1/sqrt(t)`` from step 5 on (the other configs keep
    ``rho = lr``), and its d = 1.5 is the clip threshold that acts."""
    kwargs = CONFIGS[config]
    grads = _grads(25)
    ours, theirs = _params(), _params()
    opt = _run(fusedopt.Adafactor, ours, grads, **kwargs, backend=backend)
    ref = _run(torch.optim.Adafactor, theirs, grads, **kwargs)
    for p, q in zip(ours, theirs, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    for p, q in zip(ours, theirs, strict=True):
        mine, torchs = opt.state[p], ref.state[q]
        assert set(torchs) == {k for k in mine if mine[k].numel() or k == "step"}
        for key in torchs:
            torch.testing.assert_close(mine[key], torchs[key], rtol=1e-12, atol=1e-20, msg=key)


def test_update_clip_and_relative_step_are_active():
    """The trajectory test would pass vacuously if the clip ``d`` and ``rho`` never acted:
    changing d (with the update clipped) changes the result, and lr 0.5 and 0.6 give the same
    steps once ``1/sqrt(t)`` is below both."""
    grads = _grads(6)
    base = _params()
    _run(fusedopt.Adafactor, base, grads, lr=0.5, backend="reference")
    other_d = _params()
    _run(fusedopt.Adafactor, other_d, grads, lr=0.5, d=1.5, backend="reference")
    assert any(not torch.equal(p, q) for p, q in zip(base, other_d, strict=True))
    late = [[torch.zeros_like(g) for g in step] for step in grads[:5]] + grads[5:]
    a, b = _params(), _params()
    opt_a = _run(fusedopt.Adafactor, a, late[:5], lr=0.5, backend="reference")
    opt_b = _run(fusedopt.Adafactor, b, late[:5], lr=0.6, backend="reference")
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))  # zero grads: no update
    for opt, ps in ((opt_a, a), (opt_b, b)):
        for p, g in zip(ps, late[5], strict=True):
            p.grad = g.clone()
        opt.step()  # t = 6: rho = 1/sqrt(6) < 0.5 for both
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))


@pytest.mark.parametrize("backend", usable_backends("cpu"))
def test_float32_trajectory_is_close_to_torch(backend):
    """fp32 params, 25 steps, against torch's fp32 step: the same math in another order of
    operations (rsqrt vs division, norm² vs sum of squares, its mean of row_var)."""
    grads = _grads(25, torch.float32)
    ours, theirs = _params(torch.float32), _params(torch.float32)
    _run(fusedopt.Adafactor, ours, grads, lr=0.05, weight_decay=0.1, backend=backend)
    _run(torch.optim.Adafactor, theirs, grads, lr=0.05, weight_decay=0.1)
    for p, q in zip(ours, theirs, strict=True):
        torch.testing.assert_close(p, q, rtol=2e-5, atol=2e-6)


#: Params that span several reduction chunks ([note: adafactor sums] in
#: csrc/include/fusedopt/math/adafactor.h: whole rows, ~2^16 elements a chunk): two chunks
#: (255 rows, then 45), two per batch of a 3-d param, rows longer than a chunk (a row a
#: chunk), and a vector of three chunks.
CHUNKED_SHAPES = [(300, 257), (2, 30, 2500), (2, 70000), (2 * 65536 + 5,)]


def assert_chunked_trajectory_is_torchs(backend: str, device: str = "cpu") -> list:
    """3 steps over CHUNKED_SHAPES in fp64 on ``device``: the params equal torch's (on the
    CPU) to float64 rounding; returns ours. Shared with test_cuda_backend.py."""
    g = torch.Generator().manual_seed(2)
    start = [torch.randn(s, generator=g, dtype=torch.float64) for s in CHUNKED_SHAPES]
    grads = [[torch.randn(s, generator=g, dtype=torch.float64) for s in CHUNKED_SHAPES]
             for _ in range(3)]  # fmt: skip
    kwargs = dict(lr=0.05, weight_decay=0.1)
    ours, theirs = [p.to(device) for p in start], [p.clone() for p in start]
    on_device = [[g.to(device) for g in step] for step in grads]
    _run(fusedopt.Adafactor, ours, on_device, **kwargs, backend=backend)
    _run(torch.optim.Adafactor, theirs, grads, **kwargs)
    for p, q in zip(ours, theirs, strict=True):
        torch.testing.assert_close(p.cpu(), q, rtol=1e-12, atol=1e-14)
    return ours


@pytest.mark.parametrize("backend", usable_backends("cpu"))
def test_chunked_reductions_equal_torch_in_float64(backend):
    """Row sums complete in their chunk, column sums folded over chunks and per-chunk sums of
    p² and u²: the trajectory over tensors of several chunks is torch's to float64 rounding,
    and the CPU's is the same bits whatever its thread count."""
    ours = assert_chunked_trajectory_is_torchs(backend)
    if backend == "cpu":
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            serial = assert_chunked_trajectory_is_torchs(backend)
        finally:
            torch.set_num_threads(threads)
        assert all(torch.equal(p, q) for p, q in zip(ours, serial, strict=True))


@pytest.mark.parametrize("backend", usable_backends("cpu"))
def test_torch_state_dict_loads_and_continues(backend):
    """A torch.optim.Adafactor state dict after 5 steps loads into fusedopt.Adafactor, and ours
    into torch's; both then continue as the uninterrupted run."""
    grads = _grads(10)
    ps, qs, rs = _params(), _params(), _params()
    torch_opt = _run(torch.optim.Adafactor, ps, grads[:5], lr=0.05, weight_decay=0.1)
    for p, q in zip(ps, qs, strict=True):
        q.data.copy_(p)
    ours = fusedopt.Adafactor(qs, lr=0.05, weight_decay=0.1, backend=backend)
    ours.load_state_dict(torch_opt.state_dict())
    whole = _run(torch.optim.Adafactor, rs, grads, lr=0.05, weight_decay=0.1)
    for step_grads in grads[5:]:
        for q, g in zip(qs, step_grads, strict=True):
            q.grad = g.clone()
        ours.step()
    for q, r in zip(qs, rs, strict=True):
        torch.testing.assert_close(q, r, rtol=1e-12, atol=1e-14)
    saved = ours.state_dict()
    assert {k: set(v) for k, v in saved["state"].items()} == {
        k: set(v) for k, v in whole.state_dict()["state"].items()
    }
    # and back: ours into torch's
    back = torch.optim.Adafactor([r.clone() for r in rs], lr=0.05, weight_decay=0.1)
    back.load_state_dict(saved)
    for key, state in back.state_dict()["state"].items():
        for name, value in state.items():
            torch.testing.assert_close(value, whole.state_dict()["state"][key][name])


def test_state_dict_round_trip_and_wrong_shapes_raise():
    grads = _grads(3)
    ps = _params()
    opt = _run(fusedopt.Adafactor, ps, grads, backend="reference")
    saved = opt.state_dict()
    again = fusedopt.Adafactor(_params(), backend="reference")
    again.load_state_dict(saved)
    for key, state in again.state_dict()["state"].items():
        for name, value in state.items():
            assert torch.equal(value, saved["state"][key][name]), name
    bad = opt.state_dict()
    bad["state"][0] = {**bad["state"][0], "row_var": torch.zeros(5, 7)}
    with pytest.raises(ValueError, match=r"state 'row_var' has shape \(5, 7\) but a 'row'"):
        fusedopt.Adafactor(_params(), backend="reference").load_state_dict(bad)


def test_factored_param_must_be_contiguous():
    p = torch.nn.Parameter(torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last))
    p.grad = torch.randn_like(p)
    opt = fusedopt.Adafactor([p], backend="reference")
    before = p.detach().clone()
    with pytest.raises(RuntimeError, match="is not contiguous"):
        opt.step()
    assert torch.equal(p, before)


def _factored_state(seed: int) -> dict[str, list[torch.Tensor]]:
    """fp32 params, grads and zero Adafactor states of SHAPES: a factored param (two or more
    dims) keeps a row and a column vector and a (0,) placeholder variance, any other its
    variance and (0,) placeholders."""
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g) for s in SHAPES]
    empty = torch.zeros(0)
    return dict(
        params=params,
        grads=[torch.randn(s, generator=g) for s in SHAPES],
        row_vars=[p.new_zeros((*p.shape[:-1], 1)) if p.dim() >= 2 else empty for p in params],
        col_vars=[
            p.new_zeros((*p.shape[:-2], 1, p.shape[-1])) if p.dim() >= 2 else empty for p in params
        ],
        variances=[empty if p.dim() >= 2 else torch.zeros_like(p) for p in params],
        steps=[torch.zeros(()) for _ in params],
    )


@pytest.mark.parametrize("backend", usable_backends())
def test_passes_are_the_step_bit_for_bit(backend):
    """ops.adafactor_norms_ then ops.adafactor_apply_, with adafactor_'s keywords (eps1=None
    among them: the pass wrappers convert it as the step op does), leave the bits that
    ops.adafactor_ leaves, twice over."""
    kwargs = dict(lr=0.05, eps1=None, weight_decay=0.1, d=0.5, backend=backend)
    step, passes = _factored_state(2), _factored_state(2)
    for _ in range(2):
        fusedopt.ops.adafactor_(**step, **kwargs)
        sq_norms = fusedopt.ops.adafactor_norms_(**passes, **kwargs)
        fusedopt.ops.adafactor_apply_(**passes, sq_norms=sq_norms, **kwargs)
    for key, tensors in step.items():
        for want, got in zip(tensors, passes[key], strict=True):
            assert torch.equal(got, want), key
