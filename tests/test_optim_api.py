"""torch.optim behaviour: groups, add_param_group, zero_grad, closure, hooks, every
lr_scheduler, tensor lr, CUDA-graph capture, and bad input."""

from __future__ import annotations

import copy
import inspect
import re

import pytest
import torch
from optim_cases import (
    TORCH_TOLERANCE,
    assert_close,
    assert_params_close,
    clone_params,
    make_model,
    random_grads,
    step_twins,
    usable_backends,
)

import fusedopt
from fusedopt import ops
from fusedopt.optim._base import FusedOptimizer

#: The classes that are drop-ins for a torch.optim class, with it.
TORCH_TWINS = [
    (cls, getattr(torch.optim, cls.__name__))
    for cls in (fusedopt.AdamW, fusedopt.Adam, fusedopt.SGD)
]


def _twins(dtype=torch.float32):
    return clone_params(make_model(), dtype), clone_params(make_model(), dtype)


@pytest.mark.parametrize("cls,torch_cls", TORCH_TWINS)
def test_constructor_names_and_defaults_match_torch(cls, torch_cls):
    ours = inspect.signature(cls.__init__).parameters
    theirs = inspect.signature(torch_cls.__init__).parameters
    for name, param in theirs.items():
        assert name in ours, name
        if name not in ("capturable",):
            assert ours[name].default == param.default, name
    fusedopt_extras = {"master_weights", "master_sync", "max_grad_norm", "backend",
                       "grad_norm_group"}  # fmt: skip
    assert fusedopt_extras <= set(ours)
    params = clone_params(make_model(), torch.float32)
    cls(params, foreach=True)  # accepted and ignored (with fused=True: see below)
    cls(params, fused=True)


#: Constructor arguments that are not group keys: the optimizer's own, torch's accepted-and-
#: ignored switches, lion-pytorch's kernel switch.
_NOT_GROUP_KEYS = {"self", "params", "grad_norm_group", "foreach", "fused", "differentiable",
                   "use_triton"}  # fmt: skip


@pytest.mark.parametrize(
    "cls",
    [fusedopt.Adam, fusedopt.AdamW, fusedopt.SGD, fusedopt.Lion, fusedopt.LAMB, fusedopt.Adan],
)
def test_group_defaults_are_the_constructor_arguments(cls):
    """The constructors share one body (``_init_from_arguments(locals())``): every argument
    but the optimizer's own becomes a group default, with its value, and nothing else does."""
    names = set(inspect.signature(cls.__init__).parameters) - _NOT_GROUP_KEYS
    if cls is fusedopt.AdamW:
        names.add("decoupled_weight_decay")  # Adam's group key; AdamW sets it True
    opt = cls(clone_params(make_model(), torch.float32), lr=0.5, weight_decay=0.25)
    assert set(opt.defaults) == names
    assert opt.defaults["lr"] == 0.5 and opt.defaults["weight_decay"] == 0.25
    assert opt.param_groups[0]["master_sync"] is True


def test_per_group_hyperparameters_and_add_param_group_match_torch():
    params, twin = _twins()
    ours = fusedopt.AdamW(
        [{"params": params[:2], "lr": 1e-2, "weight_decay": 0.5}, {"params": params[2:3]}],
        lr=3e-3,
        betas=(0.8, 0.9),
    )
    ref = torch.optim.AdamW(
        [{"params": twin[:2], "lr": 1e-2, "weight_decay": 0.5}, {"params": twin[2:3]}],
        lr=3e-3,
        betas=(0.8, 0.9),
    )
    for step in range(6):
        if step == 3:
            ours.add_param_group({"params": params[3:], "amsgrad": True, "eps": 1e-3})
            ref.add_param_group({"params": twin[3:], "amsgrad": True, "eps": 1e-3})
        random_grads(params, step)
        random_grads(twin, step)
        ours.step()
        ref.step()
    assert len(ours.param_groups) == 3 and ours.param_groups[2]["amsgrad"]
    for i, (p, q) in enumerate(zip(params, twin, strict=True)):
        assert_close(p, q, TORCH_TOLERANCE, f"param {i}")


