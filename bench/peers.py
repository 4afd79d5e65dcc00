"""The peers fusedopt is measured against (DESIGN.md §6), each as a step factory.

* torch.optim for-loop (``foreach=False``), ``foreach=True``, ``fused=True``, and a
  ``torch.compile``d step (the foreach step traced by Dynamo, code from Inductor);
* timm's ``Lamb``, lion-pytorch's ``Lion`` and schedulefree's ``AdamWScheduleFree`` for the
  algorithms torch lacks (optional: they are not dependencies of fusedopt; when missing, the
  row says so);
* for Muon, ``torch.optim.Muon`` on the 2-D params beside ``torch.optim.AdamW`` (for-loop,
  foreach, fused) on the others, what fusedopt.Muon does in one optimizer, and heavyball's
  ``MuonAdamW`` (optional; the same split, its own Newton-Schulz coefficients, scaling and
  state: a speed row, not an equivalence), eager and compiled;
* for the ``amp`` mode, torch's composition that computes what one fusedopt step computes:
  upcast the bf16 grads into fp32 master grads, ``GradScaler.unscale_`` (inf check + unscale),
  ``clip_grad_norm_``, ``GradScaler.step`` (skips on overflow) + ``update``, then round the
  fp32 masters back into the bf16 params.

Each factory takes a :class:`~bench.cases.Workload` and returns a zero-argument step with its
own fresh optimizer state, or raises :class:`Unavailable` saying why it cannot run here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch

from bench.cases import LOSS_SCALE, MAX_GRAD_NORM, Workload
from bench.timing import Step
from tests.optim_cases import CASES

#: The torch twin of each optimizer is the one the equivalence tests prove fusedopt equal to
#: (``tests/optim_cases.py``), so what is measured and what is verified cannot drift apart.
_TORCH_TWINS = {
    "adamw": "adamw",
    "adam": "adam_l2",
    "sgd": "sgd_momentum",
    "adafactor": "adafactor_wd_maximize",
}
#: torch classes without a ``fused`` implementation (no such argument: no such row).
_NO_FUSED = ("adafactor",)

#: torch.optim's implementation switches, by peer label.
TORCH_VARIANTS = {
    "for-loop": dict(foreach=False),
    "foreach": dict(foreach=True),
    "fused": dict(fused=True),
    "compiled": dict(foreach=True),  # the foreach step, then torch.compile
}


class Unavailable(RuntimeError):
    """This implementation cannot run here; the message says why (shown in the report)."""


def _torch_class(optimizer: str) -> type[torch.optim.Optimizer] | None:
    """torch's class for ``optimizer``, from the tests' registry; None where torch has none."""
    if optimizer not in _TORCH_TWINS:
        return None
    return next(c.torch_cls for c in CASES if c.name == _TORCH_TWINS[optimizer])


#: The third-party peer of each optimizer torch lacks: (module, class, row label, pip name).
_THIRD_PARTY = {
    "lamb": ("timm.optim", "Lamb", "timm Lamb", "timm"),
    "lion": ("lion_pytorch", "Lion", "lion-pytorch Lion", "lion-pytorch"),
    "schedulefree_adamw": (
        "schedulefree",
        "AdamWScheduleFree",
        "schedulefree AdamWScheduleFree",
        "schedulefree",
    ),
}


def _third_party(optimizer: str) -> tuple[str, Callable[..., torch.optim.Optimizer]]:
    """(label, constructor) of the optional peer for LAMB / Lion / Schedule-Free AdamW;
    Unavailable if missing."""
    module, attr, label, pip = _THIRD_PARTY[optimizer]
    try:
        cls = getattr(importlib.import_module(module), attr)
    except ImportError as error:
        raise Unavailable(f"peer not installed (pip install {pip}): {error}") from None
    return label, cls


#: Muon's peer rows: torch.optim.Muon for the matrices, AdamW in this variant for the rest.
MUON_VARIANTS = {"torch Muon + AdamW for-loop": dict(foreach=False),
                 "torch Muon + AdamW foreach": dict(foreach=True),
                 "torch Muon + AdamW fused": dict(fused=True)}  # fmt: skip


class _MuonWithAdamW:
    """torch.optim.Muon on the 2-D params and torch.optim.AdamW on the others, as one
    step (torch.optim.Muon refuses other params)."""

    def __init__(self, params, hypers: dict, adamw_variant: dict) -> None:
        matrices = [p for p in params if p.ndim == 2]
        others = [p for p in params if p.ndim != 2]
        self.optimizers = [torch.optim.Muon(matrices, **hypers)]
        if others:
            lr, wd = hypers["lr"], hypers["weight_decay"]
            self.optimizers.append(
                torch.optim.AdamW(others, lr=lr, weight_decay=wd, **adamw_variant)
            )

    @property
    def param_groups(self) -> list[dict]:
        """Both optimizers' groups (what ``GradScaler.unscale_`` walks)."""
        return [g for opt in self.optimizers for g in opt.param_groups]

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()


