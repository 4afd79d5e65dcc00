"""How far each bf16 master mode drifts from fp32 master weights: AdamW on one bf16 tensor,
the same bf16 grads for every mode, with and without decoupled weight decay.

[note: kahan master] (fusedopt/_contract.py) says why Kahan masters exist and how they differ
from optimi's ``kahan_sum``; this measures it. Rows: fusedopt with fp32 masters (the
reference), compact masters, Kahan masters, no master (plain bf16), and optimi's AdamW with
``kahan_sum=True`` (when torch-optimi is installed: a peer, never a dependency; its states
are bf16 and its weight decay multiplies the bf16 param outside the compensation). The error
is ``|master - fp32 master|`` (the master: param + compensation for Kahan, the param for plain
bf16 and optimi) relative to how far the fp32 master moved, max and RMS over the elements.

    python -m bench.kahan [--steps 200] [--numel 4096]
"""

from __future__ import annotations

import argparse

import torch

import fusedopt
from fusedopt.reference.ops import join_kahan, join_master

MODES = ("fp32 master", "compact", "kahan", "bf16", "optimi kahan_sum")


def final_master(mode: str, init: torch.Tensor, grads: list[torch.Tensor], wd: float):
    """The fp32 value of the param after AdamW(lr 1e-3, weight_decay ``wd``) over ``grads``."""
    p = init.clone().requires_grad_()
    kwargs = dict(lr=1e-3, weight_decay=wd)
    if mode == "optimi kahan_sum":
        import optimi

        opt = optimi.AdamW([p], **kwargs, kahan_sum=True, foreach=False)
    else:
        setting = {"fp32 master": True, "compact": "compact", "kahan": "kahan", "bf16": False}
        opt = fusedopt.AdamW([p], **kwargs, master_weights=setting[mode], backend="cpu")
    for g in grads:
        p.grad = g.clone()
        opt.step()
    state = opt.state[p]
    if "kahan_comp" in state:
        return join_kahan(p.detach(), state["kahan_comp"])
    if "master_remainder" in state:
        return join_master(p.detach(), state["master_remainder"])
    return state["master_param"] if "master_param" in state else p.detach().float()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--numel", type=int, default=4096)
    args = parser.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    init = (torch.randn(args.numel, generator=gen) * 0.05).to(torch.bfloat16)
    grads = [
        (torch.randn(args.numel, generator=gen) * 1e-2).to(torch.bfloat16)
        for _ in range(args.steps)
    ]
    print(f"AdamW lr 1e-3, {args.steps} steps, {args.numel} bf16 params (std 0.05), bf16 grads")
    print("| weight decay | mode | max err / max moved | rms err / rms moved |")
    print("| --- | --- | --- | --- |")
    for wd in (0.0, 0.1):
        ref = final_master("fp32 master", init, grads, wd)
        moved = (ref - init.float()).abs()
        for mode in MODES:
            try:
                x = final_master(mode, init, grads, wd)
            except ImportError:
                print(f"| {wd} | {mode} | (torch-optimi not installed) | |")
                continue
            err = (x - ref).abs()
            rms = err.pow(2).mean().sqrt() / moved.pow(2).mean().sqrt()
            print(f"| {wd} | {mode} | {err.max() / moved.max():.2e} | {rms:.2e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
