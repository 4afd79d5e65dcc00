"""Distributed: DDP, FSDP2 (DTensor params and states), global-norm clipping and LAMB over
sharded grads, ZeroRedundancyOptimizer, distributed checkpointing. Two CPU processes over gloo.

The two processes are spawned once for the module (start-up dominates the cost); each
scenario runs in both, compares against an unsharded single-process run of the same
optimizer computed inside the worker, and records "ok" or its traceback; each test below
then asserts on one scenario's record.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fusedopt

WORLD = 2
STEPS = 4
SCENARIOS = [
    "ddp",
    "fsdp2_adamw",
    "fsdp2_lamb",
    "fsdp2_clip_grad_norm",
    "fsdp2_scaler_skips_together",
    "zero",
    "dcp",
]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    # Odd sizes: FSDP2 shards unevenly (rank 1 holds fewer rows; the 3-element bias of the
    # last layer leaves rank 1 a 1-row shard).
    return torch.nn.Sequential(torch.nn.Linear(6, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen)


def _local_half(x: torch.Tensor, rank: int) -> torch.Tensor:
    return x.chunk(WORLD)[rank]


def _extra_param() -> torch.nn.Parameter:
    """A plain (unsharded) param beside FSDP2's DTensors in the same optimizer."""
    return torch.nn.Parameter(torch.linspace(-1.0, 1.0, 5))


def _extra_grad(extra, step):
    if extra is not None:
        extra.grad = torch.cos(torch.arange(5.0) + step)  # the same on every rank


def _reference(cls, kwargs, steps=STEPS, extra=False):
    """The unsharded run: one process, the whole batch (the mean loss DDP/FSDP reproduce)."""
    model = _model()
    extra = _extra_param() if extra else None
    opt = cls([*model.parameters(), *([extra] if extra is not None else [])], **kwargs)
    norms = []
    for step in range(steps):
        x, y = _batch(step)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        _extra_grad(extra, step)
        opt.step()
        norms.append(opt.last_grad_norm)
    return model, norms, extra


def _close(got, want, what):
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-6, msg=lambda m: f"{what}: {m}")


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _train(model, opt, rank, steps=STEPS, start=0, extra=None):
    norms = []
    for step in range(start, start + steps):
        x, y = _batch(step)
        opt.zero_grad()
        out = model(_local_half(x, rank))
        torch.nn.functional.mse_loss(out, _local_half(y, rank)).backward()
        _extra_grad(extra, step)
        opt.step()
        norms.append(getattr(opt, "last_grad_norm", None))
    return norms


def _fsdp2(model):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def scenario_ddp(rank):
    kwargs = dict(lr=1e-2, max_grad_norm=0.5)
    want, want_norms, _ = _reference(fusedopt.AdamW, kwargs)
    model = torch.nn.parallel.DistributedDataParallel(_model())
    norms = _train(model, fusedopt.AdamW(model.parameters(), **kwargs), rank)
    for p, q in zip(model.module.parameters(), want.parameters(), strict=True):
        _close(p, q, "ddp param")
    for got, exp in zip(norms, want_norms, strict=True):
        _close(got, exp, "ddp norm")


def _fsdp2_matches(cls, kwargs, rank, extra=False):
    want, want_norms, want_extra = _reference(cls, kwargs, extra=extra)
    model = _fsdp2(_model())
    extra_param = _extra_param() if extra else None
    opt = cls([*model.parameters(), *([extra_param] if extra else [])], **kwargs)
    norms = _train(model, opt, rank, extra=extra_param)
    from torch.distributed.tensor import DTensor

    for p, q in zip(model.parameters(), want.parameters(), strict=True):
        assert isinstance(p, DTensor)
        _close(p.full_tensor(), q, f"{cls.__name__} param")
        for key, value in opt.state[p].items():
            if key != "step":  # states are DTensors with the param's placements (for DCP)
                assert isinstance(value, DTensor) and value.placements == p.placements, key
    if extra:
        _close(extra_param, want_extra, f"{cls.__name__} plain param")
    for got, exp in zip(norms, want_norms, strict=True):
        _close(got, exp, f"{cls.__name__} global norm")  # all-reduced = the unsharded norm


def scenario_fsdp2_adamw(rank):
    _fsdp2_matches(fusedopt.AdamW, dict(lr=1e-2, max_grad_norm=0.5), rank)


def scenario_fsdp2_lamb(rank):
    # weight_decay != 0: the trust ratio (per-tensor norms over whole tensors) is in play, and
    # max_grad_norm=1.0 (timm's default) clips on the global norm. A plain param rides along
    # in the same optimizer (it takes the fused op, the shards the all-reduced path).
    _fsdp2_matches(fusedopt.LAMB, dict(lr=1e-2, weight_decay=0.1), rank, extra=True)


