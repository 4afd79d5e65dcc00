"""Bad input to ``fusedopt.ops``: a clear error naming the tensor and the problem, raised
before any tensor is touched (DESIGN.md §5).

Each case starts from a valid call (shown to work and to change its tensors), breaks one
thing, and checks the exception type, that its message names the culprit, and that every
tensor of the call keeps its bits.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

import fusedopt
from fusedopt import ops
from fusedopt._contract import state_shape

SHAPES = [(4,), (2, 3), (5,)]


def _valid(op: str, dtype: torch.dtype = torch.float32, masters: bool = False) -> dict:
    """Keyword arguments of a valid call of ``ops.<op>`` that changes every list it takes."""
    g = torch.Generator().manual_seed(0)
    state = torch.float32 if masters or dtype == torch.float32 else dtype

    def rnd(dt=dtype):
        return [torch.randn(s, generator=g).to(dt) for s in SHAPES]

    n = len(SHAPES)
    common = dict(
        grad_scale=torch.tensor(2.0), clip_coef=torch.tensor(0.5), found_inf=torch.zeros(())
    )
    if masters:
        common["master_params"] = rnd(torch.float32)
    steps = [torch.zeros(()) for _ in range(n)]
    if op == "scale_":
        return dict(tensors=rnd(), scale=torch.tensor(3.0), found_inf=torch.zeros(()))
    if op == "grad_norm":
        return dict(tensors=rnd(), norm_type=2.0, grad_scale=torch.tensor(2.0))
    if op == "adamw_":
        return dict(
            params=rnd(), grads=rnd(), exp_avgs=rnd(state), exp_avg_sqs=[t.abs() for t in
            rnd(state)], max_exp_avg_sqs=[torch.zeros(s, dtype=state) for s in SHAPES],
            steps=steps, lr=1e-2, amsgrad=True, **common,
        )  # fmt: skip
    if op == "lamb_":
        return dict(params=rnd(), grads=rnd(), exp_avgs=rnd(state),
                    exp_avg_sqs=[t.abs() for t in rnd(state)], steps=steps, lr=1e-2,
                    **common)  # fmt: skip
    if op == "lion_":
        return dict(params=rnd(), grads=rnd(), exp_avgs=rnd(state), lr=1e-2, **common)
    if op == "adan_":
        return dict(params=rnd(), grads=rnd(), exp_avgs=rnd(state),
                    exp_avg_sqs=[t.abs() for t in rnd(state)], exp_avg_diffs=rnd(state),
                    neg_pre_grads=rnd(state), steps=steps, lr=1e-2, **common)  # fmt: skip
    if op == "schedulefree_adamw_":
        return dict(params=rnd(), grads=rnd(), zs=rnd(state),
                    exp_avg_sqs=[t.abs() for t in rnd(state)], lr=1e-2, ckp1=0.5,
                    bias_correction2=0.1, **common)  # fmt: skip
    if op == "sgd_":
        return dict(params=rnd(), grads=rnd(), momentum_buffers=rnd(state), steps=steps,
                    lr=1e-2, momentum=0.9, **common)  # fmt: skip
    if op == "adafactor_":
        # [note: factored layouts]: (2, 3) is factored, the vectors keep a variance
        def zeros(layout):
            return [torch.zeros(state_shape(layout, s), dtype=state) for s in SHAPES]

        return dict(params=rnd(), grads=rnd(), row_vars=zeros("row"), col_vars=zeros("col"),
                    variances=zeros("unfactored"), steps=steps, lr=1e-2, **common)  # fmt: skip
    if op == "muon_momentum_":  # Muon's elementwise first pass: any shape
        return dict(params=rnd(), grads=rnd(), momentum_buffers=rnd(state),
                    ns_buffers=rnd(torch.bfloat16), lr=1e-2, **common)  # fmt: skip
    raise ValueError(op)


def _tensors(kwargs: dict) -> list[torch.Tensor]:
    out = []
    for v in kwargs.values():
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, list | tuple):
            out += [t for t in v if isinstance(t, torch.Tensor)]
    return out


def _snapshot(kwargs: dict) -> list[torch.Tensor | None]:
    """Bits of every strided, real, non-meta tensor (None for the others)."""
    ints = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}
    snap = []
    for t in _tensors(kwargs):
        if t.layout != torch.strided or t.is_complex() or t.device.type == "meta":
            snap.append(None)
        else:
            snap.append(t.clone().view(ints[t.element_size()]))
    return snap


def _unchanged(kwargs: dict, before: list) -> bool:
    after = _snapshot(kwargs)
    return all(b is None or torch.equal(a, b) for a, b in zip(after, before, strict=True))


STEP_OPS = ("adamw_", "lamb_", "lion_", "adan_", "schedulefree_adamw_", "sgd_", "adafactor_",
            "muon_momentum_")  # fmt: skip
STATE = {"adamw_": "exp_avgs", "lamb_": "exp_avg_sqs", "lion_": "exp_avgs",
         "adan_": "exp_avg_diffs", "schedulefree_adamw_": "zs",
         "sgd_": "momentum_buffers", "adafactor_": "variances",
         "muon_momentum_": "momentum_buffers"}  # fmt: skip


def _set(name: str, i: int, make: Callable[[torch.Tensor], torch.Tensor]):
    def mutate(kw: dict) -> None:
        kw[name][i] = make(kw[name][i])

    return mutate


def _drop(name: str):
    def mutate(kw: dict) -> None:
        kw[name] = kw[name][:-1]

    return mutate


def _put(key: str, value):
    def mutate(kw: dict) -> None:
        kw[key] = value() if callable(value) else value

    return mutate


def _channels_last_param(kw: dict) -> None:
    """param 0 becomes channels_last 4-d; its grad too; the state stays contiguous."""
    p = torch.randn(2, 3, 2, 2).to(memory_format=torch.channels_last)
    kw["params"][0] = p
    kw["grads"][0] = torch.randn(2, 3, 2, 2).to(memory_format=torch.channels_last)
    for name in {n for spec in ops.STEP_OPS.values() for n in spec.state_lists}:  # any op's
        if name in kw:
            kw[name][0] = torch.zeros(2, 3, 2, 2)
    if "row_vars" in kw:  # Adafactor: its states fit; the param's layout does not
        kw["row_vars"][0] = torch.zeros(2, 3, 2, 1)
        kw["col_vars"][0] = torch.zeros(2, 3, 1, 2)
        kw["variances"][0] = torch.zeros(0)


def _step_cases():
    """(op, id, mutation, exception, message regex) for every step op."""
    cases = []
    for op in STEP_OPS:
        state = STATE[op]
        spec = ops.STEP_OPS.get(op)
        wrong_state = torch.float64 if spec and spec.state_dtypes else torch.bfloat16
        cases += [
            (op, "param_int_dtype", _set("params", 1, lambda t: t.to(torch.int32)),
             TypeError, r"params\[1\] has unsupported dtype torch.int32"),
            (op, "grad_wrong_dtype", _set("grads", 1, lambda t: t.half()),
             TypeError, r"grads\[1\] has dtype torch.float16"),
            # An op with free state dtypes ([note: state dtype]) takes bf16 states beside
            # fp32 params: an fp64 state is wrong for it.
            (op, "state_wrong_dtype", _set(state, 2, lambda t, d=wrong_state: t.to(d)),
             TypeError, rf"{state}\[2\] has dtype {wrong_state}, expected torch.float32"),
            (op, "grad_on_meta", _set("grads", 1, lambda t: t.to("meta")),
             RuntimeError, r"grads\[1\] is on meta"),
            (op, "param_on_meta", _set("params", 2, lambda t: t.to("meta")),
             RuntimeError, r"params\[2\] is on meta"),
            (op, "state_on_meta", _set(state, 0, lambda t: t.to("meta")),
             RuntimeError, rf"{state}\[0\] is on meta"),
            (op, "sparse_grad", _set("grads", 0, lambda t: t.to_sparse()),
             RuntimeError, r"grads\[0\] is sparse"),
            (op, "complex_grad", _set("grads", 2, lambda t: t.to(torch.complex64)),
             RuntimeError, r"grads\[2\] is complex"),
            (op, "complex_param", _set("params", 0, lambda t: t.to(torch.complex64)),
             RuntimeError, r"params\[0\] is complex"),
            (op, "non_dense_state", _set(state, 1, lambda t: torch.zeros(2, 6)[:, ::2]),
             RuntimeError, rf"{state}\[1\] is not dense"),
            (op, "overlapping_param", _set("params", 1, lambda t: torch.zeros(1, 3).expand(2, 3)),
             RuntimeError, r"params\[1\] overlaps itself"),
            (op, "mismatched_layout", _channels_last_param,
             RuntimeError, r"\[0\] has strides .* both must share one memory layout"
             if op != "adafactor_" else r"params\[0\] .* is not contiguous; a param with "
             r"factored states"),
            (op, "short_state_list", _drop(state),
             ValueError, rf"{state} has 2 entries but params has 3"),
            (op, "short_grad_list", _drop("grads"),
             ValueError, r"grads has 2 entries but params has 3"),
            (op, "wrong_grad_shape", _set("grads", 2, lambda t: torch.zeros(6)),
             RuntimeError, r"grads\[2\] has shape \(6,\) but its param has \(5,\)"),
            (op, "state_wrong_shape", _set(state, 1, lambda t: torch.zeros(3, 2)),
             RuntimeError, rf"{state}\[1\] has shape \(3, 2\)"),
            (op, "not_a_tensor", _set("grads", 1, lambda t: t.tolist()),
             TypeError, r"grads\[1\] must be a torch.Tensor"),
            (op, "lr_list_too_short", _put("lr", [1e-2, 1e-2]),
             ValueError, r"lr has 2 values for 3 tensors"),
            (op, "lr_tensor_fp64", _put("lr", lambda: torch.tensor(1e-2, dtype=torch.float64)),
             TypeError, r"a tensor lr must be float32"),
            (op, "lr_tensor_wrong_length", _put("lr", lambda: torch.full((2,), 1e-2)),
             TypeError, r"a tensor lr must be float32, 0-d or of length 3"),
            (op, "lr_tensor_on_meta", _put("lr", lambda: torch.tensor(1e-2, device="meta")),
             RuntimeError, r"lr is on meta"),
            (op, "grad_scale_fp16", _put("grad_scale", lambda: torch.tensor(2.0).half()),
             TypeError, r"grad_scale must be a one-element float32 tensor"),
            (op, "clip_coef_two_elements", _put("clip_coef", lambda: torch.ones(2)),
             TypeError, r"clip_coef must be a one-element float32 tensor"),
            (op, "found_inf_on_meta", _put("found_inf", lambda: torch.zeros((), device="meta")),
             RuntimeError, r"found_inf is on meta"),
            (op, "found_inf_python_float", _put("found_inf", 0.0),
             TypeError, r"found_inf must be a 0-d torch.Tensor or None"),
            (op, "hyper_as_tensor", _put("weight_decay", lambda: torch.tensor(0.1)),
             TypeError, r"weight_decay must be a float or a sequence of floats"),
            (op, "master_for_fp32_param", _put("master_params",
             lambda: [torch.zeros(s) for s in SHAPES]),
             TypeError, r"master_params\[0\] given for a torch.float32 param"),
        ]  # fmt: skip
        if op in ("adamw_", "lamb_", "sgd_", "adafactor_"):
            cases += [
                (op, "steps_fp64", _set("steps", 1, lambda t: t.double()),
                 TypeError, r"steps\[1\] must be a one-element float32 tensor"),
                (op, "steps_on_meta", _set("steps", 0, lambda t: t.to("meta")),
                 RuntimeError, r"steps\[0\] is on meta"),
                (op, "short_steps", _drop("steps"),
                 ValueError, r"steps has 2 entries but params has 3"),
            ]  # fmt: skip
    cases += [
        ("adamw_", "amsgrad_without_max", _put("max_exp_avg_sqs", []),
         ValueError, r"amsgrad=True needs one max_exp_avg_sqs tensor per param"),
        ("sgd_", "buffers_without_steps", _put("steps", []),
         ValueError, r"pass both momentum_buffers and steps, or neither"),
        # [note: factored layouts]: a factor in the param's shape, a factored param's
        # variance that is not the (0,) placeholder, a vector's row factor that is not
        ("adafactor_", "row_var_param_shaped", _set("row_vars", 1, lambda t: torch.zeros(2, 3)),
         RuntimeError, r"row_vars\[1\] has shape \(2, 3\) but a 'row' state of a param of "
         r"shape \(2, 3\) has \(2, 1\)"),
        ("adafactor_", "col_var_transposed", _set("col_vars", 1, lambda t: torch.zeros(3, 1)),
         RuntimeError, r"col_vars\[1\] has shape \(3, 1\) but .* has \(1, 3\)"),
        ("adafactor_", "variance_of_a_matrix", _set("variances", 1, lambda t: torch.zeros(2, 3)),
         RuntimeError, r"variances\[1\] has shape \(2, 3\) but .* has \(0,\)"),
        ("adafactor_", "row_var_of_a_vector", _set("row_vars", 0, lambda t: torch.zeros(4, 1)),
         RuntimeError, r"row_vars\[0\] has shape \(4, 1\) but .* has \(0,\)"),
        ("muon_momentum_", "ns_buffer_fp32", _set("ns_buffers", 1, lambda t: t.float()),
         TypeError, r"ns_buffers\[1\] has dtype torch.float32, expected torch.bfloat16"),
        ("muon_momentum_", "ns_buffer_wrong_shape", _set("ns_buffers", 2, lambda t: t.view(1, 5)),
         RuntimeError, r"ns_buffers\[2\] has shape \(1, 5\)"),
    ]  # fmt: skip
    return cases


def _run(op: str, kwargs: dict):
    return getattr(ops, op)(**kwargs)


@pytest.mark.parametrize("op", STEP_OPS)
@pytest.mark.parametrize("masters", [False, True], ids=["fp32", "bf16_master"])
def test_the_valid_call_works_and_writes(op, masters):
    """The baseline of every case below really runs and changes its tensors, so an error
    below is due to its mutation, and 'nothing touched' is a real claim."""
    kwargs = _valid(op, torch.bfloat16 if masters else torch.float32, masters)
    before = _snapshot(kwargs)
    _run(op, kwargs)
    assert not _unchanged(kwargs, before)


@pytest.mark.parametrize(
    ("op", "mutation", "error", "message"),
    [pytest.param(op, m, e, msg, id=f"{op}-{name}") for op, name, m, e, msg in _step_cases()],
)
def test_bad_step_input_raises_before_touching_anything(op, mutation, error, message):
    kwargs = _valid(op)
    mutation(kwargs)
    before = _snapshot(kwargs)
    with pytest.raises(error, match=message):
        _run(op, kwargs)
    assert _unchanged(kwargs, before), "a tensor was written before the error"


@pytest.mark.parametrize("wrong", [torch.float16, torch.float64])
@pytest.mark.parametrize("op", STEP_OPS)
def test_master_weights_must_be_fp32(op, wrong):
    """A master beside a bf16 param is fp32, int16 (compact) or bf16 (a Kahan compensation,
    [note: kahan master]); any other dtype is refused, naming it, before anything changes."""
    kwargs = _valid(op, torch.bfloat16, masters=True)
    kwargs["master_params"][1] = kwargs["master_params"][1].to(wrong)
    before = _snapshot(kwargs)
    with pytest.raises(TypeError, match=rf"master_params\[1\] has dtype {wrong}"):
        _run(op, kwargs)
    assert _unchanged(kwargs, before)


@pytest.mark.parametrize("op", STEP_OPS)
def test_an_error_in_the_last_dtype_group_touches_no_earlier_group(op):
    """ops splits a call by param dtype; a bad tensor of the second group must stop the first
    group's launch too: validation covers the whole call first."""
    kwargs = _valid(op)
    kwargs2 = _valid(op, torch.bfloat16)
    for k, v in kwargs2.items():
        if isinstance(v, list):
            kwargs[k] = kwargs[k] + v
    kwargs["grads"][-1] = torch.zeros(7, dtype=torch.bfloat16)
    before = _snapshot(kwargs)
    with pytest.raises(RuntimeError, match=r"grads\[5\] has shape \(7,\)"):
        _run(op, kwargs)
    assert _unchanged(kwargs, before)


