"""Shared cases for the optimizer-class tests: one registry, one tolerance table, one driver.

[note: driven trajectories] Every optimizer under test follows the same stream of grads: a
small fp64 "driver" model trains with the oracle optimizer (the same fusedopt class on the
``reference`` backend, in float64), and at each step its grads, rounded to each run's grad
dtype, are handed to every other run. The runs are thus compared on the optimizer alone: no
model feedback amplifies rounding into divergence, so the tolerances below stay tight.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import torch

import fusedopt


def usable_backends(device: str = "cpu") -> list[str]:
    """The backends that can run on ``device`` here (new ones join when they land)."""
    return [
        name
        for name, status in fusedopt.backends().items()
        if status.usable and device in status.devices
    ]


@dataclasses.dataclass(frozen=True)
class Case:
    """One optimizer configuration, and torch's twin where torch has the algorithm."""

    name: str
    cls: type
    kwargs: dict[str, Any]
    torch_cls: type | None = None
    torch_kwargs: dict[str, Any] | None = None
    #: Why the fp64 oracle's trajectory is not this case's (None: it is). Muon's update is a
    #: bf16 Newton-Schulz output: an fp64 oracle rounds other NS inputs to bf16 wherever its
    #: momentum differs from the run's below bf16 resolution, and the NS spreads such a flip
    #: over the whole matrix, so no elementwise tolerance is derivable.
    no_oracle_trajectory: str | None = None


def torch_twin(name: str, cls: type, **kwargs: Any) -> Case:
    """A case whose torch twin is the torch.optim class of the same name, with the same
    arguments."""
    return Case(name, cls, kwargs, getattr(torch.optim, cls.__name__), dict(kwargs))


MUON_NS = (
    "Muon's update is a bf16 Newton-Schulz output that an fp64 oracle reproduces only to "
    "bf16 rounding; tests/test_optim_muon.py checks it against torch.optim.Muon bit for bit, "
    "with master weights and without"
)

CASES = [
    torch_twin("adamw", fusedopt.AdamW, lr=1e-2, weight_decay=0.1),
    torch_twin(
        "adamw_amsgrad_maximize",
        fusedopt.AdamW,
        lr=1e-2,
        betas=(0.8, 0.99),
        amsgrad=True,
        maximize=True,
    ),
    torch_twin("adam_l2", fusedopt.Adam, lr=1e-2, weight_decay=0.1),
    torch_twin(
        "adam_decoupled", fusedopt.Adam, lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True
    ),
    torch_twin(
        "sgd_momentum", fusedopt.SGD, lr=1e-2, momentum=0.9, dampening=0.1, weight_decay=0.01
    ),
    torch_twin("sgd_nesterov", fusedopt.SGD, lr=1e-2, momentum=0.9, nesterov=True),
    torch_twin("sgd_plain", fusedopt.SGD, lr=1e-2),
    Case("lamb", fusedopt.LAMB, dict(lr=1e-2, weight_decay=0.01)),
    Case("lamb_trust_clip", fusedopt.LAMB, dict(lr=1e-2, trust_clip=True, always_adapt=True)),
    Case("lion", fusedopt.Lion, dict(lr=1e-3, weight_decay=0.1)),
    Case("adan", fusedopt.Adan, dict(lr=1e-2, weight_decay=0.02)),
    Case(
        "adan_no_prox_clip",
        fusedopt.Adan,
        dict(lr=1e-2, weight_decay=0.02, no_prox=True, max_grad_norm=0.5),
    ),
    # schedulefree's AdamWScheduleFree (tests/test_optim_schedulefree.py runs it against that).
    Case(
        "schedulefree_adamw",
        fusedopt.ScheduleFreeAdamW,
        dict(lr=1e-2, weight_decay=0.05, warmup_steps=5),
    ),
    Case(
        "schedulefree_adamw_r_clip",
        fusedopt.ScheduleFreeAdamW,
        dict(lr=1e-2, betas=(0.8, 0.99), r=0.5, weight_lr_power=1.0, max_grad_norm=0.5),
    ),
    # eps1 given: the oracle runs in float64, where eps1=None would be float64's eps
    # (tests/test_optim_adafactor.py checks None against torch directly).
    torch_twin(
        "adafactor_wd_maximize",
        fusedopt.Adafactor,
        lr=1e-2,
        eps=(1e-10, 1e-3),
        weight_decay=0.1,
        maximize=True,
    ),
    # lr 0.2 > 1/sqrt(t) from t = 26: rho = 1/sqrt(t) for the last half of the 50 steps
    torch_twin(
        "adafactor_rho_clip",
        fusedopt.Adafactor,
        lr=0.2,
        eps=(1e-10, 1e-2),
        d=1.5,
        beta2_decay=-0.5,
    ),
    # The model's matrices step Muon, its biases and vectors AdamW ([note: muon passes]);
    # torch.optim.Muon refuses vectors, so its twin is tests/test_optim_muon.py.
    Case("muon", fusedopt.Muon, dict(lr=1e-2, weight_decay=0.1), no_oracle_trajectory=MUON_NS),
    Case(
        "muon_plain_clip",
        fusedopt.Muon,
        dict(lr=1e-2, nesterov=False, adjust_lr_fn="match_rms_adamw", max_grad_norm=0.5),
        no_oracle_trajectory=MUON_NS,
    ),
]
CASE_IDS = [case.name for case in CASES]


