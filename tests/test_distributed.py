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
    "fsdp2_q8_equals_unsharded",
    "fsdp2_q8_sharded_1d_refused",
    "fsdp2_q8_checkpoint_reshards",
    "fsdp2_sr_and_masters_equal_unsharded",
    "fsdp2_sr_column_shard_refused",
]

#: Optimizers run sharded (FSDP2) and unsharded on the same grads, each ``(class, kwargs,
#: 8-bit states)``: the sharded run must equal the unsharded one bit for bit, so only ops
#: that step each element alone belong here (LAMB's trust ratio all-reduces sums of squares
#: in another order). 8-bit states ([note: 8-bit states under FSDP2] in fusedopt/quant8.py)
#: are kept by the params of two or more dims; ops that gain them join by adding a row.
#: Stochastic rounding draws by the element's index in the whole param ([note: sharded
#: stochastic rounding] in fusedopt/optim/_plan.py); compact and Kahan masters round each
#: element alone.
MESH_FREE_CASES = {
    "q8_adamw": (lambda: fusedopt.AdamW, dict(lr=1e-2, weight_decay=0.1), True),
    "q8_adam_maximize": (lambda: fusedopt.Adam, dict(lr=1e-2, maximize=True), True),
    "q8_adamw_bf16_compact": (
        lambda: fusedopt.AdamW,
        dict(lr=1e-2, master_weights="compact"),
        True,
    ),
    "q8_sr_adamw_bf16": (lambda: fusedopt.AdamW, dict(lr=1e-2, stochastic_rounding=True), True),
    "sr_adamw_bf16": (lambda: fusedopt.AdamW, dict(lr=1e-2, stochastic_rounding=True), False),
    # fp32 params with bf16 moments rounded stochastically ([note: state dtype]): each
    # state's own stream of the element's Philox counter, counted in the whole param
    "sr_states_adamw": (
        lambda: fusedopt.AdamW,
        dict(lr=1e-2, state_dtype=torch.bfloat16, stochastic_rounding=True),
        False,
    ),
    "sr_states_lion": (
        lambda: fusedopt.Lion,
        dict(lr=1e-3, state_dtype=torch.bfloat16, stochastic_rounding=True),
        False,
    ),
    "sr_states_sgd": (
        lambda: fusedopt.SGD,
        dict(lr=1e-2, momentum=0.9, state_dtype=torch.bfloat16, stochastic_rounding=True),
        False,
    ),
    "kahan_adamw_bf16": (lambda: fusedopt.AdamW, dict(lr=1e-2, master_weights="kahan"), False),
    "compact_adamw_bf16": (lambda: fusedopt.AdamW, dict(lr=1e-2, master_weights="compact"), False),
}
Q8_CASES = [name for name, case in MESH_FREE_CASES.items() if case[2]]
#: Params of two or more dims (8-bit states) sharded unevenly over 2 ranks: rows of several
#: blocks, short last blocks, a 3-d param, a 1-row param (rank 1 holds an empty shard); and
#: 1-D params, which FSDP2 shards on their only dim, in a group with plain states.
Q8_MATRICES = ((7, 6), (5, 300), (3, 520), (1, 513), (3, 2, 260))
Q8_VECTORS = ((7,), (3,))


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
    if not hasattr(t, "full_tensor"):
        return t
    if t.dtype == torch.int16:  # gloo's all-gather takes no int16 (compact remainders)
        return t.to(torch.int32).full_tensor().to(t.dtype)
    return t.full_tensor()


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


