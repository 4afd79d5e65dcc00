"""CPU optimizer-step benchmark on GPT-2 small's parameter list (124M params, 148 tensors).

Side by side in one run, with achieved bandwidth (the bytes a step must move / its time)
and the machine's bandwidth ceiling measured in the same run (``bench/timing.py``: STREAM's
kernels, bus bytes with write-allocate):

1. fp32 AdamW: fusedopt ``cpu`` (``ops.adamw_``) vs ``torch.optim.AdamW(fused=True)``.
2. Mixed precision with clipping: fusedopt bf16 params + fp32 master weights +
   ``max_grad_norm`` (``ops.grad_norm``, then ``ops.adamw_`` with ``clip_coef``) vs what a
   torch user runs for the same job: fp32 params, ``clip_grad_norm_``, fused AdamW.

The contenders alternate step by step (A, B, A, B...) and each reports its median, so a
machine shared with other work slows both alike. Run from the repository root:
``PYTHONPATH=. python bench/cpu_step.py [--steps 9]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from bench.timing import ceiling_array_bytes, stream_ceiling
from fusedopt import ops

MAX_GRAD_NORM = 1.0
LR = 1e-3


def gpt2_small_shapes() -> list[tuple[int, ...]]:
    """GPT-2 small (124M): embeddings, 12 blocks of 12 tensors, the final layer norm."""
    d, vocab, ctx = 768, 50257, 1024
    shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(12):
        shapes += [(d,), (d,)]  # ln_1
        shapes += [(d, 3 * d), (3 * d,)]  # attn.c_attn
        shapes += [(d, d), (d,)]  # attn.c_proj
        shapes += [(d,), (d,)]  # ln_2
        shapes += [(d, 4 * d), (4 * d,)]  # mlp.c_fc
        shapes += [(4 * d, d), (d,)]  # mlp.c_proj
    shapes += [(d,), (d,)]  # ln_f
    return shapes


def alternate(contenders: dict[str, Callable[[], None]], steps: int) -> dict[str, float]:
    """Median seconds of each contender, timed in alternation after one warm-up call each."""
    for fn in contenders.values():
        fn()  # first-touch page faults, thread pools, state allocation
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(steps):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _randn(shapes, dtype=torch.float32, scale=1.0):
    return [torch.randn(s).mul_(scale).to(dtype) for s in shapes]


def _zeros(shapes):
    return [torch.zeros(s) for s in shapes]


def fp32_adamw(shapes) -> dict[str, Callable[[], None]]:
    """fusedopt and torch, each on its own fp32 params, grads and states."""
    params, grads = _randn(shapes), _randn(shapes, scale=1e-2)
    exp_avgs, exp_avg_sqs = _zeros(shapes), _zeros(shapes)
    counts = [torch.zeros(()) for _ in shapes]

    def fusedopt_step():
        ops.adamw_(params, grads, exp_avgs, exp_avg_sqs, counts, lr=LR, backend="cpu")

    torch_params = [torch.nn.Parameter(p) for p in _randn(shapes)]
    for p, g in zip(torch_params, _randn(shapes, scale=1e-2), strict=True):
        p.grad = g
    opt = torch.optim.AdamW(torch_params, lr=LR, fused=True)
    return {"fusedopt": fusedopt_step, "torch": opt.step}


def _fusedopt_mixed(shapes, master_sync: bool) -> Callable[[], None]:
    """One fusedopt bf16 + fp32 master + clipping step on its own tensors."""
    master = _randn(shapes)
    params = [m.to(torch.bfloat16) for m in master]
    grads = _randn(shapes, torch.bfloat16, scale=1e-2)
    exp_avgs, exp_avg_sqs = _zeros(shapes), _zeros(shapes)
    counts = [torch.zeros(()) for _ in shapes]
    max_norm = torch.tensor(MAX_GRAD_NORM)

    def fusedopt_step():
        norm = ops.grad_norm(grads, backend="cpu")
        # clip_grad_norm_'s coefficient, kept on the device: min(1, max_norm / (norm + 1e-6)).
        clip = torch.clamp(max_norm / (norm.total + 1e-6), max=1.0)
        ops.adamw_(
            params, grads, exp_avgs, exp_avg_sqs, counts, lr=LR, master_params=master,
            master_sync=master_sync, clip_coef=clip, found_inf=norm.found_inf, backend="cpu",
        )  # fmt: skip

    return fusedopt_step


def mixed_clipped(shapes) -> dict[str, Callable[[], None]]:
    """fusedopt: bf16 params + fp32 master + clipping, with and without master sync;
    torch: fp32 params + clip + fused."""
    fusedopt_step = _fusedopt_mixed(shapes, master_sync=True)
    nosync_step = _fusedopt_mixed(shapes, master_sync=False)

    torch_params = [torch.nn.Parameter(p) for p in _randn(shapes)]
    torch_grads = _randn(shapes, scale=1e-2)
    opt = torch.optim.AdamW(torch_params, lr=LR, fused=True)

    def torch_step():
        for p, g in zip(torch_params, torch_grads, strict=True):
            p.grad = g  # clip_grad_norm_ scales the grads in place: same work every step
        torch.nn.utils.clip_grad_norm_(torch_params, MAX_GRAD_NORM)
        opt.step()

    return {"fusedopt": fusedopt_step, "fo-nosync": nosync_step, "torch": torch_step}


# Bytes each step must move per element (reads + writes).
CASES = {
    # p, g, m, v read; p, m, v written; fp32.
    "fp32 AdamW": (fp32_adamw, {"fusedopt": 28, "torch": 28}),
    # fusedopt: grad_norm reads g (2); the step reads g, master, the bf16 param (master
    # sync), m, v (16) and writes master, the bf16 param, m, v (14); with master_sync=False
    # ("fo-nosync") it does not read the param (30). torch: the norm reads g (4), the clip
    # scales g in place (8), the fused step moves 28.
    "bf16+master+clip": (mixed_clipped, {"fusedopt": 32, "fo-nosync": 30, "torch": 40}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=9, help="timed steps per contender")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: keep)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)  # fusedopt's cpu backend follows torch's setting
    torch.manual_seed(0)
    shapes = gpt2_small_shapes()
    numel = sum(torch.Size(s).numel() for s in shapes)
    print(
        f"GPT-2 small: {numel / 1e6:.1f}M params in {len(shapes)} tensors; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    cpu = torch.device("cpu")
    ceiling = stream_ceiling(cpu, ceiling_array_bytes(cpu, quick=False))
    roof = ceiling.gbps
    print(f"bandwidth ceiling: {ceiling.describe()}")
    print(f"{'case':<18} {'impl':<9} {'ms':>8} {'GB/s':>7} {'% roof':>7}")
    for name, (make, bytes_per_element) in CASES.items():
        times = alternate(make(shapes), args.steps)
        for impl, seconds in times.items():
            gbs = bytes_per_element[impl] * numel / seconds / 1e9
            print(f"{name:<18} {impl:<9} {seconds * 1e3:8.1f} {gbs:7.1f} {100 * gbs / roof:6.0f}%")
        speedup = times["torch"] / times["fusedopt"]
        print(f"{name:<18} fusedopt is {speedup:.2f}x torch's speed")


if __name__ == "__main__":
    main()