@dataclasses.dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol: float
    why: str


#: [note: driven trajectories] one entry per storage dtype, each with its reason.
TOLERANCES = {
    # fp32 storage (or fp32 masters) against the fp64 oracle after 50 driven steps: each step
    # rounds each value a few times at 2^-24 relative; Adam/LAMB divide by sqrt(v) + eps, which
    # amplifies a relative error of v by at most 1/2; 50 steps accumulate ~50 such errors.
    # Observed (reference backend, these sizes): max |err| / (atol + rtol*|want|) = 0.22
    # (Lion), 0.17 (AMSGrad), <= 0.1 for the rest: a 4.5x margin at worst.
    torch.float32: Tolerance(1e-5, 1e-6, "fp32 rounding, 50 steps"),
    # One step of bf16 storage from identical inputs: the result is one bf16 rounding of the
    # fp32 value, i.e. within 2^-8 relative.
    torch.bfloat16: Tolerance(2**-8, 1e-6, "one bf16 rounding"),
    # One step of fp16 storage from identical inputs: one fp16 rounding, 2^-11 relative.
    torch.float16: Tolerance(2**-11, 1e-6, "one fp16 rounding"),
}

#: torch.optim in fp32 against fusedopt in fp32, both fed the same fp32 grads: the same fp32
#: math in a different order of operations; a few ulps per step, over 50 steps. Observed at
#: most 0.06 of this bound (AMSGrad).
TORCH_TOLERANCE = Tolerance(2e-5, 2e-6, "fp32 vs fp32, different operation order, 50 steps")