LIST_CASES = [
    ("int_tensor", _set("tensors", 1, lambda t: t.to(torch.int64)), TypeError,
     r"tensors\[1\] has unsupported dtype torch.int64"),
    ("sparse", _set("tensors", 0, lambda t: t.to_sparse()), RuntimeError,
     r"tensors\[0\] is sparse"),
    ("complex", _set("tensors", 2, lambda t: t.to(torch.complex64)), RuntimeError,
     r"tensors\[2\] is complex"),
    ("mixed_devices", _set("tensors", 2, lambda t: t.to("meta")), RuntimeError,
     r"tensors\[2\] is on meta but tensors\[0\] is on cpu"),
]  # fmt: skip


@pytest.mark.parametrize("op", ["scale_", "grad_norm"])
@pytest.mark.parametrize(("mutation", "error", "message"),
                         [pytest.param(*c[1:], id=c[0]) for c in LIST_CASES])  # fmt: skip
def test_bad_list_input_raises_before_touching_anything(op, mutation, error, message):
    kwargs = _valid(op)
    mutation(kwargs)
    before = _snapshot(kwargs)
    with pytest.raises(error, match=message):
        if op == "scale_":
            ops.scale_(kwargs["tensors"], kwargs["scale"], kwargs["found_inf"])
        else:
            ops.grad_norm(kwargs["tensors"], 2.0, grad_scale=kwargs["grad_scale"])
    assert _unchanged(kwargs, before)