def test_zero_grad_closure_and_step_hooks():
    params = clone_params(make_model(), torch.float32)
    opt = fusedopt.SGD(params, lr=0.1)
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: seen.append("post"))

    def closure():
        assert torch.is_grad_enabled()
        opt.zero_grad()
        loss = sum((p.float() ** 2).sum() for p in params)
        loss.backward()
        seen.append("closure")
        return loss

    before = [p.detach().clone() for p in params]
    loss = opt.step(closure)
    assert seen == ["pre", "closure", "post"]
    assert torch.is_tensor(loss)
    for p, b in zip(params, before, strict=True):
        torch.testing.assert_close(p, b - 0.1 * 2 * b)
    opt.zero_grad()
    assert all(p.grad is None for p in params)


def _schedulers():
    s = torch.optim.lr_scheduler
    return {
        "LambdaLR": lambda o: s.LambdaLR(o, lambda e: 0.9**e),
        "MultiplicativeLR": lambda o: s.MultiplicativeLR(o, lambda e: 0.95),
        "StepLR": lambda o: s.StepLR(o, 2, 0.5),
        "MultiStepLR": lambda o: s.MultiStepLR(o, [2, 4], 0.5),
        "ConstantLR": lambda o: s.ConstantLR(o, 0.5, 3),
        "LinearLR": lambda o: s.LinearLR(o, 0.2, 1.0, 4),
        "ExponentialLR": lambda o: s.ExponentialLR(o, 0.9),
        "SequentialLR": lambda o: s.SequentialLR(
            o, [s.ConstantLR(o, 0.5, 2), s.ExponentialLR(o, 0.9)], [2]
        ),
        "CosineAnnealingLR": lambda o: s.CosineAnnealingLR(o, 5),
        "ChainedScheduler": lambda o: s.ChainedScheduler(
            [s.ConstantLR(o, 0.5, 2), s.ExponentialLR(o, 0.9)]
        ),
        "ReduceLROnPlateau": lambda o: s.ReduceLROnPlateau(o, patience=0),
        "CyclicLR": lambda o: s.CyclicLR(o, 1e-3, 1e-2, step_size_up=2),
        "CosineAnnealingWarmRestarts": lambda o: s.CosineAnnealingWarmRestarts(o, 3),
        "OneCycleLR": lambda o: s.OneCycleLR(o, 1e-2, total_steps=10),
        "PolynomialLR": lambda o: s.PolynomialLR(o, 5, 2.0),
    }


def test_every_scheduler_is_covered():
    covered = set(_schedulers()) | {"LRScheduler"}
    assert covered == set(torch.optim.lr_scheduler.__all__)


@pytest.mark.parametrize(
    "cls,torch_cls,kwargs",
    [
        (fusedopt.AdamW, torch.optim.AdamW, {}),
        (fusedopt.SGD, torch.optim.SGD, {"momentum": 0.9}),
    ],
)
@pytest.mark.parametrize("name", list(_schedulers()))
def test_scheduler_matches_torch(name, cls, torch_cls, kwargs):
    """Every torch lr_scheduler drives fusedopt as it drives torch (CyclicLR and OneCycleLR
    cycle betas[0] for AdamW and momentum for SGD)."""
    params, twin = _twins()
    ours, ref = cls(params, lr=1e-2, **kwargs), torch_cls(twin, lr=1e-2, **kwargs)
    make = _schedulers()[name]
    sched_ours, sched_ref = make(ours), make(ref)
    for step in range(8):
        random_grads(params, step)
        random_grads(twin, step)
        ours.step()
        ref.step()
        if name == "ReduceLROnPlateau":
            sched_ours.step(1.0)
            sched_ref.step(1.0)
        else:
            sched_ours.step()
            sched_ref.step()
        for g, h in zip(ours.param_groups, ref.param_groups, strict=True):
            assert g["lr"] == h["lr"]
            assert g.get("betas") == h.get("betas") and g.get("momentum") == h.get("momentum")
    for i, (p, q) in enumerate(zip(params, twin, strict=True)):
        assert_close(p, q, TORCH_TOLERANCE, f"param {i}")