#: heavyball's Muon rows: ``heavyball.MuonAdamW`` (its Muon on the params of two or more dims,
#: its AdamW on the others: the split fusedopt.Muon and the torch rows make), in one of
#: heavyball's two modes, the value of ``heavyball.utils.compile_mode`` while it steps:
#: ``None`` runs its building blocks as plain torch ops (eager); its default
#: (``"max-autotune-no-cudagraphs"``, read at import) torch.compile's each one on first use,
#: which costs about a minute per shape group on the 2-core CPU VM (with dynamic=False a new
#: shape recompiles), so that row is a compiled peer (``--compile-peers``).
HEAVYBALL_MUON = {"heavyball MuonAdamW eager": False, "heavyball MuonAdamW compiled": True}
#: Peer rows whose first steps compile: skipped unless ``--compile-peers`` asks for them.
COMPILED_PEERS = ("torch compiled", "heavyball MuonAdamW compiled")
#: heavyball.utils.compile_mode as imported (before any row changed it).
_HEAVYBALL_DEFAULT_MODE: dict[str, str | None] = {}


def _heavyball_muon(params, hypers: dict, compiled: bool) -> torch.optim.Optimizer:
    try:
        heavyball = importlib.import_module("heavyball")
        utils = importlib.import_module("heavyball.utils")
    except ImportError as error:
        raise Unavailable(
            f"peer not installed (pip install --no-deps heavyball): {error}"
        ) from None
    default_mode = _HEAVYBALL_DEFAULT_MODE.setdefault("mode", utils.compile_mode)
    mode = default_mode if compiled else None
    # consume_grad=False: heavyball's optimizers consume the grads by default (its
    # StatefulOptimizer sets p.grad = None as it reads them, heavyball 3.2.1 utils.py), and a
    # step without grads returns at once. This harness sets the grads once and steps several
    # times, so with the default only the first (warm-up) step ran: the timed steps measured
    # 0.06 ms for GPT-2 small, and GradScaler.unscale_ found no grads to check ("No inf checks
    # were recorded"). Kept, each step is real: measured on 768x768, 768x3072, 64x32 and 768
    # params (lr 1e-3), every step moves a matrix by lr / sqrt(rows) RMS (x sqrt(rows / cols)
    # when rows > cols), an orthogonalized update's, as step 1 does. (run_case also checks
    # that every timed step moved the params: [note: every row steps] in bench/report.py.)
    opt = heavyball.MuonAdamW(
        params, lr=hypers["lr"], weight_decay=hypers["weight_decay"],
        betas=(hypers["momentum"], 0.999), compile_step=False, consume_grad=False,
    )  # fmt: skip
    step = opt.step

    def step_in_mode(*args, **kwargs):
        """heavyball reads its compile mode at each call: set this row's around the step."""
        saved, utils.compile_mode = utils.compile_mode, mode
        try:
            return step(*args, **kwargs)
        finally:
            utils.compile_mode = saved

    opt.step = step_in_mode  # what GradScaler.step calls too
    return opt


def peer_labels(optimizer: str) -> list[str]:
    """The peer rows of ``optimizer`` (fp32 mode; amp rows prefix them with ``amp``)."""
    if optimizer == "muon":
        return [*MUON_VARIANTS, *HEAVYBALL_MUON]
    if _torch_class(optimizer) is not None:
        variants = [v for v in TORCH_VARIANTS if not (v == "fused" and optimizer in _NO_FUSED)]
        return [f"torch {variant}" for variant in variants]
    return [_THIRD_PARTY[optimizer][2]]


