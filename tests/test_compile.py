"""torch.compile: a compiled model trains with fusedopt, and a compiled ``opt.step()`` (Inductor,
``fullgraph=True``) has no graph break and equals the eager step.

The ops are torch.library custom ops with fake implementations, so Dynamo puts them in the
graph as opaque calls; the Python around them (grouping, clip coefficient, scaler attributes)
traces, and the backend choice is a compile-time constant (``fusedopt.ops._resolve``).
Float hyperparameters are baked into the graph: a scheduler that changes a float lr
recompiles, as with torch's own compiled optimizers; pass a tensor lr to avoid it.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
from optim_cases import random_grads

import fusedopt

CLASSES = [
    (fusedopt.AdamW, {"max_grad_norm": 1.0}),
    (fusedopt.Adam, {"amsgrad": True}),
    (fusedopt.SGD, {"momentum": 0.9}),
    (fusedopt.Lion, {}),
    (fusedopt.LAMB, {}),
    (fusedopt.Muon, {"max_grad_norm": 1.0}),  # matrices: two passes and bmm; biases: adamw_
    # Its host-made group scalars (k, lr_max, weight_sum) change at every step: Dynamo
    # recompiles once, then traces them as dynamic (2 graphs over 5 steps, torch 2.14.1).
    (fusedopt.ScheduleFreeAdamW, {"warmup_steps": 2, "weight_decay": 0.01}),
    (fusedopt.Adafactor, {"weight_decay": 0.1, "max_grad_norm": 1.0}),
]
IDS = [cls.__name__ for cls, _ in CLASSES]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from an empty Dynamo cache: every class's ``step`` is torch's one
    ``Optimizer`` step wrapper (one code object), so the compilations of all the classes
    would count against one recompile limit (8), which six classes exceed."""
    torch._dynamo.reset()
    yield


def _pair(cls, kwargs):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))
    twin = copy.deepcopy(model)
    return (
        model,
        cls(model.parameters(), lr=1e-2, **kwargs),
        twin,
        cls(twin.parameters(), lr=1e-2, **kwargs),
    )


@pytest.mark.parametrize("cls,kwargs", CLASSES, ids=IDS)
def test_step_compiles_without_graph_break(cls, kwargs):
    model, opt, _, _ = _pair(cls, kwargs)
    random_grads(model.parameters(), 0)
    opt.step()  # state exists before compiling, as for torch's compiled optimizers
    random_grads(model.parameters(), 1)
    opt.grad_scale = torch.tensor(2.0)  # the GradScaler protocol's path traces too
    explanation = torch._dynamo.explain(opt.step)()
    del opt.grad_scale
    assert explanation.graph_break_count == 0, explanation.break_reasons
    ops_in_graph = [
        str(node.target)
        for graph in explanation.graphs
        for node in graph.graph.nodes
        if "fusedopt" in str(node.target)
    ]
    assert any(op.endswith("_") for op in ops_in_graph), ops_in_graph  # the step op is in


@pytest.mark.parametrize("cls,kwargs", CLASSES, ids=IDS)
def test_inductor_compiled_step_equals_eager(cls, kwargs):
    model, opt, twin, ref = _pair(cls, kwargs)
    random_grads(model.parameters(), 0)
    random_grads(twin.parameters(), 0)
    opt.step()
    ref.step()
    compiled = torch.compile(opt.step, fullgraph=True, backend="inductor")
    for seed in range(1, 4):
        random_grads(model.parameters(), seed)
        random_grads(twin.parameters(), seed)
        compiled()
        ref.step()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        for key, value in ref.state[q].items():
            assert torch.equal(opt.state[p][key], value), key


def test_compiled_model_trains_with_fusedopt():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    twin = copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager")
    opt = fusedopt.AdamW(model.parameters(), lr=1e-2)
    ref = fusedopt.AdamW(twin.parameters(), lr=1e-2)
    x, y = torch.randn(32, 6), torch.randn(32, 1)
    losses = []
    for _ in range(20):
        for net, o in ((compiled, opt), (twin, ref)):
            o.zero_grad()
            loss = torch.nn.functional.mse_loss(net(x), y)
            loss.backward()
            o.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]  # it learns
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls,kwargs", CLASSES, ids=IDS)
def test_step_assigns_no_optimizer_attribute(cls, kwargs):
    """[note: no setattr in step] (fusedopt/optim/_base.py): torch 2.11's Dynamo fails on any
    attribute assignment to the optimizer inside a compiled step, so a step (here with the
    norm pass on: clipping or LAMB's, plus fusedopt's scaler asking for found_inf) leaves
    every attribute as it was, the same object; it may only fill the ``_step_out`` dict.
    This catches a new ``self.x = ...`` on torch versions whose Dynamo would accept it."""
    model, opt, _, _ = _pair(cls, kwargs)
    random_grads(model.parameters(), 0)
    opt.step()
    opt._fusedopt_detect_inf = True
    before = dict(vars(opt))
    random_grads(model.parameters(), 1)
    opt.step()
    after = dict(vars(opt))
    assert after.keys() == before.keys()
    assert [k for k in before if after[k] is not before[k]] == []
    assert "found_inf" in opt._step_out