def test_one_cycle_cycles_betas_of_lion_and_lamb():
    for cls in (fusedopt.Lion, fusedopt.LAMB):
        params = clone_params(make_model(), torch.float32)
        opt = cls(params, lr=1e-3)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-3, total_steps=4)
        seen = set()
        for step in range(3):
            random_grads(params, step)
            opt.step()
            sched.step()
            seen.add(opt.param_groups[0]["betas"][0])
        assert len(seen) == 3


def test_tensor_lr_with_scheduler_equals_float_lr():
    params, twin = _twins()
    ours = fusedopt.AdamW(params, lr=torch.tensor(1e-2))
    ref = fusedopt.AdamW(twin, lr=1e-2)
    scheds = [torch.optim.lr_scheduler.ExponentialLR(o, 0.7) for o in (ours, ref)]
    for step in range(5):
        random_grads(params, step)
        random_grads(twin, step)
        ours.step()
        ref.step()
        for s in scheds:
            s.step()
    assert torch.is_tensor(ours.param_groups[0]["lr"])
    assert_params_close(params, twin)


@pytest.mark.cuda
@pytest.mark.parametrize("cls", [fusedopt.AdamW, fusedopt.SGD, fusedopt.Lion, fusedopt.LAMB])
def test_capturable_step_replays_in_cuda_graph_with_tensor_lr(cls):
    """capturable=True: a step captured in a CUDA graph replays correctly while a scheduler
    updates the tensor lr in place; it equals the same steps run eagerly."""
    kwargs = {"momentum": 0.9} if cls is fusedopt.SGD else {}
    params = clone_params(make_model(), torch.float32, "cuda")
    twin = clone_params(make_model(), torch.float32, "cuda")
    lr = torch.tensor(1e-3, device="cuda")
    opt = cls(params, lr=lr, capturable=True, max_grad_norm=1.0, **kwargs)
    ref = cls(twin, lr=1e-3, max_grad_norm=1.0, **kwargs)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, 0.8)
    ref_sched = torch.optim.lr_scheduler.ExponentialLR(ref, 0.8)
    static_grads = [torch.zeros_like(p) for p in params]
    for p, g in zip(params, static_grads, strict=True):
        p.grad = g
    random_grads(twin, 0)  # warm up (creates state) outside the graph, on both
    for p, q in zip(params, twin, strict=True):
        p.grad.copy_(q.grad)
    opt.step()
    ref.step()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        opt.step()
    torch.cuda.current_stream().wait_stream(stream)
    for step in range(1, 6):
        sched.step()
        ref_sched.step()
        random_grads(twin, step)
        for p, q in zip(params, twin, strict=True):
            p.grad.copy_(q.grad)
        graph.replay()
        ref.step()
    assert_params_close(params, twin)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "make,match",
    [
        (lambda p: fusedopt.AdamW(p, lr=-1.0), "Invalid learning rate"),
        (lambda p: fusedopt.AdamW(p, eps=-1.0), "Invalid epsilon"),
        (lambda p: fusedopt.AdamW(p, betas=(1.0, 0.9)), "Invalid beta parameter at index 0"),
        (lambda p: fusedopt.Adam(p, betas=(0.9, -0.1)), "Invalid beta parameter at index 1"),
        (lambda p: fusedopt.AdamW(p, weight_decay=-1.0), "Invalid weight_decay"),
        (lambda p: fusedopt.SGD(p, lr=0.1, momentum=-1.0), "Invalid momentum"),
        (lambda p: fusedopt.SGD(p, lr=0.1, nesterov=True), "Nesterov momentum requires"),
        (lambda p: fusedopt.SGD(p, lr=0.1, momentum=0.9, dampening=0.1, nesterov=True), "Nesterov"),
        (lambda p: fusedopt.Lion(p, lr=0.0), "Invalid learning rate"),
        (lambda p: fusedopt.Lion(p, betas=(0.9, 1.5)), "Invalid beta"),
        (lambda p: fusedopt.LAMB(p, eps=-1e-6), "Invalid epsilon"),
        (lambda p: fusedopt.LAMB(p, max_grad_norm=-1.0), "Invalid max_grad_norm"),
        (lambda p: fusedopt.AdamW(p, backend="nope"), "unknown backend"),
        (lambda p: fusedopt.AdamW(p, differentiable=True), "differentiable"),
        (lambda p: fusedopt.AdamW([{"params": p, "lr": -2.0}]), "Invalid learning rate"),
    ],
)
def test_invalid_hyperparameters_raise_value_error(make, match):
    with pytest.raises(ValueError, match=match):
        make(clone_params(make_model(), torch.float32))


