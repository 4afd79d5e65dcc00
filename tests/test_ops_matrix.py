"""The op matrix: every op x options x storage x layout x scalars, on every backend that can
run here (others skip with fusedopt's reason), against the float64 oracle. See
``tests/harness/__init__.py``."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from harness import (
    LAYOUTS,
    OPTIONS,
    STORAGES,
    ListCase,
    StepCase,
    backend_device_params,
    backend_usable,
    check_grad_norm,
    check_scale,
    check_step_case,
    compare_backends,
    found_inf_cases,
    grad_norm_cases,
    scale_cases,
    step_cases,
)
from harness.cases import LAYOUT_STEPS, SCALARS, op_layout, params
from harness.checks import (
    assert_close,
    lion_excused,
    make_grads,
    make_inputs,
    run_backend,
    same_bits,
    to_oracle,
)
from harness.tolerances import TOLERANCES, tolerance, ulp_distance

from fusedopt._contract import BACKEND_NAMES

BACKENDS = backend_device_params()


@pytest.mark.parametrize("case", params(step_cases()))
@pytest.mark.parametrize("target", BACKENDS)
def test_step(target, case: StepCase):
    backend, device = target
    check_step_case(case, backend, device)


@pytest.mark.parametrize("case", params(found_inf_cases()))
@pytest.mark.parametrize("target", BACKENDS)
def test_found_inf_skips_bit_for_bit(target, case: StepCase):
    """Skipped steps before the first step and after the second change nothing, and the
    trajectory after them matches an oracle that never saw them (SGD's first-step rule, bias
    corrections from uncounted steps)."""
    backend, device = target
    check_step_case(case, backend, device, skip_at=(0, 2))


@pytest.mark.parametrize("case", params(grad_norm_cases()))
@pytest.mark.parametrize("target", BACKENDS)
def test_grad_norm(target, case: ListCase):
    backend, device = target
    check_grad_norm(case, backend, device)


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("target", BACKENDS)
def test_non_finite_sets_found_inf(target, dtype, bad):
    """grad_norm reports it; scale_ sets (and never clears) its flag."""
    from harness.checks import make_list

    backend, device = target
    case = ListCase(dtype, "mixed")
    tensors = make_list(case, device)
    tensors[7].view(-1)[500] = bad  # deep inside the 1025-element offset view
    assert ops_grad_norm(tensors, backend).found_inf.item() == 1.0
    flag = torch.zeros((), device=device)
    from fusedopt import ops

    ops.scale_(tensors, torch.tensor(2.0, device=device), flag, backend=backend)
    assert flag.item() == 1.0
    tensors[7].view(-1)[500] = 0.0
    ops.scale_(tensors, torch.tensor(1.0, device=device), flag, backend=backend)
    assert flag.item() == 1.0, "scale_ cleared found_inf"


def ops_grad_norm(tensors, backend):
    from fusedopt import ops

    return ops.grad_norm(tensors, 2.0, backend=backend)


@pytest.mark.parametrize("case", params(scale_cases()))
@pytest.mark.parametrize("target", BACKENDS)
def test_scale(target, case: ListCase):
    backend, device = target
    check_scale(case, backend, device)


@pytest.mark.parametrize("op", list(OPTIONS))
@pytest.mark.parametrize("target", BACKENDS)
def test_one_call_over_several_dtypes_equals_one_call_per_dtype(target, op):
    """fusedopt.ops splits a call by (param dtype, grad dtype); with per-tensor hypers and a
    length-N lr tensor the split must hand each group its own values: the result of one call
    over fp32, bf16 and bf16-with-fp32-grad params is, bit for bit, that of three calls."""
    backend, device = target
    storages = ("fp32", "bf16", "bf16_fp32grad")

    def parts():
        out = []
        for seed, storage in enumerate(storages):
            layout = op_layout(op, "mixed")
            case = StepCase(OPTIONS[op][0], STORAGES[storage], layout, SCALARS["groups"])
            inputs = make_inputs(case, device, seed=seed)
            inputs.lists["grads"] = make_grads(inputs, 1)
            inputs.lr_tensor *= 1 + seed  # each group its own lrs: a mix-up shows
            out.append(inputs)
        return out

    separate, joint = parts(), parts()
    for inputs in separate:
        run_backend(inputs, backend)
    merged = dataclasses.replace(
        joint[0],
        lists={k: [t for p in joint for t in p.lists[k]] for k in joint[0].lists},
        hypers={k: [v for p in joint for v in p.hypers[k]] for k in joint[0].hypers},
        lr_tensor=torch.cat([p.lr_tensor for p in joint]),
    )
    run_backend(merged, backend)
    for a, b in zip(separate, joint, strict=True):
        for name, ts in a.lists.items():
            for i, (x, y) in enumerate(zip(ts, b.lists[name], strict=True)):
                assert same_bits(x, y), f"{a.case.id}: {name}[{i}] differs when called jointly"


# ---------------------------------------------------------------------------------------------
# Backends against each other


def _agree_params():
    out = []
    for p in backend_device_params(include_reference=False):
        (backend, device), marks = p.values[0], p.marks
        for op, options in OPTIONS.items():
            case = StepCase(options[0], STORAGES["fp32"], op_layout(op, "mixed"), SCALARS["amp"])
            out.append(
                pytest.param(backend, device, case, marks=marks, id=f"{backend}-{device}-{op}")
            )
    return out


@pytest.mark.parametrize(("backend", "device", "case"), _agree_params())
def test_backends_agree(backend, device, case):
    """The same pinned fp32 math on two backends: a couple of ULPs per step, or find out why."""
    usable, reason = backend_usable("reference", device)
    if not usable:
        pytest.skip(reason)
    compare_backends(case, backend, "reference", device)


# ---------------------------------------------------------------------------------------------
# Compact masters against fp32 masters


def _compact_params():
    out = []
    for p in BACKENDS:
        (backend, device), marks = p.values[0], p.marks
        for op, options in OPTIONS.items():
            for layout, scalars in (("mixed", "amp"), ("mixed", "groups"), ("many", "amp"),
                                    ("big", "lr_tensor")):  # fmt: skip
                layout = op_layout(op, layout)
                case = StepCase(options[0], STORAGES["bf16_master"], layout, SCALARS[scalars])
                out.append(pytest.param(backend, device, case, marks=marks,
                                        id=f"{backend}-{device}-{case.id}"))  # fmt: skip
    return out


@pytest.mark.parametrize(("backend", "device", "case"), _compact_params())
def test_compact_master_equals_fp32_master(backend, device, case):
    """[note: compact master] (fusedopt._contract): the matrix's bf16-with-fp32-master case run
    a second time with compact masters (int16 remainders beside the bf16 params): after every
    step the joined master and every state equal the fp32-master run's bit for bit, and the
    param is that master split (rounded to nearest, ties away from zero: the fp32 run's param
    but at exact ties). The fp32-master run itself is held to the oracle by ``test_step``."""
    from fusedopt.reference.ops import join_master, split_master

    fp32, compact = make_inputs(case, device), make_inputs(case, device)
    for i, (p, m) in enumerate(zip(compact.lists["params"], fp32.lists["master_params"],
                                   strict=True)):  # fmt: skip
        param, remainder = split_master(m.cpu())
        p.copy_(param)  # the split param (a tie would round away from zero)
        compact.lists["master_params"][i] = torch.empty_like(p, dtype=torch.int16).copy_(remainder)
    for k in range(1, LAYOUT_STEPS[case.layout] + 1):
        fp32.lists["grads"] = make_grads(fp32, k)
        compact.lists["grads"] = [g.clone() for g in fp32.lists["grads"]]
        run_backend(fp32, backend)
        run_backend(compact, backend)
        where = f"{case.id} on {backend}/{device}, step {k}"
        for i, (p, r, m) in enumerate(zip(compact.lists["params"],
                                          compact.lists["master_params"],
                                          fp32.lists["master_params"], strict=True)):  # fmt: skip
            assert r.dtype == torch.int16
            assert same_bits(join_master(p.cpu(), r.cpu()), m.cpu()), f"{where}: master[{i}]"
            assert same_bits(p.cpu(), split_master(m.cpu())[0]), f"{where}: params[{i}]"
        for name, ts in fp32.lists.items():
            if name in ("params", "master_params", "grads"):
                continue
            for i, (a, b) in enumerate(zip(compact.lists[name], ts, strict=True)):
                assert same_bits(a, b), f"{where}: {name}[{i}] differs from the fp32 master's"


# ---------------------------------------------------------------------------------------------
# Kahan masters against the fp32-master step from the joined master


#: (storage, layout, scalars) of the Kahan cases: bf16 and fp16, fp32 grads, three layouts.
KAHAN_CASES = (
    ("bf16_master", "mixed", "amp"),
    ("fp16_master", "mixed", "groups"),
    ("bf16_master", "many", "amp"),
    ("bf16_master_fp32grad", "big", "lr_tensor"),
)


def _kahan_params():
    out = []
    for p in BACKENDS:
        (backend, device), marks = p.values[0], p.marks
        for op, options in OPTIONS.items():
            for storage, layout, scalars in KAHAN_CASES:
                layout = op_layout(op, layout)
                case = StepCase(options[0], STORAGES[storage], layout, SCALARS[scalars])
                out.append(pytest.param(backend, device, case, marks=marks,
                                        id=f"{backend}-{device}-{case.id}"))  # fmt: skip
    return out


@pytest.mark.parametrize(("backend", "device", "case"), _kahan_params())
def test_kahan_master_equals_joined_fp32_master(backend, device, case):
    """[note: kahan master] (fusedopt._contract): the matrix's 16-bit-with-fp32-master case
    run with Kahan masters (a compensation of the param's dtype beside each param): every
    step equals the same backend's fp32-master step started from the joined master
    (``join_kahan``; the param its rounding, the states the Kahan run's), split after
    (``split_kahan``), bit for bit: param, compensation, every state. The fp32-master step
    itself is held to the oracle by ``test_step``."""
    from fusedopt.reference.ops import join_kahan, split_kahan

    kahan = make_inputs(case, device)
    dtype = case.storage.param
    for i, (p, m) in enumerate(zip(kahan.lists["params"], kahan.lists["master_params"],
                                   strict=True)):  # fmt: skip
        param, comp = split_kahan(m.cpu(), dtype)
        p.copy_(param)
        kahan.lists["master_params"][i] = torch.empty_like(p).copy_(comp)
    for k in range(1, LAYOUT_STEPS[case.layout] + 1):
        fp32 = make_inputs(case, device)
        for name, ts in kahan.lists.items():
            if name in ("params", "master_params", "grads"):
                continue
            for a, b in zip(fp32.lists[name], ts, strict=True):
                a.copy_(b)
        for i, (p, c) in enumerate(zip(kahan.lists["params"], kahan.lists["master_params"],
                                       strict=True)):  # fmt: skip
            joined = join_kahan(p, c)
            fp32.lists["master_params"][i].copy_(joined)
            fp32.lists["params"][i].copy_(joined)
        kahan.lists["grads"] = make_grads(kahan, k)
        fp32.lists["grads"] = [g.clone() for g in kahan.lists["grads"]]
        run_backend(fp32, backend)
        run_backend(kahan, backend)
        where = f"{case.id} on {backend}/{device}, step {k}"
        for i, (p, c, m) in enumerate(zip(kahan.lists["params"], kahan.lists["master_params"],
                                          fp32.lists["master_params"], strict=True)):  # fmt: skip
            want_p, want_c = split_kahan(m.cpu(), dtype)
            assert c.dtype == dtype
            assert same_bits(p.cpu(), want_p), f"{where}: params[{i}]"
            assert same_bits(c.cpu(), want_c), f"{where}: compensation[{i}]"
        for name, ts in fp32.lists.items():
            if name in ("params", "master_params", "grads"):
                continue
            for i, (a, b) in enumerate(zip(kahan.lists[name], ts, strict=True)):
                assert same_bits(a, b), f"{where}: {name}[{i}] differs from the fp32 master's"


# ---------------------------------------------------------------------------------------------
# The harness itself: the registry and the checks can fail


def test_every_backend_is_in_the_matrix():
    ids = {p.id for p in BACKENDS}
    assert ids == {f"{b}-{d}" for b in BACKEND_NAMES for d in ("cpu", "cuda")}


def test_registry_covers_every_op_option_storage_and_layout():
    cases = step_cases()
    assert {c.options for c in cases} == {o for opts in OPTIONS.values() for o in opts}
    assert {c.storage.name for c in cases} == set(STORAGES)
    assert {c.layout for c in cases} == set(LAYOUTS)
    assert {c.scalars.name for c in cases} == set(SCALARS)
    assert len({c.id for c in cases}) == len(cases)


def test_tolerance_table_has_a_reason_per_dtype():
    assert set(TOLERANCES) == {torch.float32, torch.bfloat16, torch.float16}
    for tol in TOLERANCES.values():
        assert tol.reason and tol.rtol < 4e-3


def test_ulp_distance():
    one = torch.tensor([1.0])
    assert ulp_distance(one, torch.nextafter(one, torch.tensor([2.0]))).item() == 1
    tiny = torch.tensor([1e-45])  # the smallest fp32 subnormal
    assert ulp_distance(tiny, -tiny).item() == 2  # across zero: +d, 0, -d
    assert ulp_distance(torch.tensor([0.0]), torch.tensor([-0.0])).item() == 0
    b = torch.tensor([1.0], dtype=torch.bfloat16)
    assert ulp_distance(b, torch.tensor([1.0078125], dtype=torch.bfloat16)).item() == 1


def test_assert_close_catches_one_bad_element():
    want = torch.linspace(-1, 1, 100, dtype=torch.float64)
    got = want.float()
    assert_close(got, want, tolerance(torch.float32), 1, "fine")
    got[37] += 1e-4
    with pytest.raises(AssertionError, match="1 of 100 elements"):
        assert_close(got, want, tolerance(torch.float32), 1, "broken")
    got[37] = float("nan")
    with pytest.raises(AssertionError):
        assert_close(got, want, tolerance(torch.float32), 1, "nan")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_tolerance_takes_rounding_but_not_truncation(dtype):
    """Round-to-nearest of the exact value passes; truncation toward zero (a classic bug of
    hand-written fp32 -> bf16 conversions) errs by up to a whole ulp and must fail."""
    want = torch.randn(10_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert_close(want.to(dtype), want, tolerance(dtype), 1, "rounded")
    bits = {torch.bfloat16: 16, torch.float16: 13}[dtype]  # mantissa bits dropped from fp32
    as_int = want.float().view(torch.int32)
    truncated = (as_int & ~((1 << bits) - 1)).view(torch.float32).to(dtype)
    with pytest.raises(AssertionError):
        assert_close(truncated, want, tolerance(dtype), 1, "truncated")


def test_lion_excuses_only_near_zero_c():
    """c = b1*m + (1-b1)*g: exactly cancelling inputs are excused, a sign flip elsewhere is not."""
    case = StepCase(OPTIONS["lion_"][0], STORAGES["fp32"], "mixed", SCALARS["plain"])
    inputs = make_inputs(case, "cpu")
    oracle = to_oracle(inputs)
    grads = make_grads(inputs, 1)
    b1 = inputs.hypers["beta1"][7]
    m = oracle["exp_avgs"][7]
    g = grads[7].double()
    m.copy_(-(1 - b1) / b1 * g)  # c = 0 up to fp32 rounding everywhere
    m.view(-1)[:10] += 0.5  # ... except here, where |c| is large
    excused = lion_excused(inputs, oracle, grads, 1)[7].view(-1)
    nonzero = g.view(-1) != 0
    assert excused[10:][nonzero[10:]].all()
    assert not excused[:10][nonzero[:10]].any()
    # m = g = 0 exactly: c = 0 in any precision and sign(0) = 0 is owed, not excused.
    assert not excused[~nonzero].any() and (~nonzero[10:]).any()


@pytest.mark.parametrize("op", ["adamw_", "sgd_", "adafactor_", "muon_"])
def test_check_step_case_fails_for_a_wrong_backend(op, monkeypatch):
    """Break the oracle's view of one hyperparameter: the check must notice."""
    import harness.checks as checks

    real = checks.run_oracle

    def off_by_a_little(inputs, oracle, grads, op=None):
        inputs.hypers["lr"] = [lr * (1 + 1e-4) for lr in inputs.hypers["lr"]]
        real(inputs, oracle, grads, op)
        inputs.hypers["lr"] = [lr / (1 + 1e-4) for lr in inputs.hypers["lr"]]

    monkeypatch.setattr(checks, "run_oracle", off_by_a_little)
    case = StepCase(OPTIONS[op][0], STORAGES["fp32"], op_layout(op, "mixed"), SCALARS["plain"])
    with pytest.raises(AssertionError, match="params"):
        check_step_case(case, "reference", "cpu", steps=1)


def test_check_grad_norm_fails_for_a_wrong_norm(monkeypatch):
    """An oracle norm off by 1e-4 relative (far above the size-derived tolerance) fails."""
    import harness.checks as checks

    real = checks.reference.grad_norm

    class _Oracle:
        @staticmethod
        def grad_norm(*args):
            total, per, found_inf = real(*args)
            return total * (1 + 1e-4), per, found_inf

    monkeypatch.setattr(checks, "reference", _Oracle)
    with pytest.raises(AssertionError, match="total norm"):
        check_grad_norm(ListCase("fp32", "mixed"), "reference", "cpu")


def test_compare_backends_fails_beyond_a_couple_of_ulps(monkeypatch):
    """The second backend's params nudged by 3 ULPs in one element: the comparison fails."""
    import harness.checks as checks

    real = checks.run_backend
    calls = []

    def nudging(inputs, backend, found_inf=None):
        real(inputs, backend, found_inf)
        calls.append(backend)
        if len(calls) == 2:
            p = inputs.lists["params"][7].view(-1)
            for _ in range(3):
                p[5] = torch.nextafter(p[5], torch.tensor(math.inf))

    monkeypatch.setattr(checks, "run_backend", nudging)
    case = StepCase(OPTIONS["adamw_"][0], STORAGES["fp32"], "mixed", SCALARS["amp"])
    with pytest.raises(AssertionError, match=r"params\[7\] differs .* 3 ULPs"):
        compare_backends(case, "reference", "reference", "cpu")
