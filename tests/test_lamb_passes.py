"""LAMB's two passes as ops (``lamb_direction_``, ``lamb_apply_``; [note: multi-pass ops] in
DESIGN.md §2) on every CPU-side backend: the pair is ``lamb_`` bit for bit, each pass agrees
with the reference, ``lamb_apply_`` takes its trust ratios from the ``sq_norms`` it is handed
(the all-reduced ones, for a sharded param), ``found_inf`` skips both, bad ``sq_norms`` are
refused before any tensor is touched. The CUDA launchers: csrc/tests/test_cuda_emulated.cpp.
"""

from __future__ import annotations

import pytest
import torch
from harness.cases import backend_device_params

from fusedopt import ops

BACKENDS = [p for p in backend_device_params() if p.values[0][1] == "cpu"]

#: (params, grads, master weights) of each storage.
STORAGES = {
    "fp32": (torch.float32, torch.float32, False),
    "bf16": (torch.bfloat16, torch.bfloat16, False),
    "bf16_master": (torch.bfloat16, torch.bfloat16, True),
    "fp64": (torch.float64, torch.float64, False),
}

#: An empty tensor, sizes that are not multiples of a vector, one past a Triton block.
SHAPES = [(5, 7), (0,), (33,), (4, 4), (1025,)]
#: Weight decay per tensor: 0 on two tensors, so that adapting and non-adapting tensors (and
#: with it one-pass and two-pass tensors, [note: lamb passes]) share a call.
WEIGHT_DECAY = [0.1, 0.0, 0.2, 0.0, 0.05]


def _lists(storage: str, seed: int = 0) -> dict[str, list[torch.Tensor]]:
    param_dtype, grad_dtype, master = STORAGES[storage]
    state_dtype = torch.float32 if master else param_dtype
    gen = torch.Generator().manual_seed(seed)

    def randn(shape, dtype):
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)

    params = [randn(s, param_dtype) for s in SHAPES]
    return dict(
        params=params,
        grads=[randn(s, grad_dtype) for s in SHAPES],
        exp_avgs=[randn(s, state_dtype) * 0.1 for s in SHAPES],
        exp_avg_sqs=[randn(s, state_dtype).abs() * 0.01 for s in SHAPES],
        steps=[torch.tensor(float(k + 2)) for k in range(len(SHAPES))],
        master_params=[p.float() + 1e-3 * randn(p.shape, torch.float32) for p in params]
        if master
        else [],
    )


def _clone(lists):
    return {k: [t.clone() for t in v] for k, v in lists.items()}


def _hypers(backend: str, **overrides) -> dict:
    kw = dict(
        lr=0.05, beta1=0.9, beta2=0.99, eps=1e-6, weight_decay=WEIGHT_DECAY,
        grad_scale=torch.tensor(2.0), clip_coef=torch.tensor(0.5), backend=backend,
    )  # fmt: skip
    kw.update(overrides)
    return kw


def _assert_equal_bits(got, want, what):
    for name in want:
        for i, (a, b) in enumerate(zip(got[name], want[name], strict=True)):
            assert torch.equal(a, b) or (a.isnan() == b.isnan()).all(), f"{what}: {name}[{i}]"
            assert torch.equal(a.nan_to_num(), b.nan_to_num()), f"{what}: {name}[{i}]"


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("storage", list(STORAGES))
@pytest.mark.parametrize(
    "flags",
    [{}, {"always_adapt": True, "trust_clip": True}, {"grad_averaging": False}],
    ids=["default", "always_adapt_trust_clip", "no_grad_averaging"],
)
def test_the_two_passes_are_lamb_bit_for_bit(backend_device, storage, flags):
    backend, _ = backend_device
    kw = _hypers(backend, **flags)
    one, two = _lists(storage), _lists(storage)
    ops.lamb_(**one, **kw)
    sq_norms = ops.lamb_direction_(**two, **kw)
    ops.lamb_apply_(**two, sq_norms=sq_norms, **kw)
    _assert_equal_bits(two, one, f"{backend} {storage}")
    start = _lists(storage)["params"]
    assert any(not torch.equal(a, b) for a, b in zip(one["params"], start, strict=True))


