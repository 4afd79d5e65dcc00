"""Which code map for 8-bit states: quantization error on real moment distributions.

    python -m bench.q8_maps [--steps 200]

Trains the byte-level LM of ``bench/lm_quality.py`` with ``torch.optim.AdamW`` (fp32, its
hyperparameters and schedule) for ``--steps`` steps, takes every matrix's ``exp_avg`` and
``exp_avg_sq`` (the params that get 8-bit states), and quantizes them with the block-wise
rule of [note: 8-bit states] (``fusedopt/quant8.py``) under power maps of exponent P = 1
(linear, as torchao's ``linear`` map) to 5. Per map it prints, over all elements:

* the relative error of each moment, median and 99th percentile, ``|x^ - x| / |x|`` over the
  elements with ``x != 0``;
* for ``exp_avg_sq``, the fraction of elements with ``v > 0`` that come back as 0 (their
  update becomes ``m / eps``: a blow-up);
* the error of Adam's update direction from both dequantized moments,
  ``u = m / (sqrt(v) + eps)`` (bias corrections of the last step), as the relative L2 error
  ``|u^ - u| / |u|`` per tensor, the worst tensor and the median.
"""

from __future__ import annotations

import argparse
import math

import torch

from bench.lm_quality import HYPERS, ByteLM, Config, batch_starts, corpus, lr_factor, windows
from fusedopt import quant8


def moments(steps: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
    """(exp_avg, exp_avg_sq) of every matrix after ``steps`` AdamW steps, and the step."""
    cfg = Config(steps=steps)
    train_data, _, _ = corpus()
    starts = batch_starts(len(train_data), cfg)
    torch.manual_seed(cfg.seed)
    model = ByteLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), **HYPERS["adamw"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    for step in range(steps):
        loss = model.loss(*windows(train_data, starts[step], cfg.context))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    out = [
        (opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"])
        for p in model.parameters()
        if p.dim() >= 2
    ]
    return out, steps


def evaluate(states, step: int, p_signed: int, p_unsigned: int) -> dict[str, float]:
    beta1, beta2 = HYPERS["adamw"]["betas"]
    eps = HYPERS["adamw"]["eps"]
    bc1, bc2 = 1 - beta1**step, 1 - beta2**step
    rel_m, rel_v, zeroed, total_pos, u_err = [], [], 0, 0, []
    for m, v in states:
        mq = quant8.dequantize(*quant8.quantize(m, True, p_signed), power=p_signed)
        vq = quant8.dequantize(*quant8.quantize(v, False, p_unsigned), power=p_unsigned)
        nz = m != 0
        rel_m.append(((mq - m).abs() / m.abs())[nz])
        pos = v > 0
        rel_v.append(((vq - v).abs() / v)[pos])
        zeroed += int(((vq == 0) & pos).sum())
        total_pos += int(pos.sum())
        u = (m / bc1) / ((v / bc2).sqrt() + eps)
        uq = (mq / bc1) / ((vq / bc2).sqrt() + eps)
        u_err.append(float((uq - u).norm() / u.norm()))
    rm, rv = torch.cat(rel_m), torch.cat(rel_v)
    q = torch.tensor([0.5, 0.99])
    return {
        "m_med": float(rm.quantile(q[0]) if rm.numel() < 2**24 else rm.median()),
        "m_p99": float(torch.quantile(rm[:: max(1, rm.numel() // 2**23)], q[1])),
        "v_med": float(rv.median()),
        "v_p99": float(torch.quantile(rv[:: max(1, rv.numel() // 2**23)], q[1])),
        "v_zeroed": zeroed / max(1, total_pos),
        "u_worst": max(u_err),
        "u_median": sorted(u_err)[len(u_err) // 2],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args(argv)
    states, step = moments(args.steps)
    n = sum(m.numel() for m, _ in states)
    print(f"{len(states)} matrices, {n} elements, after {step} AdamW steps (fp32)")
    print("| P signed | P unsigned | m rel err med | m p99 | v rel err med | v p99 | v -> 0 | "
          "update rel L2 err, median tensor | worst tensor |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for p in range(1, 6):
        r = evaluate(states, step, p, p)
        print(
            f"| {p} | {p} | {r['m_med']:.2e} | {r['m_p99']:.2e} | {r['v_med']:.2e} | "
            f"{r['v_p99']:.2e} | {r['v_zeroed']:.2e} | {r['u_median']:.3e} | "
            f"{r['u_worst']:.3e} |"
        )
    chosen = evaluate(states, step, quant8.P_SIGNED, quant8.P_UNSIGNED)
    print(f"chosen (P_SIGNED={quant8.P_SIGNED}, P_UNSIGNED={quant8.P_UNSIGNED}): {chosen}")
    return 0 if all(math.isfinite(v) for v in chosen.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