def make_model(seed: int = 0) -> torch.nn.Module:
    """A small MLP with an unused param (no grad: must be skipped) and odd sizes."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.Tanh(), torch.nn.Linear(13, 3))
    model.register_parameter("unused", torch.nn.Parameter(torch.randn(5)))
    return model.double()


#: Where the param without a grad sits in ``make_model().parameters()``.
UNUSED = [name for name, _ in make_model().named_parameters()].index("unused")


def batches(steps: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(16, 7, generator=g, dtype=torch.float64),
         torch.randn(16, 3, generator=g, dtype=torch.float64))
        for _ in range(steps)
    ]  # fmt: skip


def random_grads(params, seed: int) -> None:
    """New grad tensors (seeded, standard normal, in each param's dtype and on its device), as
    ``zero_grad(set_to_none=True)`` and a backward give."""
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.device, p.dtype)


def step_twins(ours, ref, params, twin, seeds, grads=random_grads) -> None:
    """Step two optimizers (over ``params`` and ``twin``) on the same grads, one step per seed."""
    for seed in seeds:
        grads(params, seed)
        grads(twin, seed)
        ours.step()
        ref.step()


def clone_params(model: torch.nn.Module, dtype: torch.dtype, device: str = "cpu"):
    """Leaf copies of the model's params in ``dtype`` (a run's own params)."""
    return [
        torch.nn.Parameter(p.detach().to(device=device, dtype=dtype).clone())
        for p in model.parameters()
    ]


def drive(
    case_kwargs: dict[str, Any],
    cls: type,
    runs: list[tuple[torch.optim.Optimizer, list[torch.nn.Parameter], torch.dtype]],
    steps: int = 50,
    model: torch.nn.Module | None = None,
    oracle_grad_dtype: torch.dtype | None = None,
):
    """[note: driven trajectories] Train the fp64 driver (``make_model()`` unless given) with
    the oracle for ``steps``; each run gets the driver's grads rounded to its grad dtype. With
    ``oracle_grad_dtype`` the oracle's own grads are rounded to it first (low-precision grads:
    the oracle must see the same inputs)."""
    model = make_model() if model is None else model
    oracle = cls(model.parameters(), **case_kwargs, backend="reference")
    for x, y in batches(steps):
        oracle.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        if oracle_grad_dtype is not None:
            for q in model.parameters():
                if q.grad is not None:
                    q.grad = q.grad.to(oracle_grad_dtype).double()
        for _, params, grad_dtype in runs:
            for p, q in zip(params, model.parameters(), strict=True):
                p.grad = None if q.grad is None else q.grad.to(p.device, grad_dtype)
        oracle.step()
        for opt, _, _ in runs:
            opt.step()
    return model, oracle


def assert_arguments_are_torchs(ours: type, theirs: type) -> None:
    """Every constructor argument of torch's ``theirs`` is one of ``ours``, of the same kind
    and with the same default (a drop-in takes torch's calls unchanged)."""
    our_arguments = inspect.signature(ours).parameters
    for name, param in inspect.signature(theirs).parameters.items():
        assert name in our_arguments, name
        assert our_arguments[name].default == param.default, name
        assert our_arguments[name].kind == param.kind, name


def assert_params_close(params, twin, rtol: float = 1e-6, atol: float = 1e-7) -> None:
    """The params of two runs agree (by default to the fp32 rounding that differently
    ordered sums give)."""
    for p, q in zip(params, twin, strict=True):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol)


def assert_close(got: torch.Tensor, want: torch.Tensor, tol: Tolerance, what: str) -> None:
    torch.testing.assert_close(
        got.double().cpu(),
        want.double().cpu(),
        rtol=tol.rtol,
        atol=tol.atol,
        msg=lambda m: f"{what}: {m} ({tol.why})",
    )


def run_master_modes(case, backend: str, modes: list, steps: int = 4, dtype=torch.bfloat16,
                     before_step=None):  # fmt: skip
    """16-bit params of the shared model, stepped ``steps`` times with random grads (step 2
    skipped through the GradScaler protocol's ``found_inf``), ``master_weights`` set to
    ``modes[k]`` before step k (switching mid-run), after ``before_step(opt, k)`` where given.
    Returns the params and optimizer (the compact and Kahan master tests)."""
    params = clone_params(make_model(), dtype)
    opt = case.cls(params, **{**case.kwargs, "master_weights": modes[0], "backend": backend})
    for k in range(steps):
        if before_step is not None:
            before_step(opt, k)
        for group in opt.param_groups:
            group["master_weights"] = modes[k]
        random_grads(params, seed=10 + k)
        if k == 2:
            opt.found_inf = torch.ones(())
        opt.step()
        opt.__dict__.pop("found_inf", None)
    return params, opt
