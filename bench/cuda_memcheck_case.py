"""A small call of every cuda op, for ``compute-sanitizer --tool memcheck`` (bench/gpu_suite.sh).

Covers the paths where an out-of-bounds access would hide: empty tensors, sizes that are not
a multiple of the vector width (scalar tails), views at an odd offset (the unaligned path),
several 64K-element chunks, master weights, amsgrad, LAMB's two passes, Nesterov SGD.
"""

from __future__ import annotations

import math

import torch

from fusedopt import ops

SIZES = (0, 1, 7, 33, 65536 + 3, 2 * 65536)


def _tensors(dtype: torch.dtype, offset: int = 0) -> list[torch.Tensor]:
    out = []
    for n in SIZES:
        buffer = torch.randn(n + offset, device="cuda").to(dtype)
        out.append(buffer[offset:])
    return out


def main() -> None:
    dev = "cuda"
    scalars = dict(
        backend="cuda",
        grad_scale=torch.tensor(2.0, device=dev),
        clip_coef=torch.tensor(0.5, device=dev),
        found_inf=torch.zeros((), device=dev),
    )
    for offset in (0, 1):
        p, g = _tensors(torch.bfloat16, offset), _tensors(torch.float32, offset)
        masters = [t.float() for t in p]

        def f32(offset=offset):  # fresh fp32 states (non-negative: valid exp_avg_sqs too)
            return [t.abs() for t in _tensors(torch.float32, offset)]

        steps = [torch.zeros((), device=dev) for _ in SIZES]
        lr = torch.tensor(1e-3, device=dev)
        ops.adamw_(p, g, f32(), f32(), steps, lr=lr, amsgrad=True, max_exp_avg_sqs=f32(),
                   master_params=masters, **scalars)  # fmt: skip
        ops.lamb_(p, g, f32(), f32(), steps, lr=1e-3, master_params=masters, **scalars)
        ops.lion_(p, g, f32(), lr=1e-4, weight_decay=0.1, master_params=masters, **scalars)
        ops.sgd_(p, g, f32(), steps, lr=1e-2, momentum=0.9, nesterov=True,
                 master_params=masters, **scalars)  # fmt: skip
        plain = _tensors(torch.float16, offset)
        ops.sgd_(plain, _tensors(torch.float16, offset), lr=1e-2, backend="cuda")
        for norm_type in (2.0, math.inf):
            ops.grad_norm(g + plain, norm_type, per_tensor=True,
                          grad_scale=scalars["grad_scale"], backend="cuda")  # fmt: skip
        ops.scale_(g + plain + _tensors(torch.float64, offset), scalars["clip_coef"],
                   scalars["found_inf"], backend="cuda")  # fmt: skip
    torch.cuda.synchronize()
    print("memcheck case: every cuda op ran")


if __name__ == "__main__":
    main()
