"""LAMB and Lion against independent plain-torch float64 steps written from timm's and
lion-pytorch's semantics (DESIGN.md §3), and their constructors against those libraries'.

torch has neither algorithm, and the 50-step equivalence tests compare each class with
itself on the reference backend, which shares the class's hyperparameter plumbing. These
steps share nothing with fusedopt, so a mix-up in that plumbing (betas order, eps, flags,
the global clip) shows here.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from optim_cases import (
    TOLERANCES,
    assert_close,
    batches,
    clone_params,
    make_model,
    usable_backends,
)

import fusedopt


def timm_lamb_step(params, states, lr, betas, eps, wd, grad_averaging, max_grad_norm,
                   trust_clip, always_adapt, bias_correction):  # fmt: skip
    """One timm-style LAMB step over (param, grad) in float64: one group, whose one step count
    (``states["step"]``) advances once per step and serves every param, as timm's
    ``group['step']`` ([note: LAMB group step] in fusedopt/optim/lamb.py)."""
    states["step"] = states.get("step", 0) + 1
    t = states["step"]
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.sqrt(sum((g * g).sum() for g in grads))
    clip = max(1.0, float(norm) / max_grad_norm) if max_grad_norm is not None else 1.0
    b1, b2 = betas
    for p in params:
        if p.grad is None:
            continue
        g = p.grad / clip
        s = states.setdefault(p, {"m": torch.zeros_like(p), "v": torch.zeros_like(p)})
        s["m"] = b1 * s["m"] + ((1 - b1) if grad_averaging else 1.0) * g
        s["v"] = b2 * s["v"] + (1 - b2) * g * g
        bc1 = 1 - b1**t if bias_correction else 1.0
        bc2 = 1 - b2**t if bias_correction else 1.0
        update = (s["m"] / bc1) / (s["v"].sqrt() / math.sqrt(bc2) + eps)
        if wd != 0:
            update = update + wd * p.detach()
        if wd != 0 or always_adapt:
            w_norm, u_norm = float(p.detach().norm()), float(update.norm())
            ratio = w_norm / u_norm if w_norm > 0 and u_norm > 0 else 1.0
            update = update * (min(ratio, 1.0) if trust_clip else ratio)
        with torch.no_grad():
            p -= lr * update


def lion_step(params, states, lr, betas, wd):
    """One lion-pytorch step in float64."""
    b1, b2 = betas
    for p in params:
        if p.grad is None:
            continue
        m = states.setdefault(p, torch.zeros_like(p))
        with torch.no_grad():
            p.mul_(1 - lr * wd)
            p.add_(torch.sign(b1 * m + (1 - b1) * p.grad), alpha=-lr)
        states[p] = b2 * m + (1 - b2) * p.grad


LAMB_CONFIGS = [
    dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-6, wd=0.01, grad_averaging=True,
         max_grad_norm=1.0, trust_clip=False, always_adapt=False, bias_correction=True),
    dict(lr=5e-3, betas=(0.8, 0.99), eps=1e-4, wd=0.0, grad_averaging=False,
         max_grad_norm=None, trust_clip=True, always_adapt=True, bias_correction=False),
    dict(lr=1e-2, betas=(0.85, 0.995), eps=1e-6, wd=0.1, grad_averaging=True,
         max_grad_norm=0.05, trust_clip=True, always_adapt=False, bias_correction=True),
]  # fmt: skip


def _run(make_opt, hand_step, steps=50, without_grad=()):
    """[note: driven trajectories] The hand-written step trains the fp64 driver; the class
    under test follows it in fp32 with the driver's grads. ``without_grad``: (step, param
    index) pairs where both see no grad for that param."""
    model = make_model()
    params = clone_params(model, torch.float32)
    opt = make_opt(params)
    states: dict = {}
    for step, (x, y) in enumerate(batches(steps)):
        model.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        for i, q in enumerate(model.parameters()):
            if (step, i) in without_grad:
                q.grad = None
        for p, q in zip(params, model.parameters(), strict=True):
            p.grad = None if q.grad is None else q.grad.float()
        hand_step(list(model.parameters()), states)
        opt.step()
    return params, list(model.parameters())


@pytest.mark.parametrize("config", LAMB_CONFIGS, ids=["timm-defaults", "adapt-no-bc", "clip"])
def test_lamb_follows_timm_semantics(config):
    c = config
    params, want = _run(
        lambda ps: fusedopt.LAMB(
            ps,
            lr=c["lr"],
            bias_correction=c["bias_correction"],
            betas=c["betas"],
            eps=c["eps"],
            weight_decay=c["wd"],
            grad_averaging=c["grad_averaging"],
            max_grad_norm=c["max_grad_norm"],
            trust_clip=c["trust_clip"],
            always_adapt=c["always_adapt"],
        ),
        lambda ps, states: timm_lamb_step(ps, states, **c),
    )
    for i, (p, q) in enumerate(zip(params, want, strict=True)):
        assert_close(p, q, TOLERANCES[torch.float32], f"LAMB param {i}")


@pytest.mark.parametrize("backend", usable_backends())
def test_lamb_counts_steps_per_group_as_timm(backend):
    """timm's one count per group, advanced every step, also for a param without a grad at
    some steps (issue #13, item 5): with per-param counts, param 0 would take its bias
    corrections from 8 instead of 10 at the last step and drift from timm."""
    # No weight decay and no adaptation: the trust ratio would scale a bias correction away.
    c = {**LAMB_CONFIGS[0], "wd": 0.0, "max_grad_norm": None}
    without_grad = {(1, 0), (2, 0), (4, 2)}
    params, want = _run(
        lambda ps: fusedopt.LAMB(
            ps, lr=c["lr"], weight_decay=0.0, max_grad_norm=None, backend=backend
        ),
        lambda ps, states: timm_lamb_step(ps, states, **c),
        steps=10,
        without_grad=without_grad,
    )
    for i, (p, q) in enumerate(zip(params, want, strict=True)):
        assert_close(p, q, TOLERANCES[torch.float32], f"LAMB param {i}")


@pytest.mark.parametrize("betas,wd", [((0.9, 0.99), 0.0), ((0.95, 0.98), 0.5)])
def test_lion_follows_lion_pytorch_semantics(betas, wd):
    params, want = _run(
        lambda ps: fusedopt.Lion(ps, lr=1e-3, betas=betas, weight_decay=wd),
        lambda ps, states: lion_step(ps, states, 1e-3, betas, wd),
    )
    for i, (p, q) in enumerate(zip(params, want, strict=True)):
        assert_close(p, q, TOLERANCES[torch.float32], f"Lion param {i}")


def _signature(cls):
    return [
        (name, param.default)
        for name, param in inspect.signature(cls.__init__).parameters.items()
        if name != "self" and param.kind is param.POSITIONAL_OR_KEYWORD
    ]


def test_constructors_match_timm_and_lion_pytorch():
    """Positional names, order and defaults as timm's Lamb (1.0.31) and lion-pytorch's Lion
    (neither is a dependency, so their signatures are written out here)."""
    empty = inspect.Parameter.empty
    assert _signature(fusedopt.LAMB) == [
        ("params", empty), ("lr", 1e-3), ("bias_correction", True), ("betas", (0.9, 0.999)),
        ("eps", 1e-6), ("weight_decay", 0.01), ("grad_averaging", True),
        ("max_grad_norm", 1.0), ("trust_clip", False), ("always_adapt", False),
        ("caution", False), ("decoupled_decay", False), ("corrected_weight_decay", False),
        ("foreach", None),
    ]  # fmt: skip
    assert _signature(fusedopt.Lion) == [
        ("params", empty), ("lr", 1e-4), ("betas", (0.9, 0.99)), ("weight_decay", 0.0),
        ("use_triton", False), ("decoupled_weight_decay", False),
    ]  # fmt: skip


@pytest.mark.parametrize("option", ["caution", "decoupled_decay", "corrected_weight_decay"])
def test_lamb_refuses_timms_unimplemented_options_also_from_a_loaded_group(option):
    params = clone_params(make_model(), torch.float32)
    with pytest.raises(ValueError, match=f"timm's {option}=True is not supported"):
        fusedopt.LAMB(params, **{option: True})
    opt = fusedopt.LAMB(params, foreach=True)  # timm's foreach: accepted, always fused
    saved = opt.state_dict()
    saved["param_groups"][0][option] = True
    with pytest.raises(ValueError, match=f"timm's {option}=True is not supported"):
        opt.load_state_dict(saved)
    assert not opt.param_groups[0].get(option)
