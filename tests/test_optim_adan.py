"""``fusedopt.Adan`` against the official Adan (sail-sg/Adan): the constructor's names and
defaults, its checks, and whole trajectories (global clip, two groups, both weight decay
forms) against a plain transcription of the official ``step``, in float64."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from optim_cases import usable_backends
from test_reference_oracle import _official_adan_step

import fusedopt

#: The official ``Adan.__init__`` (sail-sg/Adan, adan.py), as its signature reads.
OFFICIAL_DEFAULTS = {
    "lr": 1e-3,
    "betas": (0.98, 0.92, 0.99),
    "eps": 1e-8,
    "weight_decay": 0.0,
    "max_grad_norm": 0.0,
    "no_prox": False,
    "foreach": True,
    "fused": False,
}


def test_constructor_names_and_defaults_are_the_official_ones():
    params = list(inspect.signature(fusedopt.Adan).parameters.values())
    positional = [p.name for p in params if p.kind == p.POSITIONAL_OR_KEYWORD]
    assert positional == ["params", *OFFICIAL_DEFAULTS]
    for name, default in OFFICIAL_DEFAULTS.items():
        assert inspect.signature(fusedopt.Adan).parameters[name].default == default, name


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(lr=-1.0), "Invalid learning rate"),
        (dict(eps=-1.0), "Invalid epsilon value"),
        (dict(betas=(0.9, 1.0, 0.9)), "Invalid beta parameter at index 1"),
        (dict(betas=(0.9, 0.9)), "betas must be three floats"),
        (dict(max_grad_norm=-1.0), "Invalid Max grad norm"),
    ],
)
def test_bad_arguments_raise_before_anything_is_touched(kwargs, message):
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match=message):
        fusedopt.Adan([p], **kwargs)


def _official_step(params, states, group_step, groups, max_grad_norm):
    """The official ``Adan.step``: the global clip coefficient
    ``min(1, max_grad_norm / (norm + eps))`` (eps of the last group) when max_grad_norm > 0,
    then the per-group count and the single-tensor step of every param with a grad."""
    clip = 1.0
    if max_grad_norm > 0:
        norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in params if p.grad is not None))
        clip = float(torch.clamp(max_grad_norm / (norm + groups[-1]["eps"]), max=1.0))
    for k, group in enumerate(groups):
        group_step[k] += 1
        for i in group["index"]:
            p = params[i]
            if p.grad is None:
                continue
            _official_adan_step(p.data, p.grad, states[i], t=group_step[k], lr=group["lr"],
                                betas=group["betas"], eps=group["eps"],
                                wd=group["weight_decay"], no_prox=group["no_prox"],
                                clip=clip)  # fmt: skip


@pytest.mark.parametrize("backend", usable_backends("cpu"))
@pytest.mark.parametrize("no_prox", [False, True], ids=["prox", "no_prox"])
@pytest.mark.parametrize("max_grad_norm", [0.0, 0.5], ids=["", "clip"])
def test_trajectory_equals_the_official_adan(backend, no_prox, max_grad_norm):
    """15 steps of random grads on fp64 params in two groups; the 0.5 clip is active (the
    grads' norm is ~5). The backends compute in fp64 for fp64 params, so they match the
    official step to float64 rounding."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(5, 3), (7,), (4,)]
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    ours = [torch.nn.Parameter(x.clone()) for x in init]
    theirs = [torch.nn.Parameter(x.clone()) for x in init]
    hp = [
        dict(lr=1e-2, betas=(0.98, 0.92, 0.99), eps=1e-8, weight_decay=0.02),
        dict(lr=3e-3, betas=(0.9, 0.8, 0.95), eps=1e-7, weight_decay=0.0),
    ]
    index = [[0, 1], [2]]
    opt = fusedopt.Adan(
        [{"params": [ours[i] for i in idx], **h} for idx, h in zip(index, hp, strict=True)],
        no_prox=no_prox, max_grad_norm=max_grad_norm, backend=backend,
    )  # fmt: skip
    groups = [{**h, "index": idx, "no_prox": no_prox} for idx, h in zip(index, hp, strict=True)]
    states = [{k: torch.zeros_like(x) for k in ("exp_avg", "exp_avg_sq", "exp_avg_diff")}
              for x in init]  # fmt: skip
    group_step = [0, 0]
    for _ in range(15):
        for a, b in zip(ours, theirs, strict=True):
            g = torch.randn(a.shape, generator=gen, dtype=torch.float64) * 2
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        _official_step(theirs, states, group_step, groups, max_grad_norm)
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        torch.testing.assert_close(a.data, b.data, rtol=1e-12, atol=1e-14)
        for key in ("exp_avg", "exp_avg_sq", "exp_avg_diff", "neg_pre_grad"):
            torch.testing.assert_close(opt.state[a][key], states[i][key], rtol=1e-12,
                                       atol=1e-14)  # fmt: skip
        assert float(opt.state[a]["step"]) == 15
    if max_grad_norm:
        assert math.isfinite(float(opt.last_grad_norm))


def test_an_official_state_dict_loads_and_continues():
    """The official dict (per-group ``step``, no per-param one, ``max_grad_norm=0.0``) loads:
    7 official steps, then 5 more on both sides agree to float64 rounding."""
    gen = torch.Generator().manual_seed(1)
    shapes = [(5, 3), (7,)]
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    theirs = [torch.nn.Parameter(x.clone()) for x in init]
    hp = dict(lr=1e-2, betas=(0.98, 0.92, 0.99), eps=1e-8, weight_decay=0.02)
    groups = [{**hp, "index": [0, 1], "no_prox": False}]
    states = [{k: torch.zeros_like(x) for k in ("exp_avg", "exp_avg_sq", "exp_avg_diff")}
              for x in init]  # fmt: skip
    group_step = [0]

    def grads():
        return [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]

    for _ in range(7):
        for p, g in zip(theirs, grads(), strict=True):
            p.grad = g
        _official_step(theirs, states, group_step, groups, 0.0)
    official_dict = {
        "state": {i: {k: v.clone() for k, v in st.items()} for i, st in enumerate(states)},
        "param_groups": [{**hp, "max_grad_norm": 0.0, "no_prox": False, "foreach": True,
                          "fused": False, "step": 7, "params": [0, 1]}],
    }  # fmt: skip
    ours = [torch.nn.Parameter(p.detach().clone()) for p in theirs]
    opt = fusedopt.Adan(ours, **hp)
    opt.load_state_dict(official_dict)
    assert "step" not in opt.param_groups[0] and opt.param_groups[0]["max_grad_norm"] is None
    for _ in range(5):
        for a, b, g in zip(ours, theirs, grads(), strict=True):
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        _official_step(theirs, states, group_step, groups, 0.0)
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        torch.testing.assert_close(a.data, b.data, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(opt.state[a]["exp_avg_diff"], states[i]["exp_avg_diff"],
                                   rtol=1e-12, atol=1e-14)  # fmt: skip
        assert float(opt.state[a]["step"]) == 12