@pytest.mark.parametrize("norm_type", [1.0, 0.5, -math.inf, 3])
def test_grad_norm_rejects_unsupported_norm_types(norm_type):
    with pytest.raises(ValueError, match=r"norm_type must be 2\.0 or inf"):
        ops.grad_norm([torch.ones(3)], norm_type)


def test_scale_scalars_are_checked():
    kwargs = _valid("scale_")
    before = _snapshot(kwargs)
    with pytest.raises(TypeError, match="scale must be a one-element float32 tensor"):
        ops.scale_(kwargs["tensors"], torch.tensor(2.0, dtype=torch.float64), kwargs["found_inf"])
    with pytest.raises(RuntimeError, match="found_inf is on meta"):
        ops.scale_(kwargs["tensors"], kwargs["scale"], torch.zeros((), device="meta"))
    with pytest.raises(TypeError, match="grad_scale must be a one-element float32 tensor"):
        ops.grad_norm(kwargs["tensors"], grad_scale=torch.ones(3))
    assert _unchanged(kwargs, before)


def test_valid_kwargs_are_not_shared_between_cases():
    """Guard of this module: a mutation must not leak into the next case's baseline."""
    a, b = _valid("adamw_"), _valid("adamw_")
    a["grads"][0] = None
    assert b["grads"][0] is not None