_MIXED_BETAS = [(0.9, torch.tensor(0.99)), (torch.tensor(0.9), 0.99)]


@pytest.mark.parametrize("betas", _MIXED_BETAS, ids=["float_tensor", "tensor_float"])
@pytest.mark.parametrize(
    "cls,torch_cls",
    [
        (fusedopt.Adam, torch.optim.Adam),
        (fusedopt.AdamW, torch.optim.AdamW),
        (fusedopt.LAMB, None),
        (fusedopt.Lion, None),
    ],
)
def test_betas_mixing_a_float_and_a_tensor_raise_as_in_torch(cls, torch_cls, betas):
    """torch's ValueError, word for word, before any tensor is touched (issue #13, item 8)."""
    message = "betas must be either both floats or both Tensors"
    params = clone_params(make_model(), torch.float32)
    if torch_cls is not None:
        with pytest.raises(ValueError, match=message):
            torch_cls(params, betas=betas)
    with pytest.raises(ValueError, match=message):
        cls(params, betas=betas)
    opt = cls(params)
    with pytest.raises(ValueError, match=message):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))], "betas": betas})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("cls,torch_cls", TORCH_TWINS)
def test_fused_and_foreach_together_raise_as_in_torch(cls, torch_cls):
    message = "`fused` and `foreach` cannot be `True` together."
    params = clone_params(make_model(), torch.float32)
    with pytest.raises(RuntimeError, match=re.escape(message)):
        torch_cls(params, lr=0.1, fused=True, foreach=True)
    with pytest.raises(RuntimeError, match=re.escape(message)):
        cls(params, lr=0.1, fused=True, foreach=True)
    cls(params, lr=0.1, fused=True, foreach=False)  # either alone is accepted, as in torch
    cls(params, lr=0.1, fused=False, foreach=True)


def _bad_grad(kind, p):
    if kind == "sparse":
        p.grad = torch.zeros_like(p).to_sparse()
    elif kind == "complex":
        p.grad_dtype = None
        p.grad = torch.zeros(p.shape, dtype=torch.complex64)
    elif kind == "shape":
        p.grad = torch.zeros_like(p)
        p.grad.data = torch.zeros(p.numel() + 1)
    elif kind == "dtype":
        p.grad_dtype = None
        p.grad = torch.zeros(p.shape, dtype=torch.float64)


@pytest.mark.parametrize(
    "kind,match",
    [
        ("sparse", "sparse"),
        ("complex", "complex"),
        ("shape", "shape"),
        ("dtype", "dtype torch.float64"),
    ],
)
@pytest.mark.parametrize("cls", [fusedopt.AdamW, fusedopt.SGD, fusedopt.LAMB, fusedopt.Lion])
def test_bad_grad_raises_naming_the_param_before_any_change(cls, kind, match):
    model = make_model()
    named = list(model.named_parameters())
    params = clone_params(model, torch.float32)
    opt = cls([{"params": params, "param_names": [n for n, _ in named]}], lr=1e-2)
    random_grads(params, 0)
    opt.step()
    before = [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())
    random_grads(params, 1)
    target = next(i for i, p in enumerate(params) if p.dim() == 2)
    _bad_grad(kind, params[target])
    with pytest.raises((RuntimeError, TypeError), match=match) as error:
        opt.step()
    assert f"'{named[target][0]}'" in str(error.value)
    assert all(torch.equal(p, b) for p, b in zip(params, before[0], strict=True))
    for pid, state in opt.state_dict()["state"].items():
        for key, value in state.items():
            assert torch.equal(value, before[1]["state"][pid][key])