def scenario_fsdp2_clip_grad_norm(rank):
    want = _model()
    x, y = _batch(0)
    torch.nn.functional.mse_loss(want(x), y).backward()
    want_norm = torch.nn.utils.clip_grad_norm_(want.parameters(), 0.1)
    model = _fsdp2(_model())
    torch.nn.functional.mse_loss(model(_local_half(x, rank)), _local_half(y, rank)).backward()
    norm = fusedopt.clip_grad_norm_(model.parameters(), 0.1)
    _close(norm, want_norm, "norm")
    for p, q in zip(model.parameters(), want.parameters(), strict=True):
        _close(p.grad.full_tensor(), q.grad, "clipped grad")


def scenario_fsdp2_scaler_skips_together(rank):
    """An inf in rank 0's shard only: the all-reduced found_inf makes both ranks skip (no
    param moves anywhere) and both scalers back off alike."""
    model = _fsdp2(_model())
    opt = fusedopt.AdamW(model.parameters(), lr=1e-2, max_grad_norm=0.5)
    scaler = fusedopt.GradScaler("cpu", init_scale=2.0**8)
    for step in range(2):
        x, y = _batch(step)
        opt.zero_grad()
        out = model(_local_half(x, rank))
        scaler.scale(torch.nn.functional.mse_loss(out, _local_half(y, rank))).backward()
        before = [p.full_tensor().clone() for p in model.parameters()]
        if rank == 0 and step == 0:
            with torch.no_grad():
                next(iter(model.parameters())).grad.to_local().view(-1)[0] = float("inf")
        scaler.step(opt)
        scaler.update()
        moved = [
            not torch.equal(p.full_tensor(), b)
            for p, b in zip(model.parameters(), before, strict=True)
        ]
        if step == 0:
            assert scaler.get_scale() == 2.0**7 and not any(moved)
        else:
            assert scaler.get_scale() == 2.0**7 and all(moved)


def scenario_zero(rank):
    from torch.distributed.optim import ZeroRedundancyOptimizer

    kwargs = dict(lr=1e-2, max_grad_norm=0.5)
    want, _, _ = _reference(fusedopt.AdamW, kwargs)
    model = torch.nn.parallel.DistributedDataParallel(_model())
    opt = ZeroRedundancyOptimizer(
        model.parameters(),
        optimizer_class=fusedopt.AdamW,
        grad_norm_group=dist.group.WORLD,  # the partition's clip norm sums over ranks
        **kwargs,
    )
    local = opt.optim.param_groups[0]["params"]
    assert 0 < len(local) < len(list(model.parameters()))  # really partitioned
    _train(model, opt, rank)
    for p, q in zip(model.module.parameters(), want.parameters(), strict=True):
        _close(p, q, "zero param")


def scenario_dcp(rank, tmpdir):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    kwargs = dict(lr=1e-2, max_grad_norm=0.5)
    model = _fsdp2(_model())
    opt = fusedopt.AdamW(model.parameters(), **kwargs)
    _train(model, opt, rank, steps=2)
    dcp.save(
        {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
        checkpoint_id=tmpdir,
    )
    fresh = _fsdp2(_model())
    fresh_opt = fusedopt.AdamW(fresh.parameters(), **kwargs)
    state = {
        "model": get_model_state_dict(fresh),
        "optim": get_optimizer_state_dict(fresh, fresh_opt),
    }
    dcp.load(state, checkpoint_id=tmpdir)
    set_model_state_dict(fresh, state["model"])
    set_optimizer_state_dict(fresh, fresh_opt, state["optim"])
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        for key, value in opt.state[p].items():
            assert torch.equal(_full(fresh_opt.state[q][key]), _full(value)), key
    _train(model, opt, rank, steps=2, start=2)
    _train(fresh, fresh_opt, rank, steps=2, start=2)
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p.full_tensor(), q.full_tensor())


def _worker(rank: int, port: int, outdir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # A collective that one rank never joins fails after the timeout instead of hanging.
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    torch.set_num_threads(1)
    results = {}
    for name in SCENARIOS:
        try:
            fn = globals()[f"scenario_{name}"]
            if name == "dcp":
                fn(rank, os.path.join(outdir, "checkpoint"))
            else:
                fn(rank)
            results[name] = "ok"
        except Exception:
            results[name] = traceback.format_exc()
        dist.barrier()
    with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    outdir = str(tmp_path_factory.mktemp("dist"))
    # The spawned workers import this module by name: make it importable from tests/.
    sys.path.insert(0, os.path.dirname(__file__))
    mp.spawn(_worker, args=(_free_port(), outdir), nprocs=WORLD, join=True)
    return [json.load(open(os.path.join(outdir, f"rank{r}.json"))) for r in range(WORLD)]


@pytest.mark.parametrize("name", SCENARIOS)
def test_distributed(results, name):
    for rank, record in enumerate(results):
        assert record[name] == "ok", f"rank {rank}:\n{record[name]}"