class _Q8Params(torch.nn.Module):
    """The params of the 8-bit scenarios, ``Q8_MATRICES`` then ``Q8_VECTORS``."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.weights = torch.nn.ParameterList(
            torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype))
            for s in (*Q8_MATRICES, *Q8_VECTORS)
        )


def _q8_model(case: str, sharded: bool) -> torch.nn.Module:
    dtype = torch.bfloat16 if "bf16" in case else torch.float32
    model = _Q8Params(dtype)
    if sharded:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        fully_shard(model, mesh=init_device_mesh("cpu", (WORLD,)))
    return model


def _q8_optimizer(case: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    cls, kwargs, q8 = MESH_FREE_CASES[case]
    params = list(model.parameters())
    matrices = len(Q8_MATRICES)
    groups = [{"params": params[:matrices], "state_bits": 8 if q8 else None},
              {"params": params[matrices:]}]  # fmt: skip
    opt = cls()(groups, **kwargs)
    opt.sr_seed = 12345  # the same on every rank (its default, torch.initial_seed(), is not)
    return opt


def _q8_grads(model: torch.nn.Module, step: int) -> None:
    """The same whole grads on every rank and in the unsharded run (each rank takes its
    shard of them, as FSDP2's reduce-scatter would leave it): the runs see the same bits,
    so their steps must give the same bits. Row magnitudes spread over decades, so that the
    blocks' absmaxes differ."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for k, p in enumerate(model.parameters()):
        gen = torch.Generator().manual_seed(1000 * step + k)
        g = torch.randn(p.shape, generator=gen)
        if p.dim() >= 2:
            g = g * torch.logspace(-3, 1, p.shape[0]).reshape(-1, *[1] * (p.dim() - 1))
        g = g.to(p.dtype)
        if isinstance(p, DTensor):
            g = distribute_tensor(g, p.device_mesh, p.placements, src_data_rank=None)
        p.grad = g


def _q8_train(model, opt, steps, start=0):
    for step in range(start, start + steps):
        _q8_grads(model, step)
        opt.step()


def _assert_same_bits(model, opt, want_model, want_opt, what, q8=True):
    """Params and every state of the (sharded or not) ``model`` equal ``want_model``'s bit for
    bit; a sharded param's states are DTensors placed as the param."""
    from torch.distributed.tensor import DTensor

    from fusedopt import quant8

    for k, (p, q) in enumerate(zip(model.parameters(), want_model.parameters(), strict=True)):
        assert torch.equal(_full(p), _full(q)), f"{what}: param {k}"
        state, want = opt.state[p], want_opt.state[q]
        assert state.keys() == want.keys(), (what, k, state.keys(), want.keys())
        for key, value in state.items():
            if key == "step":
                assert torch.equal(value, want[key]), f"{what}: param {k} step"
                continue
            if isinstance(p, DTensor):
                assert isinstance(value, DTensor) and value.placements == p.placements, key
            assert _full(value).dtype == want[key].dtype, f"{what}: param {k} {key} dtype"
            assert torch.equal(_full(value), want[key]), f"{what}: param {k} {key}"
        if q8 and k < len(Q8_MATRICES):
            codes = [v for v in state.values() if quant8.is_quantized(_full(v))]
            assert len(codes) >= 1, f"{what}: param {k} has no 8-bit state"
        else:
            assert not any(quant8.is_quantized(_full(v)) for v in state.values())


def _train_sharded_and_unsharded(case):
    """STEPS steps of ``case`` on FSDP2's params and on the same params unsharded:
    (model, optimizer, unsharded model, its optimizer)."""
    want = _q8_model(case, sharded=False)
    want_opt = _q8_optimizer(case, want)
    _q8_train(want, want_opt, STEPS)
    model = _q8_model(case, sharded=True)
    opt = _q8_optimizer(case, model)
    _q8_train(model, opt, STEPS)
    return model, opt, want, want_opt


def scenario_fsdp2_q8_equals_unsharded(rank):
    """state_bits=8 on FSDP2's params: the step runs on the local shards (whole rows, hence
    whole blocks) and equals the unsharded step bit for bit: codes, absmaxes (placed as the
    param, of the whole param's scale shape), params."""
    from fusedopt import quant8
    from fusedopt.optim._state_bits import scale_keys

    for case in Q8_CASES:
        model, opt, want, want_opt = _train_sharded_and_unsharded(case)
        _assert_same_bits(model, opt, want, want_opt, case)
        for p in list(model.parameters())[: len(Q8_MATRICES)]:
            scales = [v for k, v in opt.state[p].items() if k in scale_keys(opt.OP)]
            assert scales and all(v.shape == quant8.scale_shape(p.shape) for v in scales), case


def scenario_fsdp2_sr_and_masters_equal_unsharded(rank):
    """Stochastic rounding and compact/Kahan masters on FSDP2's params: the sharded run's
    bits are the unsharded run's (params, masters, states)."""
    for case, (*_, q8) in MESH_FREE_CASES.items():
        if q8:
            continue
        model, opt, want, want_opt = _train_sharded_and_unsharded(case)
        _assert_same_bits(model, opt, want, want_opt, case, q8=False)


def scenario_fsdp2_q8_sharded_1d_refused(rank):
    """A 1-D param sharded on its only dim would have its blocks cut: a clear error naming
    the param, before any tensor is touched."""
    model = _q8_model("q8_adamw", sharded=True)
    params = list(model.parameters())
    opt = fusedopt.AdamW([{"params": params, "state_bits": 8}], lr=1e-2)
    _q8_grads(model, 0)
    before = [_full(p).clone() for p in params]
    index = len(Q8_MATRICES)
    try:
        opt.step()
    except ValueError as error:
        message = str(error)
        assert f"group 0, index {index}" in message and "state_bits=None" in message, message
    else:
        raise AssertionError("a sharded 1-D param with state_bits=8 was accepted")
    unchanged = all(torch.equal(_full(p), b) for p, b in zip(params, before, strict=True))
    assert not opt.state and unchanged


def scenario_fsdp2_sr_column_shard_refused(rank):
    """Stochastic rounding on a DTensor whose shard is not one run of the param's elements
    (Shard(1)): its bits could not be the unsharded ones; a ValueError naming the param
    ([note: sharded stochastic rounding] in fusedopt/optim/_plan.py), nothing touched."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD,))
    whole = torch.randn(4, 6, generator=torch.Generator().manual_seed(0)).bfloat16()
    p = torch.nn.Parameter(distribute_tensor(whole, mesh, [Shard(1)], src_data_rank=None))
    p.grad = distribute_tensor(torch.ones(4, 6).bfloat16(), mesh, [Shard(1)], src_data_rank=None)
    opt = fusedopt.AdamW([p], lr=1e-2, stochastic_rounding=True)
    try:
        opt.step()
    except ValueError as error:
        message = str(error)
        assert "group 0, index 0" in message and "one run" in message, message
    else:
        raise AssertionError("stochastic rounding of a Shard(1) param was accepted")
    assert not opt.state and torch.equal(p.full_tensor(), whole)


def scenario_fsdp2_q8_checkpoint_reshards(rank, tmpdir):
    """An 8-bit run checkpointed (DCP) on 2 ranks after 2 steps loads into 2 ranks, into one
    unsharded process, and (``state_dict``/``load_state_dict``) into a fresh sharded
    optimizer; each goes on for 2 steps with the bits of the uninterrupted run."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    def load(model, opt, path, no_dist=False):
        state = {
            "model": get_model_state_dict(model),
            "optim": get_optimizer_state_dict(model, opt),
        }
        dcp.load(state, checkpoint_id=path, no_dist=no_dist)
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, opt, state["optim"])

    for case in Q8_CASES:
        path = os.path.join(tmpdir, case)
        model = _q8_model(case, sharded=True)
        opt = _q8_optimizer(case, model)
        _q8_train(model, opt, 2)
        dcp.save(
            {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
            checkpoint_id=path,
        )
        copied = _q8_model(case, sharded=True)  # state_dict() round trip, taken here
        copied.load_state_dict(model.state_dict())
        copied_opt = _q8_optimizer(case, copied)
        copied_opt.load_state_dict(opt.state_dict())
        _q8_train(model, opt, 2, start=2)  # the uninterrupted run

        resumed = _q8_model(case, sharded=True)
        resumed_opt = _q8_optimizer(case, resumed)
        load(resumed, resumed_opt, path)
        _q8_train(resumed, resumed_opt, 2, start=2)
        _assert_same_bits(resumed, resumed_opt, model, _Unsharded(model, opt), f"{case} 2->2")

        single = _q8_model(case, sharded=False)
        single_opt = _q8_optimizer(case, single)
        load(single, single_opt, path, no_dist=True)
        _q8_train(single, single_opt, 2, start=2)
        _assert_same_bits(model, opt, single, single_opt, f"{case} 2->1")

        _q8_train(copied, copied_opt, 2, start=2)
        _assert_same_bits(copied, copied_opt, model, _Unsharded(model, opt), f"{case} sd")


class _Unsharded:
    """An optimizer's ``state`` seen with every DTensor gathered (``_assert_same_bits``'s
    ``want_opt``)."""

    def __init__(self, model, opt):
        self.state = {p: {k: _full(v) for k, v in opt.state[p].items()} for p in model.parameters()}


def _worker(rank: int, port: int, outdir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # A collective that one rank never joins fails after the timeout instead of hanging.
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    torch.set_num_threads(1)
    results = {}
    for name in SCENARIOS:
        try:
            fn = globals()[f"scenario_{name}"]
            if name in ("dcp", "fsdp2_q8_checkpoint_reshards"):
                fn(rank, os.path.join(outdir, f"checkpoint_{name}"))
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
