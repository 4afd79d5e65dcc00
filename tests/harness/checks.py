"""The checks: build a case's tensors, run a backend through ``fusedopt.ops`` and the float64
oracle (``fusedopt.reference`` called directly, on CPU) on the same inputs, and compare.

* fp32 params and master weights: a trajectory of steps; params (the master, with masters) and
  every state are compared with the oracle after every step, step counts exactly.
* Low-precision params without masters: step by step; before each step the oracle restarts
  from the backend's current values upcast to float64.
* Always: the grads are not written, step counts are exact, views' neighbouring memory is not
  written, and with masters the param is ``master.to(param.dtype)`` bit for bit.
* Lion: where ``|c|`` is within rounding of 0 the sign may flip; exactly those elements are
  excused (and the oracle adopts the backend's value there, so the trajectory goes on).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from fusedopt import ops, reference
from fusedopt._contract import state_shape

from .cases import (
    HOST_PASSES,
    LAYOUT_STEPS,
    LAYOUTS,
    ListCase,
    StepCase,
    allocate,
    per_tensor_values,
    sentinel_intact,
)
from .tolerances import (
    CROSS_BACKEND_MAX_ULPS,
    INF_NORM_RTOL,
    U32,
    UNIT_ROUNDOFF,
    Tolerance,
    reduction_rtol,
    tolerance,
    ulp_distance,
)

F64 = torch.float64
#: Every this-many-th grad element is exactly 0 (Lion's sign(0) = 0, Adam's v = 0).
ZERO_GRAD_EVERY = 7


def bits(t: Tensor) -> Tensor:
    """The raw bits of ``t`` (a copy): equal bits means bit-identical, NaNs and -0.0 included."""
    ints = {8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()]
    return t.detach().clone().contiguous().view(ints)


def same_bits(a: Tensor, b: Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def assert_close(
    got: Tensor,
    want: Tensor,
    tol: Tolerance,
    k: int,
    what: str,
    terms: Tensor | None = None,
    excused: Tensor | None = None,
    extra: Tensor | None = None,
) -> None:
    """``got`` (any dtype) within ``tol`` of ``want`` (float64) after ``k`` steps.

    ``terms``: elementwise size of the terms that may cancel (see ``tolerances``; default
    ``|want|``). ``excused`` marks elements exempt from the check (Lion's sign flips).
    ``extra``: a further elementwise allowance per step, derived by the caller (LAMB's norms).
    """
    g = got.detach().to("cpu", F64).reshape(-1)
    w = want.detach().to("cpu", F64).reshape(-1)
    if w.numel() == 0:
        assert g.numel() == 0, f"{what}: expected an empty tensor"
        return
    err = (g - w).abs()
    size = w.abs() if terms is None else terms.detach().to("cpu", F64).reshape(-1)
    per_step = tol.rtol * w.abs() + tol.cancel * size
    if extra is not None:
        per_step = per_step + extra.detach().to("cpu", F64).reshape(-1)
    allowed = k * per_step + tol.atol
    bad = ~(err <= allowed)  # NaN in got fails too
    if excused is not None:
        bad &= ~excused.reshape(-1).cpu()
    if bad.any():
        i = int(bad.nonzero()[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {w.numel()} elements beyond tolerance after {k} "
            f"step(s); first at flat index {i}: got {g[i].item()!r}, want {w[i].item()!r}, "
            f"|err| {err[i].item():.3e} > allowed {allowed[i].item():.3e} "
            f"(rtol {tol.rtol:.2e}, cancel {tol.cancel:.2e}, atol {tol.atol:.1e})"
        )


# ---------------------------------------------------------------------------------------------
# Step ops: inputs


@dataclasses.dataclass
class StepInputs:
    """Everything one step-op call takes, on the backend's device.

    ``lists`` maps the schema's list names (``fusedopt.ops.STEP_OPS[op].lists``) to tensors;
    lists the case does not use are absent. ``hypers`` holds one float per tensor.
    """

    case: StepCase
    device: str
    lists: dict[str, list[Tensor]]
    hypers: dict[str, list[float]]
    flags: dict[str, bool]
    lr_tensor: Tensor | None
    grad_scale: Tensor | None
    clip_coef: Tensor | None
    found_inf: Tensor | None

    @property
    def n(self) -> int:
        return len(self.lists["params"])

    def fp32_values(self) -> list[Tensor]:
        """The values the update runs on: the masters, or the params."""
        return self.lists.get("master_params") or self.lists["params"]

    def touched(self) -> list[Tensor]:
        """Every tensor a step may write."""
        return [t for name, ts in self.lists.items() if name != "grads" for t in ts]


def _uses(case: StepCase, name: str) -> bool:
    spec = ops.STEP_OPS[case.op]
    if any(t.name == name and t.layout == "block_scales" for t in spec.states):
        # 8-bit states (their scales make the moments codes) have their own tests:
        # tests/test_state_bits.py ([note: 8-bit states] in fusedopt/quant8.py)
        return False
    if name == "max_exp_avg_sqs":
        return case.flag("amsgrad")
    if name == "master_params":
        return case.storage.master
    if name in ("momentum_buffers",) or (name == "steps" and case.op == "sgd_"):
        # SGD keeps buffers (and their step counts) only when some tensor has momentum.
        return case.hyper("momentum") != 0
    return True


def make_inputs(case: StepCase, device: str, seed: int = 0) -> StepInputs:
    """Fresh tensors for ``case``: random params (one all-zero), zero states, zero steps."""
    gen = torch.Generator().manual_seed(seed)
    spec = ops.STEP_OPS[case.op]
    storage = case.storage
    specs = LAYOUTS[case.layout]
    values = [
        torch.zeros(s.shape) if s.zero else torch.randn(s.shape, generator=gen) for s in specs
    ]
    lists: dict[str, list[Tensor]] = {
        "params": [allocate(s, v, storage.param, device) for s, v in zip(specs, values)],  # noqa: B905
        "grads": [],
    }
    for name in spec.lists:
        if name in ("params", "grads") or not _uses(case, name):
            continue
        if name == "master_params":
            lists[name] = [allocate(s, v, torch.float32, device) for s, v in zip(specs, values)]  # noqa: B905
        elif name == "steps":
            lists[name] = [torch.zeros((), device=device) for _ in specs]
        else:
            layout = next(t.layout for t in spec.states if t.name == name)
            lists[name] = [_state(s, layout, storage.state, device) for s in specs]
    differ = case.scalars.lr == "per_tensor"
    n = len(specs)
    hypers = {h: per_tensor_values(h, case.hyper(h), n, differ) for h in spec.hypers}
    lr_tensor = None
    if case.scalars.lr == "tensor":
        lr_tensor = torch.tensor(case.hyper("lr"), device=device)
    elif case.scalars.lr == "per_tensor":
        lr_tensor = torch.tensor(hypers["lr"], device=device)
    inputs = StepInputs(
        case,
        device,
        lists,
        hypers,
        dict(case.options.flags),
        lr_tensor,
        *(
            None if v is None else torch.tensor(v, device=device)
            for v in (case.scalars.grad_scale, case.scalars.clip_coef, case.scalars.found_inf)
        ),
    )
    return inputs


def _state(spec, layout: str, dtype: torch.dtype, device: str) -> Tensor:
    """A zero state of a param laid out as ``spec``, in the state list's ``layout``
    ([note: factored layouts]): the param's own layout where it has the param's shape, else
    contiguous (a ``(0,)`` placeholder where the param has no such state)."""
    shape = state_shape(layout, spec.shape)
    if layout == "bf16":  # the param's shape and layout, always bfloat16 ([note: muon passes])
        return allocate(spec, 0.0, torch.bfloat16, device)
    if shape == tuple(spec.shape) and layout in ("param", "unfactored"):
        return allocate(spec, 0.0, dtype, device)
    return torch.zeros(shape, dtype=dtype, device=device)


def _check_sentinels(inputs: StepInputs, what: str) -> None:
    for name, ts in inputs.lists.items():
        for i, t in enumerate(ts):
            assert sentinel_intact(t), f"{what}: wrote before the offset view {name}[{i}]"


def make_grads(inputs: StepInputs, step: int) -> list[Tensor]:
    """The grads of step ``step`` (seeded by it), multiplied by the loss scale if any, with
    every ZERO_GRAD_EVERY-th element exactly 0, laid out like their params."""
    case = inputs.case
    gen = torch.Generator().manual_seed(1000 + step)
    scale = case.scalars.grad_scale or 1.0
    grads = []
    for s in LAYOUTS[case.layout]:
        v = torch.randn(s.shape, generator=gen) * scale
        v.view(-1)[::ZERO_GRAD_EVERY] = 0.0
        grads.append(allocate(s, v, case.storage.grad, inputs.device))
    return grads


# ---------------------------------------------------------------------------------------------
# Step ops: running the backend and the oracle


def run_backend(
    inputs: StepInputs, backend: str, found_inf: Tensor | None = None, op: str | None = None
) -> None:
    """One step through the functional layer, ``fusedopt.ops.<op>(..., backend=backend)``;
    ``found_inf`` overrides the case's flag; ``op``: one of the step op's passes instead."""
    spec = ops.STEP_OPS[inputs.case.op]
    kwargs = {name: inputs.lists[name] for name in spec.lists if name in inputs.lists}
    kwargs.update({h: inputs.hypers[h] for h in spec.hypers})
    if inputs.lr_tensor is not None:
        kwargs["lr"] = inputs.lr_tensor
    kwargs.update(inputs.flags)
    getattr(ops, op or inputs.case.op)(
        **kwargs,
        grad_scale=inputs.grad_scale,
        clip_coef=inputs.clip_coef,
        found_inf=inputs.found_inf if found_inf is None else found_inf,
        backend=backend,
    )


def _cpu(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().cpu()


def to_oracle(inputs: StepInputs) -> dict[str, list[Tensor]]:
    """float64 CPU copies of the backend's current values; the oracle's params are the fp32
    values (masters, with masters) and it keeps no masters of its own."""
    out = {"params": [t.detach().to("cpu", F64) for t in inputs.fp32_values()]}
    for name, ts in inputs.lists.items():
        if name in ("params", "grads", "master_params"):
            continue
        dtype = torch.float32 if name == "steps" else F64
        out[name] = [t.detach().to("cpu", dtype).clone() for t in ts]
    return out


def run_oracle(
    inputs: StepInputs, oracle: dict[str, list[Tensor]], grads: list[Tensor], op: str | None = None
):
    """One step of ``fusedopt.reference.<op>`` (or of the pass ``op``) on the float64 copies,
    schema argument order."""
    spec = ops.STEP_OPS[inputs.case.op]
    lists = {**oracle, "grads": [g.detach().to("cpu", F64) for g in grads]}
    hypers = dict(inputs.hypers)
    if "eps1" in hypers:  # Adafactor's eps1 < 0: the eps of the backend's update dtype, not F64's
        eps = _adafactor_eps(inputs.case.storage)
        hypers["eps1"] = [eps if e < 0 else e for e in hypers["eps1"]]
    getattr(reference, op or inputs.case.op)(
        *(lists.get(name, []) for name in spec.lists),
        *ops.hyper_table(*(hypers[h] for h in spec.hypers)),
        *(inputs.flags[f] for f in spec.flags),
        _cpu(inputs.lr_tensor),
        _cpu(inputs.grad_scale),
        _cpu(inputs.clip_coef),
        _cpu(inputs.found_inf),
    )


def lion_excused(inputs: StepInputs, oracle, grads: list[Tensor], k: int) -> list[Tensor]:
    """Per tensor, the elements whose ``sign(c)`` may legitimately differ from the oracle's.

    ``c = b1*m + (1-b1)*g`` in float64 from the oracle's inputs. The backend computes it in
    fp32: ~8 roundings of 2^-24 on terms of size ``b1*|m| + (1-b1)*|g|``; along a trajectory
    its m may also differ from the oracle's by the fp32 state tolerance of the previous steps.
    Elements with ``|c|`` within that bound are excused; every other sign must match.
    """
    tol = tolerance(torch.float32)
    out = []
    for i, m in enumerate(oracle["exp_avgs"]):
        b1 = inputs.hypers["beta1"][i]
        g = reference.load_grad(
            grads[i].detach().to("cpu", F64),
            F64,
            _cpu(inputs.grad_scale),
            _cpu(inputs.clip_coef),
            inputs.flags["maximize"],
        )
        c = b1 * m + (1 - b1) * g
        bound = 8 * U32 * (b1 * m.abs() + (1 - b1) * g.abs())
        if k > 1:  # m's own trajectory tolerance (its old value bounded by |m| + |g|)
            bound = bound + b1 * (k - 1) * (tol.rtol + tol.cancel) * (m.abs() + g.abs())
        # bound > 0: where m and g are both exactly 0, c = 0 exactly in any precision and
        # sign(0) = 0 is owed, not excused.
        out.append((c.abs() <= bound) & (bound > 0))
    return out


def _grad_term(inputs: StepInputs, name: str, i: int, grad: Tensor, p_old: Tensor):
    """The size of the grad's term in the update of state ``name`` (0 for params, whose
    decay and update terms are bounded by ``|old| + |new|``, and for squares, which never
    cancel): ``weight * (|g| + wd*|p|)`` with the grad as loaded and the L2 decay where the
    op adds it to the grad (SGD, Adam)."""
    case = inputs.case
    if name in ("params", "exp_avg_sqs", "max_exp_avg_sqs", "row_vars", "col_vars", "variances"):
        return 0.0
    if case.op in HOST_PASSES and name in HOST_PASSES[case.op].handed:
        return 0.0  # handed to the oracle from the backend: equal by construction
    h, flags = inputs.hypers, inputs.flags
    g = reference.load_grad(
        grad.detach().to("cpu", F64),
        F64,
        _cpu(inputs.grad_scale),
        _cpu(inputs.clip_coef),
        flags.get("maximize", False),
    ).abs()
    if case.op == "sgd_" or (case.op == "adamw_" and not flags["decoupled"]):
        g = g + h["weight_decay"][i] * p_old.abs()
    if case.op == "lion_":
        weight = 1 - h["beta2"][i]
    elif case.op == "sgd_" or not flags.get("grad_averaging", True):
        weight = 1.0  # SGD's first step takes buf = g (dampening only shrinks it); LAMB's b3
    else:  # Muon's buf = lerp(buf, g, 1 - momentum)
        weight = 1 - h["beta1" if "beta1" in h else "momentum"][i]
    return weight * g


def _adafactor_eps(storage) -> float:
    """Adafactor's eps1 = None: the eps of the dtype its update runs on (fp32 with masters)."""
    return torch.finfo(torch.float32 if storage.master else storage.param).eps


def _adafactor_stored_moments(inputs: StepInputs, oracle, i: int) -> Tensor:
    """The relative error of tensor i's Adafactor update that comes from computing u from
    second moments stored in a 16-bit dtype, as torch does (the float64 oracle rounds none).

    A stored value x is within ``u_s * |x| + a_s`` of the exact one (``u_s`` the dtype's unit
    roundoff, ``a_s`` its subnormal floor: half of fp16's 2^-24 spacing, 0 for bf16), i.e.
    within ``u_s + a_s/|x|`` relative. v is one such value (a vector's variance) or
    ``r * c / mean(r)`` (three; mean(r) of rounded r is within the mean of their absolute
    errors: ``u_s * mean + a_s``); an exact 0 stays exact;
    u = g / sqrt(max(v, eps1^2)) is then within half of v's relative error, and the clip
    rms(u) within the largest of those over the tensor: the update within their sum."""
    dtype = inputs.case.storage.state
    u_s, a_s = UNIT_ROUNDOFF[dtype], 2.0**-25 if dtype == torch.float16 else 0.0
    eps1 = inputs.hypers["eps1"][i]
    eps1 = _adafactor_eps(inputs.case.storage) if eps1 < 0 else eps1
    shape = inputs.lists["params"][i].shape

    def rel(x: Tensor) -> Tensor:  # 0 is stored exactly
        return torch.where(x > 0, u_s + a_s / x.clamp(min=1e-300), torch.zeros_like(x))

    if len(shape) >= 2:
        r, c = oracle["row_vars"][i], oracle["col_vars"][i]
        mean = r.mean(dim=-2, keepdim=True)
        # mean(r) of the rounded r: within the mean of their absolute errors
        rel_v = rel(r) + rel(c) + rel(mean)
        v = r * c / mean.clamp(min=eps1)
    else:
        v = oracle["variances"][i]
        rel_v = rel(v)
    # below the floor eps1^2 the rounding of v does not reach u
    rel_u = 0.5 * torch.where(v >= eps1 * eps1, rel_v, torch.zeros_like(rel_v)).expand(shape)
    rel_u = rel_u.nan_to_num(0.0, 0.0, 0.0).reshape(-1)
    return rel_u + (rel_u.max() if rel_u.numel() else 0.0)


def check_step(
    inputs: StepInputs, backend: str, oracle, k: int, k_tol: int, envelope: dict[str, list[Tensor]]
) -> None:
    """Run step ``k`` on the backend and the oracle and compare everything (see module doc).

    ``envelope`` (updated here): per list, the elementwise largest ``|old| + |new|`` (plus the
    grad's term, for moments) of the oracle's steps since the inputs were identical: the size
    of the terms of every step whose rounding errors are carried forward (the ``cancel`` term
    of the tolerance); under
    ``"update:<list>"``, the largest ``|new - old|``, the size of the update itself.
    """
    case = inputs.case
    grads = make_grads(inputs, k)
    inputs.lists["grads"] = grads
    grad_bits = [bits(g) for g in grads]
    excused = lion_excused(inputs, oracle, grads, k_tol) if case.op == "lion_" else None
    old = {name: [t.clone() for t in ts] for name, ts in oracle.items() if name != "steps"}
    where = f"{case.id} on {backend}/{inputs.device}, step {k}"
    if case.op in HOST_PASSES:
        _run_host_passes(inputs, backend, oracle, grads, k_tol, where)
    else:
        run_backend(inputs, backend)
        run_oracle(inputs, oracle, grads)
    for name, olds in old.items():
        terms = [
            o.abs() + n.abs() + _grad_term(inputs, name, i, grads[i], old["params"][i])
            for i, (o, n) in enumerate(zip(olds, oracle[name], strict=True))
        ]
        updates = [(n - o).abs() for o, n in zip(olds, oracle[name], strict=True)]
        for key, new in ((name, terms), (f"update:{name}", updates)):
            env = envelope.get(key, new)
            envelope[key] = [torch.maximum(e, x) for e, x in zip(env, new, strict=True)]

    specs = LAYOUTS[case.layout]
    for i, g in enumerate(grads):
        assert torch.equal(bits(g), grad_bits[i]), f"{where}: grads[{i}] was written"
    _check_sentinels(inputs, where)
    for i, (got, want) in enumerate(zip(inputs.fp32_values(), oracle["params"], strict=True)):
        name = "master_params" if case.storage.master else "params"
        mask = excused[i] if excused is not None else None
        extra = None
        if case.op == "lamb_":
            # The trust ratio |p|/|u| scales the whole update and carries the error of two
            # fp32 reductions over this tensor (reduction_rtol of its size).
            extra = reduction_rtol(got.numel()) * envelope["update:params"][i]
        if case.op == "adafactor_":
            # Adafactor's step size alpha/clip carries two fp32 reductions over the tensor
            # (sum p^2, sum u^2), and a factored u the row and column sums of g^2 and the
            # mean of the row factor (each over fewer elements), under a square root: four
            # reductions of the tensor's size bound the relative error of the update.
            extra = 4 * reduction_rtol(got.numel()) * envelope["update:params"][i]
            if case.storage.state != torch.float32:
                update = envelope["update:params"][i].reshape(-1)
                extra = extra.reshape(-1) + _adafactor_stored_moments(inputs, oracle, i) * update
        assert_close(
            got,
            want,
            tolerance(got.dtype),
            k_tol,
            f"{where}: {name}[{i}] {specs[i].describe()}",
            envelope["params"][i],
            mask,
            extra,
        )
        if mask is not None and mask.any():
            # The oracle takes the backend's value where the sign was excused.
            want.copy_(torch.where(mask, got.detach().to("cpu", F64), want))
    for name, ts in inputs.lists.items():
        if name in ("params", "grads", "master_params"):
            continue
        for i, (got, want) in enumerate(zip(ts, oracle[name], strict=True)):
            what = f"{where}: {name}[{i}] {specs[i].describe()}"
            if name == "steps":
                assert got.item() == want.item(), f"{what}: step {got.item()} != {want.item()}"
            else:
                extra = None
                if name in ("row_vars", "col_vars"):
                    # [note: factored layouts] a factor is a mean of g^2 over a row (column):
                    # an fp32 reduction, bounded by one over the whole tensor.
                    n = inputs.lists["params"][i].numel()
                    extra = reduction_rtol(n) * envelope[name][i]
                assert_close(got, want, tolerance(got.dtype), k_tol, what, envelope[name][i],
                             extra=extra)  # fmt: skip
    if case.storage.master:
        for i, (p, m) in enumerate(
            zip(inputs.lists["params"], inputs.lists["master_params"], strict=True)
        ):
            assert same_bits(p, m.to(p.dtype)), f"{where}: params[{i}] != master.to(dtype)"


def _schema_args(inputs: StepInputs, lists: dict[str, list[Tensor]]) -> tuple:
    """The schema's arguments of a step of ``inputs`` over ``lists`` (on their device)."""
    spec = ops.STEP_OPS[inputs.case.op]
    return (
        *(lists.get(name, []) for name in spec.lists),
        *ops.hyper_table(*(inputs.hypers[h] for h in spec.hypers)),
        *(inputs.flags[f] for f in spec.flags),
        inputs.lr_tensor,
        inputs.grad_scale,
        inputs.clip_coef,
        inputs.found_inf,
    )


def _run_host_passes(inputs: StepInputs, backend: str, oracle, grads, k_tol: int, where: str):
    """A step of an op in HOST_PASSES (see there): the whole op on a copy, the passes on
    ``inputs`` and the oracle, the middle's input compared and its output handed over."""
    passes = HOST_PASSES[inputs.case.op]
    whole = dataclasses.replace(
        inputs, lists={name: [t.clone() for t in ts] for name, ts in inputs.lists.items()}
    )
    run_backend(whole, backend)
    handed_before = {name: [t.clone() for t in oracle[name]] for name in passes.handed}
    run_backend(inputs, backend, op=passes.first)
    run_oracle(inputs, oracle, grads, op=passes.first)
    loaded = [
        reference.load_grad(
            g.detach().to("cpu", F64),
            F64,
            _cpu(inputs.grad_scale),
            _cpu(inputs.clip_coef),
            inputs.flags.get("maximize", False),
        ).abs()
        for g in grads
    ]
    for name in passes.handed:
        for i, (got, want) in enumerate(zip(inputs.lists[name], oracle[name], strict=True)):
            # One rounding of fp32 math to the list's dtype (tolerance(got.dtype)); the
            # value is a lerp of the grad and states (Nesterov: lerp(g, buf, momentum)),
            # whose terms are bounded by |g| and every state's old and new values. A state
            # is read back as stored (torch reads the rounded buf): in a 16-bit state dtype
            # its storage rounding, u_s * |state| (weight <= 1), enters too; the float64
            # oracle keeps it unrounded. (fp32's rounding is among the table's counted ones.)
            terms = loaded[i] + handed_before[name][i].abs() + want.abs()
            stored = torch.zeros_like(want)
            for state, values in oracle.items():
                if state not in ("params", "steps", *passes.handed) and values[i].numel():
                    terms = terms + values[i].abs()
                    dtype = inputs.lists[state][i].dtype
                    if dtype in (torch.bfloat16, torch.float16):
                        stored = stored + UNIT_ROUNDOFF[dtype] * values[i].abs()
            assert_close(got, want, tolerance(got.dtype), k_tol, f"{where}: {name}[{i}] "
                         "after the first pass", terms, extra=stored)  # fmt: skip
    getattr(reference.ops, passes.middle)(*_schema_args(inputs, inputs.lists))
    for name in passes.handed:
        for got, want in zip(inputs.lists[name], oracle[name], strict=True):
            want.copy_(got.detach().to("cpu", F64))
    run_backend(inputs, backend, op=passes.last)
    run_oracle(inputs, oracle, grads, op=passes.last)
    for name, ts in inputs.lists.items():
        for i, (got, want) in enumerate(zip(ts, whole.lists[name], strict=True)):
            assert same_bits(got, want), f"{where}: {name}[{i}] of the op != of its passes"


def check_found_inf_skip(inputs: StepInputs, backend: str, where: str) -> None:
    """A step with found_inf = 1.0 and then 2.0 (torch sums the flag over devices) changes no
    bit of any param, master, state or step count."""
    inputs.lists["grads"] = make_grads(inputs, 99)
    before = [bits(t) for t in inputs.touched()]
    for flag in (1.0, 2.0):
        run_backend(inputs, backend, found_inf=torch.tensor(flag, device=inputs.device))
        for j, (t, b) in enumerate(zip(inputs.touched(), before, strict=True)):
            assert torch.equal(bits(t), b), f"{where}: tensor {j} changed with found_inf={flag}"
    _check_sentinels(inputs, where)


def check_step_case(
    case: StepCase,
    backend: str,
    device: str,
    *,
    steps: int | None = None,
    skip_at: tuple[int, ...] = (),
) -> None:
    """The whole check of a step case: ``steps`` steps (default: the layout's
    ``LAYOUT_STEPS``) against the oracle, as a trajectory (fp32 values) or step by step
    (low-precision storage). ``skip_at``: before the steps
    listed (0 = before the first), a skipped step (``found_inf`` set) is taken and must change
    nothing; the steps after it must then match an oracle that never saw it (so SGD's
    first-step rule and the bias corrections survive a skipped step)."""
    inputs = make_inputs(case, device)
    oracle = to_oracle(inputs)
    envelope: dict[str, list[Tensor]] = {}
    for k in range(1, (steps or LAYOUT_STEPS[case.layout]) + 1):
        if k - 1 in skip_at:
            check_found_inf_skip(inputs, backend, f"{case.id} on {backend}, before step {k}")
        if not case.storage.trajectory:
            oracle, envelope = to_oracle(inputs), {}
        check_step(inputs, backend, oracle, k, k if case.storage.trajectory else 1, envelope)


# ---------------------------------------------------------------------------------------------
# Cross-backend comparison


def compare_backends(case: StepCase, first: str, second: str, device: str, steps: int = 1) -> None:
    """Run ``first`` and ``second`` on identical inputs and require every param, master and
    state to agree within ``CROSS_BACKEND_MAX_ULPS`` ULPs per step (steps bit for bit).

    One exception, derived not tuned: LAMB's trust ratio comes from reductions whose order
    each backend picks (deterministically), so its params may also differ by the reduction
    tolerance of the tensor's size times the size of the update (which matters in ULPs only
    where the param is much smaller than its update).
    """
    a, b = make_inputs(case, device), make_inputs(case, device)
    updated = "master_params" if "master_params" in a.lists else "params"
    for k in range(1, steps + 1):
        a.lists["grads"], b.lists["grads"] = make_grads(a, k), make_grads(b, k)
        before = [t.detach().to("cpu", F64) for t in a.fp32_values()]
        run_backend(a, first)
        run_backend(b, second)
        for name, ts in a.lists.items():
            for i, (x, y) in enumerate(zip(ts, b.lists[name], strict=True)):
                if x.numel() == 0:
                    continue
                far = ulp_distance(x.contiguous(), y.contiguous()) > CROSS_BACKEND_MAX_ULPS * k
                if case.op == "lamb_" and name == updated:
                    x64, y64 = x.detach().to("cpu", F64), y.detach().to("cpu", F64)
                    slack = 2 * k * reduction_rtol(x.numel()) * (x64 - before[i]).abs()
                    far &= ((x64 - y64).abs() > slack).to(far.device)
                if case.op == "adafactor_" and name in (updated, "row_vars", "col_vars"):
                    # Adafactor's step size and factors come from reductions whose order
                    # each backend picks: the param within twice check_step's derived
                    # bound of the update (4 reductions of the tensor's size, each backend
                    # off the exact value), a factor within one reduction of its size.
                    x64, y64 = x.detach().to("cpu", F64), y.detach().to("cpu", F64)
                    n = a.lists["params"][i].numel()
                    if name == updated:
                        slack = 2 * k * 4 * reduction_rtol(n) * (x64 - before[i]).abs()
                    else:
                        slack = 2 * k * reduction_rtol(n) * x64.abs()
                    far &= ((x64 - y64).abs() > slack).to(far.device)
                if far.any():
                    j = int(far.reshape(-1).nonzero()[0])
                    d = ulp_distance(x.contiguous(), y.contiguous()).reshape(-1)
                    raise AssertionError(
                        f"{case.id}, step {k}: {name}[{i}] differs between {first} and "
                        f"{second} at {int(far.sum())} elements; first at flat index {j}: "
                        f"{x.reshape(-1)[j].item()!r} vs {y.reshape(-1)[j].item()!r}, "
                        f"{int(d[j])} ULPs"
                    )


# ---------------------------------------------------------------------------------------------
# grad_norm and scale_


def make_list(case: ListCase, device: str, seed: int = 0) -> list[Tensor]:
    """Random tensors of the case's layout and dtype(s), multiplied by its grad_scale."""
    gen = torch.Generator().manual_seed(seed)
    scale = case.grad_scale or 1.0
    out = []
    for i, s in enumerate(LAYOUTS[case.layout]):
        v = torch.randn(s.shape, generator=gen) * scale * (1 + i % 4)
        out.append(allocate(s, v, case.dtype_of(i), device))
    return out


def check_grad_norm(case: ListCase, backend: str, device: str) -> None:
    """Total and per-tensor norms within the size-derived reduction tolerance of the float64
    oracle, fp32 results, found_inf = 0, inputs untouched, and the same bits on a rerun."""
    tensors = make_list(case, device)
    before = [bits(t) for t in tensors]
    scale = None if case.grad_scale is None else torch.tensor(case.grad_scale, device=device)
    result = ops.grad_norm(
        tensors, case.norm_type, per_tensor=case.per_tensor, grad_scale=scale, backend=backend
    )
    where = f"grad_norm {case.id} on {backend}/{device}"
    for i, (t, b) in enumerate(zip(tensors, before, strict=True)):
        assert torch.equal(bits(t), b), f"{where}: tensors[{i}] was written"
    total, per, found_inf = result
    want_total, want_per, _ = reference.grad_norm(
        [t.detach().to("cpu", F64) for t in tensors], case.norm_type, True, _cpu(scale)
    )
    assert total.dtype == torch.float32 and total.shape == (), f"{where}: total {total}"
    assert found_inf.dtype == torch.float32 and found_inf.item() == 0.0, f"{where}: found_inf"
    assert per.dtype == torch.float32 and per.shape == (
        (len(tensors),) if case.per_tensor else (0,)
    )

    def rtol(n: int) -> float:
        return INF_NORM_RTOL if case.norm_type == math.inf else reduction_rtol(n)

    total_n = sum(t.numel() for t in tensors)
    exact = Tolerance(rtol(total_n), 0.0, 0.0, "reduction")
    assert_close(total, want_total, exact, 1, f"{where}: total norm over {total_n} elements")
    if case.per_tensor:
        for i, t in enumerate(tensors):
            tol = Tolerance(rtol(t.numel()), 0.0, 0.0, "reduction")
            assert_close(per[i], want_per[i], tol, 1, f"{where}: norm of tensors[{i}]")
    again = ops.grad_norm(
        tensors, case.norm_type, per_tensor=case.per_tensor, grad_scale=scale, backend=backend
    )
    for x, y in zip(result, again, strict=True):
        assert same_bits(x, y), f"{where}: not deterministic"


def check_scale(case: ListCase, backend: str, device: str) -> None:
    """``t * scale`` is one fp32 multiplication and one rounding: every backend must give
    exactly the bits of torch's fp32 product rounded to the storage dtype."""
    tensors = make_list(case, device)
    scale = torch.tensor(0.37, device=device)
    want = [(t.float() * scale).to(t.dtype) for t in tensors]
    found_inf = torch.zeros((), device=device)
    ops.scale_(tensors, scale, found_inf, backend=backend)
    where = f"scale_ {case.id} on {backend}/{device}"
    for i, (t, w) in enumerate(zip(tensors, want, strict=True)):
        assert same_bits(t, w), f"{where}: tensors[{i}] differs from the fp32 product"
        assert sentinel_intact(t), f"{where}: wrote before the offset view tensors[{i}]"
    assert found_inf.item() == 0.0, f"{where}: found_inf set on finite input"