def _tolerance(storage: str) -> dict:
    # The passes compute in fp32 (fp64 for fp64) like the reference backend; the sums of
    # squares are reductions in another order (relative error <= n * u for n <= 1025 terms).
    return {"fp64": dict(rtol=1e-12, atol=1e-14)}.get(storage, dict(rtol=2e-4, atol=1e-6))


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("storage", list(STORAGES))
def test_direction_matches_the_reference(backend_device, storage):
    """sq_norms (0 where a tensor does not adapt), the advanced steps, and the moments: stored
    by this pass exactly where the tensor takes two passes ([note: lamb passes])."""
    backend, _ = backend_device
    got, want = _lists(storage), _lists(storage)
    got_sq = ops.lamb_direction_(**got, **_hypers(backend))
    want_sq = ops.lamb_direction_(**want, **_hypers("reference"))
    assert got_sq.dtype == (torch.float64 if storage == "fp64" else torch.float32)
    assert got_sq.shape == (len(SHAPES), 2)
    torch.testing.assert_close(got_sq, want_sq, **_tolerance(storage))
    assert (got_sq[[1, 3]] == 0).all()  # wd == 0: not computed
    before = _lists(storage)
    for i in range(len(SHAPES)):
        assert torch.equal(got["steps"][i], before["steps"][i] + 1)
        two_pass = storage != "bf16" and WEIGHT_DECAY[i] != 0
        for name in ("exp_avgs", "exp_avg_sqs"):
            changed = not torch.equal(got[name][i], before[name][i])
            assert changed == (two_pass and got[name][i].numel() > 0), (name, i)
            torch.testing.assert_close(got[name][i], want[name][i], **_tolerance(storage))
        assert torch.equal(got["params"][i], before["params"][i])  # not written here


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("storage", ["fp32", "bf16_master"])
def test_apply_takes_the_norms_it_is_given(backend_device, storage):
    """The trust ratio comes from the sq_norms argument (the all-reduced sums of a sharded
    param), not from the local tensor: scaled sums move the params as the reference says."""
    backend, _ = backend_device
    got, want = _lists(storage), _lists(storage)
    sq_norms = ops.lamb_direction_(**got, **_hypers(backend))
    ops.lamb_direction_(**want, **_hypers("reference"))
    summed = sq_norms * torch.tensor([4.0, 0.25], dtype=sq_norms.dtype)  # ratio x 4
    ops.lamb_apply_(**got, sq_norms=summed, **_hypers(backend))
    ops.lamb_apply_(**want, sq_norms=summed, **_hypers("reference"))
    for name in want:
        for a, b in zip(got[name], want[name], strict=True):
            torch.testing.assert_close(a, b, **_tolerance(storage))
    plain = _lists(storage)
    ops.lamb_(**plain, **_hypers("reference"))
    assert not torch.allclose(got["params"][0].double(), plain["params"][0].double())


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_found_inf_skips_both_passes(backend_device):
    backend, _ = backend_device
    lists = _lists("bf16_master")
    kw = _hypers(backend, found_inf=torch.tensor(1.0))
    sq_norms = ops.lamb_direction_(**lists, **kw)
    assert (sq_norms == 0).all()
    ops.lamb_apply_(**lists, sq_norms=torch.ones_like(sq_norms), **kw)
    _assert_equal_bits(lists, _lists("bf16_master"), f"{backend} skipped")


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize(
    "bad",
    [torch.zeros(len(SHAPES), 3), torch.zeros(len(SHAPES), 2, dtype=torch.float64), "none"],
    ids=["shape", "dtype", "missing"],
)
def test_apply_refuses_bad_norms_before_touching_anything(backend_device, bad):
    backend, _ = backend_device
    lists = _lists("fp32")
    with pytest.raises(TypeError, match="sq_norms"):
        ops.lamb_apply_(**lists, sq_norms=None if bad == "none" else bad, **_hypers(backend))
    _assert_equal_bits(lists, _lists("fp32"), "refused")


def test_the_passes_take_lamb_keywords_and_defaults():
    """Bound by ``lamb_``'s signature: its defaults apply, an unknown keyword is refused."""
    one, two = _lists("fp32"), _lists("fp32")
    ops.lamb_(**one, lr=0.01, backend="reference")
    sq_norms = ops.lamb_direction_(**two, lr=0.01, backend="reference")
    ops.lamb_apply_(**two, sq_norms=sq_norms, lr=0.01, backend="reference")
    _assert_equal_bits(two, one, "defaults")
    with pytest.raises(TypeError, match="weight_dcay"):
        ops.lamb_direction_(**two, lr=0.01, weight_dcay=0.1)
    with pytest.raises(TypeError, match="lr"):
        ops.lamb_apply_(**two, sq_norms=sq_norms)