def _make_optimizer(
    optimizer: str, label: str, params: list[torch.nn.Parameter], hypers: dict
) -> torch.optim.Optimizer:
    if label in HEAVYBALL_MUON:
        return _heavyball_muon(params, hypers, compiled=HEAVYBALL_MUON[label])
    if optimizer == "muon":
        try:
            return _MuonWithAdamW(params, hypers, MUON_VARIANTS[label])
        except (RuntimeError, ValueError) as error:
            raise Unavailable(f"torch refused {label}: {error}") from None
    cls = _torch_class(optimizer)
    if optimizer == "adafactor":  # torch's Adafactor divides by numel: an empty param fails
        params = [p for p in params if p.numel() > 0]
    if cls is not None:
        variant = label.removeprefix("torch ")
        kwargs = {k: v for k, v in hypers.items() if k != "max_grad_norm"}
        try:
            return cls(params, **kwargs, **TORCH_VARIANTS[variant])
        except (RuntimeError, ValueError) as error:  # e.g. fused not supported on a device
            raise Unavailable(f"torch refused {variant}: {error}") from None
    _, ctor = _third_party(optimizer)
    opt = ctor(params, **hypers)
    if hasattr(opt, "train"):  # AdamWScheduleFree starts in eval mode and refuses to step
        opt.train()
    return opt


def _compiled(step: Callable[[], object]) -> Step:
    """torch's compiled-optimizer recipe: a compiled function that calls ``opt.step()``."""

    @torch.compile(fullgraph=False)
    def compiled_step() -> None:
        step()

    return compiled_step


def make_peer(workload: Workload, label: str) -> Step:
    """A step of peer ``label`` (from :func:`peer_labels`) on ``workload``, fresh state."""
    if workload.optimizer in _THIRD_PARTY:
        _third_party(workload.optimizer)  # raise Unavailable early when not installed
    if workload.amp:
        return _amp_composition(workload, label)
    params = workload.params
    # timm's Lamb divides p.grad in place by its clip factor: give it grads of its own so the
    # shared grads stay the same for every implementation.
    # AdamWScheduleFree divides p.grad in place too.
    own_grads = workload.optimizer in ("lamb", "schedulefree_adamw")
    for p, g in zip(params, workload.grads, strict=True):
        p.grad = g.clone() if own_grads else g
    opt = _make_optimizer(workload.optimizer, label, params, workload.hypers)
    return _compiled(opt.step) if label == "torch compiled" else opt.step


def _amp_composition(workload: Workload, label: str) -> Step:
    """torch's unscale + clip + step composition over fp32 masters (module docstring)."""
    device = workload.device
    model_params = [p.detach() for p in workload.params]
    model_grads = workload.grads
    masters = [torch.nn.Parameter(m) for m in workload.masters()]
    for m in masters:
        m.grad = torch.empty_like(m)
    master_grads = [m.grad for m in masters]
    opt = _make_optimizer(workload.optimizer, label, masters, workload.hypers)
    if label == "torch compiled":  # GradScaler.step calls opt.step(): make it the compiled one
        opt.step = _compiled(opt.step)
    scaler = torch.amp.GradScaler(device.type, init_scale=LOSS_SCALE)
    scaler.scale(torch.ones((), device=device))  # creates the scale tensor on the device
    clip = workload.optimizer != "lamb"  # timm's Lamb clips inside its step (max_grad_norm)

    def step() -> None:
        with torch.no_grad():
            torch._foreach_copy_(master_grads, model_grads)
            scaler.unscale_(opt)
            if clip:
                torch.nn.utils.clip_grad_norm_(masters, MAX_GRAD_NORM, foreach=True)
            scaler.step(opt)
            scaler.update()
            torch._foreach_copy_(model_params, masters)

    # What bench/report.py checks after timing ([note: every row steps]): the fp32 masters
    # move at every step, and the scaler skipped none.
    step.watched, step.scaler = lambda: masters, scaler
    return step