# ---------------------------------------------------------------- non-dense params (issue #13)
BACKENDS = [name for name, status in fusedopt.backends().items()
            if status.usable and "cpu" in status.devices]  # fmt: skip


def _strided_copy(t: torch.Tensor, how: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A non-dense view holding ``t``'s values, in a base whose other elements are NaN."""
    if how == "every_other":  # base[..., ::2]
        base = torch.full((*t.shape[:-1], 2 * t.shape[-1]), math.nan, dtype=t.dtype)
        view = base[..., ::2]
    else:  # transposed then sliced: base.t()[1:]
        base = torch.full((t.shape[1], t.shape[0] + 1), math.nan, dtype=t.dtype)
        view = base.t()[1:]
    view.copy_(t)
    assert not view.is_contiguous()
    return view, base


def _non_dense_call(op: str, masters: bool):
    """A valid call whose params 0 and 1 are non-dense views, with a non-dense grad and
    first state of param 1; and the same call on dense copies."""
    kwargs = _valid(op, torch.bfloat16 if masters else torch.float32, masters)
    dense = {k: [t.clone() for t in v] if isinstance(v, list) else v for k, v in kwargs.items()}
    bases = []
    # Adafactor's (2, 3) param 1 has no param-shaped state: the variance of vector 0 instead
    state = (STATE[op], 1, "transposed") if op != "adafactor_" else ("variances", 0, "every_other")
    for name, i, how in [("params", 0, "every_other"), ("params", 1, "transposed"),
                         ("grads", 1, "every_other"), state]:  # fmt: skip
        kwargs[name][i], base = _strided_copy(kwargs[name][i], how)
        bases.append((kwargs[name][i], base))
    return kwargs, dense, bases


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("masters", [False, True], ids=["fp32", "bf16_master"])
@pytest.mark.parametrize("op", STEP_OPS)
def test_non_dense_params_step_as_dense_copies(op, masters, backend):
    """[note: non-dense params]: non-dense params (and a non-dense grad and state of one) are
    stepped through dense twins: bit for bit the dense call's result, written back into the
    views, nothing between them touched."""
    kwargs, dense, bases = _non_dense_call(op, masters)
    _run(op, {**kwargs, "backend": backend})
    _run(op, {**dense, "backend": backend})
    for name, values in kwargs.items():
        if isinstance(values, list):
            for i, (got, want) in enumerate(zip(values, dense[name], strict=True)):
                assert torch.equal(got, want), f"{name}[{i}]"
    for view, base in bases:
        outside = torch.ones_like(base, dtype=torch.bool)
        outside.as_strided(view.shape, view.stride(), view.storage_offset()).fill_(False)
        assert base[outside].isnan().all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", STEP_OPS)
def test_non_dense_params_skipped_step_writes_the_same_bits(op, backend):
    """With found_inf set the twins come back unchanged: every view keeps its bits."""
    kwargs, _, bases = _non_dense_call(op, False)
    kwargs["found_inf"] = torch.ones(())
    before = [base.clone() for _, base in bases]
    _run(op, {**kwargs, "backend": backend})
    for (_, base), was in zip(bases, before, strict=True):
        assert torch.equal(base.view(torch.int32), was.view(torch.int32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_dense_tensors_in_scale_grad_norm_and_clip(backend):
    """scale_ and clip_grad_norm_ write non-dense tensors back; grad_norm (total and per
    tensor) reads them whole."""
    tensors = [torch.randn(s, generator=torch.Generator().manual_seed(i))
               for i, s in enumerate([(3, 4), (5,), (4, 3)])]  # fmt: skip
    views = [_strided_copy(tensors[0], "every_other")[0], tensors[1].clone(),
             _strided_copy(tensors[2], "transposed")[0]]  # fmt: skip
    got = ops.grad_norm(views, per_tensor=True, backend=backend)
    want = ops.grad_norm(tensors, per_tensor=True, backend=backend)
    assert torch.equal(got.total, want.total) and torch.equal(got.per_tensor, want.per_tensor)
    ops.scale_(views, torch.tensor(0.5), backend=backend)
    ops.scale_(tensors, torch.tensor(0.5), backend=backend)
    assert all(torch.equal(v, t) for v, t in zip(views, tensors, strict=True))
    params = [torch.nn.Parameter(torch.zeros(v.shape)) for v in views]
    dense_params = [torch.nn.Parameter(torch.zeros(v.shape)) for v in views]
    for p, q, v, t in zip(params, dense_params, views, tensors, strict=True):
        p.grad, q.grad = v, t.clone()
    norm = fusedopt.clip_grad_norm_(params, 0.1, backend=backend)
    want_norm = fusedopt.clip_grad_norm_(dense_params, 0.1, backend=backend)
    assert torch.equal(norm, want_norm)
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(params, dense_params, strict=True))
    assert not params[0].grad.is_contiguous()  # written in place, not replaced


def test_overlapping_tensors_are_read_but_not_written():
    """grad_norm reads an expanded tensor as its contiguous copy (as torch's norms do); scale_
    refuses to write one, before touching anything."""
    expanded = torch.randn(1, 3).expand(2, 3)
    want = ops.grad_norm([expanded.contiguous()], per_tensor=True)
    got = ops.grad_norm([expanded], per_tensor=True)
    assert torch.equal(got.total, want.total) and torch.equal(got.per_tensor, want.per_tensor)
    kwargs = _valid("scale_")
    kwargs["tensors"][1] = expanded
    before = _snapshot(kwargs)
    with pytest.raises(RuntimeError, match=r"tensors\[1\] overlaps itself"):
        ops.scale_(kwargs["tensors"], kwargs["scale"], kwargs["found_inf"])
    assert _unchanged(kwargs, before)