def test_a_new_param_with_a_bad_grad_gets_no_state():
    params = clone_params(make_model(), torch.float32)
    opt = fusedopt.AdamW(params)
    random_grads(params, 0)
    _bad_grad("sparse", params[-1])
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert len(opt.state) == 0


def test_unsupported_param_dtype_raises():
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.int32), requires_grad=False)
    p.grad = torch.zeros(3, dtype=torch.int32)
    with pytest.raises(TypeError, match="unsupported dtype"):
        fusedopt.AdamW([p]).step()


COMPLEX_CASES = [
    (fusedopt.AdamW, torch.optim.AdamW, {"weight_decay": 0.1, "amsgrad": True}),
    (fusedopt.Adam, torch.optim.Adam, {"weight_decay": 0.1, "maximize": True}),
    (fusedopt.SGD, torch.optim.SGD, {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1}),
]


def _complex_twins(dtype):
    gen = torch.Generator().manual_seed(0)
    shapes = [(5, 3), (7,), ()]
    values = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    real = torch.nn.Parameter(torch.randn(4, generator=gen, dtype=dtype.to_real()))
    return [torch.nn.Parameter(v.clone()) for v in values] + [real], [
        torch.nn.Parameter(v.clone()) for v in [*values, real.detach()]
    ]


def _as_real(t):
    return torch.view_as_real(t.detach()) if t.is_complex() else t.detach()


def _complex_grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)


@pytest.mark.parametrize("backend", usable_backends())
@pytest.mark.parametrize("cls,torch_cls,kwargs", COMPLEX_CASES, ids=["adamw", "adam", "sgd"])
def test_complex_params_step_as_torch_does(cls, torch_cls, kwargs, backend):
    """issue #13, item 11: torch steps complex params as real views; so does fusedopt, with
    complex states (in the state dict too), mixed with a real param, clipped over |z|."""
    params, twin = _complex_twins(torch.complex64)
    ours = cls(params, lr=1e-2, backend=backend, max_grad_norm=1.0, **kwargs)
    ref = torch_cls(twin, lr=1e-2, **kwargs)
    for step in range(5):
        _complex_grads(params, step)
        _complex_grads(twin, step)
        ours.step()
        torch.nn.utils.clip_grad_norm_(twin, 1.0)
        ref.step()
    for i, (p, q) in enumerate(zip(params, twin, strict=True)):
        assert p.dtype == q.dtype
        assert_close(_as_real(p), _as_real(q), TORCH_TOLERANCE, f"param {i}")
        for key, value in ref.state[q].items():
            if key != "step":
                assert ours.state[p][key].dtype == value.dtype, key
                assert_close(
                    _as_real(ours.state[p][key]), _as_real(value),
                    TORCH_TOLERANCE, f"{key} of param {i}",
                )  # fmt: skip


@pytest.mark.parametrize("cls,torch_cls,kwargs", COMPLEX_CASES, ids=["adamw", "adam", "sgd"])
def test_complex_state_dicts_go_to_torch_and_back(cls, torch_cls, kwargs):
    params, twin = _complex_twins(torch.complex128)
    ours, ref = cls(params, lr=1e-2, **kwargs), torch_cls(twin, lr=1e-2, **kwargs)
    for step in range(2):
        _complex_grads(params, step)
        ours.step()
    ref.load_state_dict(ours.state_dict())
    ours.load_state_dict(ref.state_dict())  # and back: complex states load as they are
    for p, q in zip(params, twin, strict=True):
        q.data.copy_(p)
    step_twins(ours, ref, params, twin, range(2, 5), _complex_grads)
    for p, q in zip(params, twin, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("cls", [fusedopt.LAMB, fusedopt.Lion])
def test_complex_params_of_lamb_and_lion_are_refused_before_any_change(cls):
    """timm's Lamb and lion-pytorch's Lion have no complex semantics (Lion's sign() has none
    for complex numbers): a clear error naming the param, nothing touched."""
    params, _ = _complex_twins(torch.complex64)
    _complex_grads(params, 0)
    before = [p.detach().clone() for p in params]
    opt = cls(params)
    with pytest.raises(TypeError, match=r"param \(group 0, index 0\) is complex"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
    assert len(opt.state) == 0


@pytest.mark.parametrize("cls", [fusedopt.AdamW, fusedopt.SGD])
def test_complex_param_with_a_sparse_grad_is_refused(cls):
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))
    p.grad = torch.zeros(3, dtype=torch.complex64).to_sparse()
    with pytest.raises(TypeError, match="needs a dense grad of its own dtype"):
        cls([p], lr=0.1).step()


def test_params_without_grads_are_skipped_and_get_no_state(monkeypatch, count_calls):
    params = clone_params(make_model(), torch.float32)
    opt = fusedopt.AdamW(params)
    params[0].grad = torch.ones_like(params[0])
    seen = []
    real = ops.step
    monkeypatch.setattr(
        ops, "step", lambda op, lists, *a, **k: (seen.append(lists), real(op, lists, *a, **k))
    )
    planned = count_calls(FusedOptimizer, "_run_planned")  # [note: planned calls]
    opt.step()
    # One op call: through ops.step, or the plan's own call of the same lists.
    assert len(seen) + planned[0] == 1
    assert all(len(lists["params"]) == 1 for lists in seen)
    assert [call.params for call in opt._step_out["plan"].calls] == [[params[0]]]
    assert set(opt.state) == {params[0]}


def test_lion_decoupled_weight_decay_divides_by_the_initial_lr():
    """lion-pytorch: decoupled_weight_decay=True uses wd / lr_at_construction, whatever the
    scheduler does to lr later."""
    params, twin = _twins()
    ours = fusedopt.Lion(params, lr=1e-3, weight_decay=0.1, decoupled_weight_decay=True)
    same = fusedopt.Lion(twin, lr=1e-3, weight_decay=0.1 / 1e-3)
    step_twins(ours, same, params, twin, range(3))
    for p, q in zip(params, twin, strict=True):
        assert torch.equal(p, q)


def test_grad_in_another_memory_layout_is_accepted():
    """A transposed (non-contiguous) grad steps as its contiguous copy does, as in torch."""
    params, twin = _twins()
    ours, same = fusedopt.AdamW(params), fusedopt.AdamW(twin)
    random_grads(twin, 0)
    for p, q in zip(params, twin, strict=True):
        p.grad = q.grad.t().contiguous().t() if q.dim() == 2 else q.grad.clone()
    assert any(not p.grad.is_contiguous() for p in params)
    ours.step()
    same.step()
    for p, q in zip(params, twin, strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize(
    "cls,torch_cls,kwargs",
    [
        (fusedopt.AdamW, torch.optim.AdamW, {"amsgrad": True}),
        (fusedopt.SGD, torch.optim.SGD, {"momentum": 0.9, "nesterov": True}),
    ],
)
def test_fp64_params_step_in_fp64(cls, torch_cls, kwargs):
    params, twin = _twins(torch.float64)
    ours, ref = cls(params, lr=1e-2, **kwargs), torch_cls(twin, lr=1e-2, **kwargs)
    step_twins(ours, ref, params, twin, range(5))
    for p, q in zip(params, twin, strict=True):
        assert (
            p.dtype == torch.float64
            and ours.state[p]["momentum_buffer" if cls is fusedopt.SGD else "exp_avg"].dtype
            == torch.float64
        )
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
