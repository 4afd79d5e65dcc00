"""The pure-torch oracle: every fusedopt op, written plainly, one tensor at a time.

These functions are the semantics of DESIGN.md §3 and of the schemas in
``fusedopt._contract``. They compute in opmath: float64 when the param is float64, float32
otherwise, so the same code is both the ``reference`` backend (fp32 math on any device) and the
float64 oracle the tests compare every kernel against (run it on float64 copies). Clarity beats
speed here; host syncs are allowed (``found_inf`` is read with ``.item()``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from fusedopt import quant8
from fusedopt._contract import factored
from fusedopt.reference.philox import round_stochastic


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype fusedopt computes in for a given storage dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def sqrt_rn(x: Tensor) -> Tensor:
    """The correctly rounded square root, as the kernels' ``sqrt_rn`` (IEEE 754).

    [note: reference sqrt] ``torch.sqrt`` on the CPU is not correctly rounded on every
    machine: with torch 2.14.1 on an AVX-512 CPU (AMD EPYC) its vectorised path differed from
    the correctly rounded result (numpy's) in 19.6% of 10^6 fp32 inputs and 1.4% of fp64 ones
    (by one ULP); on AVX2 machines it matched. One ULP in Adam's denominator becomes 16 ULPs of
    a param where the update cancels most of it, so the oracle takes fp32 square roots in
    fp64 and rounds once (exact: a square root rounded to 53 bits, then to 24, is the
    correctly rounded 24-bit one, since 53 >= 2*24 + 2). fp64 keeps ``torch.sqrt``: fp64
    comparisons are relative tolerances, far above one ULP.
    """
    if x.dtype == torch.float64:
        return x.sqrt()
    return x.to(torch.float64).sqrt().to(x.dtype)


def _skip(found_inf: Tensor | None) -> bool:
    return found_inf is not None and bool(found_inf.item() != 0)


def _columns(hypers: Tensor, group_sizes: Sequence[int]) -> list[list[float]]:
    """The hyperparameter table ([note: hyper table] in fusedopt._contract) as one list of
    per-tensor floats per column."""
    rows = zip(hypers.tolist(), group_sizes, strict=True)
    per_tensor = [row for row, count in rows for _ in range(count)]
    return [list(c) for c in zip(*per_tensor, strict=True)] or [[]] * hypers.shape[1]


def _lr(lr: Sequence[float], lr_tensor: Tensor | None, i: int, opmath: torch.dtype):
    """The learning rate of tensor i: a Python float or a 0-d opmath tensor."""
    if lr_tensor is None:
        return lr[i]
    flat = lr_tensor.reshape(-1)
    return flat[i if flat.numel() > 1 else 0].to(opmath)


def load_grad(
    grad: Tensor,
    opmath: torch.dtype,
    grad_scale: Tensor | None,
    clip_coef: Tensor | None,
    maximize: bool = False,
) -> Tensor:
    """[note: common scalars]: g / grad_scale * clip_coef, negated for maximize, in opmath."""
    g = grad.to(opmath)
    if grad_scale is not None:
        g = g / grad_scale.to(opmath)
    if clip_coef is not None:
        g = g * clip_coef.to(opmath)
    return -g if maximize else g


_BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _signed(bits: Tensor, width: int) -> Tensor:
    """Unsigned ``width``-bit values (int64) as the signed integers of the same bits."""
    return bits - (bits >= 1 << (width - 1)).to(torch.int64) * (1 << width)


def split_master(master: Tensor) -> tuple[Tensor, Tensor]:
    """[note: compact master] (fusedopt._contract): an fp32 master as its bf16 param (rounded
    to nearest, ties away from zero) and its int16 remainder, so that
    ``join_master(*split_master(m))`` is ``m`` bit for bit (a NaN: the param's NaN)."""
    u = master.to(torch.float32).view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    high = ((u + 0x8000) >> 16) & 0xFFFF
    low = u & 0xFFFF
    nan = master.isnan()
    high = torch.where(nan, torch.full_like(high, 0x7FC0), high)
    low = torch.where(nan, torch.zeros_like(low), low)
    param = _signed(high, 16).to(torch.int16).view(torch.bfloat16)
    return param, _signed(low, 16).to(torch.int16)


def join_master(param: Tensor, remainder: Tensor) -> Tensor:
    """[note: compact master]: the fp32 master of a bf16 param and its int16 remainder,
    ``(param_bits << 16) + remainder``; a NaN param, or a remainder that does not fit its param
    (only after a write into the param), gives the param's value."""
    high = param.view(torch.int16).to(torch.int64) & 0xFFFF
    r = remainder.to(torch.int64)
    magnitude = high & 0x7FFF
    misfit = (magnitude > 0x7F80) | ((magnitude == 0) & (r < 0)) | ((magnitude == 0x7F80) & (r > 0))
    u = ((high << 16) + r) & 0xFFFFFFFF
    joined = _signed(u, 32).to(torch.int32).view(torch.float32)
    return torch.where(misfit, param.to(torch.float32), joined)


def _compact(master: Tensor) -> bool:
    return master.dtype == torch.int16


def _kahan(param: Tensor, master: Tensor) -> bool:
    """A Kahan master: a compensation of the param's own 16-bit dtype ([note: kahan master]
    in fusedopt._contract)."""
    return master.dtype == param.dtype


def _fp32_bits_round(x: Tensor, dtype: torch.dtype) -> Tensor:
    """The 16-bit bits of fp32 ``x`` rounded to ``dtype`` (to nearest even)."""
    return x.to(dtype).view(_BITS[dtype])


def join_kahan(param: Tensor, compensation: Tensor) -> Tensor:
    """[note: kahan master] (fusedopt._contract): the fp32 master of a 16-bit param and its
    compensation, ``fp32(param) + fp32(compensation)`` in fp32; where that sum does not round
    to the param (a value written into the param since: the compensation is not its), the
    param's value alone."""
    p = param.to(torch.float32)
    x = p + compensation.to(torch.float32)
    written = _fp32_bits_round(x, param.dtype) != param.view(_BITS[param.dtype])
    return torch.where(written, p, x)


def split_kahan(master: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """[note: kahan master]: an fp32 master as its 16-bit param ``round(x)`` (to nearest even:
    ``master.to(dtype)``) and compensation ``round(x - param)`` (0 where that difference is
    not finite), moved one step toward zero where it is a tie that would round ``param +
    compensation`` away from the param, so that ``join_kahan`` takes it back."""
    x = master.to(torch.float32)
    param = x.to(dtype)
    p = param.to(torch.float32)
    d = x - p
    c = torch.where(d.isfinite(), d, torch.zeros_like(d)).to(dtype)
    bits = _BITS[dtype]
    tie = (_fp32_bits_round(p + c.to(torch.float32), dtype) != param.view(bits)) & (c != 0)
    c = torch.where(tie, (c.view(bits) - 1).view(dtype), c)  # |c| > 0 at a tie: no borrow
    return param, c


def _load_param(
    param: Tensor, master_params: Sequence[Tensor], i: int, opmath, master_sync: bool
) -> Tensor:
    """The param in opmath: its master when there is one, where ``master_sync`` first adopts
    every element whose param bits differ from the rounded master's ([note: master sync] in
    fusedopt._contract); a compact master is joined from the param and its remainder (which
    adopts a written param within half an ulp, whatever ``master_sync``: [note: compact
    master]), a Kahan one from the param and its compensation ([note: kahan master])."""
    if not master_params:
        return param.to(opmath)
    if _compact(master_params[i]):
        return join_master(param, master_params[i]).to(opmath)
    if _kahan(param, master_params[i]):
        return join_kahan(param, master_params[i]).to(opmath)
    master = master_params[i].to(opmath)
    if not master_sync:
        return master
    bits = _BITS[param.dtype]
    written = master.to(param.dtype).view(bits) != param.view(bits)
    return torch.where(written, param.to(opmath), master)


def _store_param(
    p: Tensor, param: Tensor, master_params: Sequence[Tensor], i: int, sr_key: Tensor | None = None
) -> None:
    """Store the new param ``p`` (opmath): its master too, or its compact split; with
    ``sr_key`` (bf16 params without masters), rounded stochastically ([note: stochastic
    rounding] in csrc/include/fusedopt/dtype.h)."""
    if sr_key is not None:
        param.copy_(round_stochastic(p, param, sr_key, i))
        return
    if master_params and _compact(master_params[i]):
        rounded, remainder = split_master(p)
        param.copy_(rounded)
        master_params[i].copy_(remainder)
        return
    if master_params and _kahan(param, master_params[i]):
        rounded, compensation = split_kahan(p, param.dtype)
        param.copy_(rounded)
        master_params[i].copy_(compensation)
        return
    if master_params:
        master_params[i].copy_(p)
    param.copy_(p)  # rounds to the param's dtype: with masters, param == master.to(dtype)


def _sr_param(param: Tensor, master_params: Sequence[Tensor]) -> bool:
    """Whether a call's sr_key rounds the param store: bf16 params without master weights
    (with bf16 states of other params it keys the states only: [note: state dtype])."""
    return param.dtype == torch.bfloat16 and not master_params


def _next_step(step: Tensor) -> float:
    """Increment a device step count and return the new value as a Python float (fp64)."""
    step.add_(1)
    return float(step.item())


def _each_param(
    params, grads, master_params, lr, lr_tensor, grad_scale, clip_coef, found_inf, maximize,
    master_sync,
) -> Iterator[tuple[int, torch.dtype, Any, Tensor, Tensor]]:  # fmt: skip
    """What every step op does first, param by param: nothing at all when ``found_inf`` is
    set; else, for each param in order, its index, opmath dtype, learning rate, loaded grad
    (``load_grad``) and loaded param (``_load_param``)."""
    if _skip(found_inf):
        return
    for i, param in enumerate(params):
        opmath = opmath_dtype(param.dtype)
        g = load_grad(grads[i], opmath, grad_scale, clip_coef, maximize)
        p = _load_param(param, master_params, i, opmath, master_sync)
        yield i, opmath, _lr(lr, lr_tensor, i, opmath), g, p


def _bias_correction(beta: float, t: float, enabled: bool) -> float:
    return 1.0 - beta**t if enabled else 1.0  # float64, see DESIGN.md §3


def scale_(tensors: list[Tensor], scale: Tensor, found_inf: Tensor | None) -> None:
    """``t *= scale`` for every tensor, in opmath; flag non-finite inputs in ``found_inf``."""
    for t in tensors:
        if found_inf is not None and not bool(torch.isfinite(t).all()):
            found_inf.fill_(1.0)
        t.copy_(t.to(opmath_dtype(t.dtype)) * scale.to(opmath_dtype(t.dtype)))


def grad_norm(
    tensors: list[Tensor], norm_type: float, per_tensor: bool, grad_scale: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Global L2 or inf norm of ``tensors / grad_scale``, plus per-tensor norms and found_inf."""
    if norm_type not in (2.0, math.inf):
        raise ValueError(f"grad_norm supports norm_type 2.0 and inf, got {norm_type}")
    device = tensors[0].device if tensors else torch.device("cpu")
    opmath = (
        torch.float64
        if tensors and all(t.dtype == torch.float64 for t in tensors)
        else torch.float32
    )
    norms = [
        load_grad(t, opmath, grad_scale, None).norm(norm_type)
        if t.numel()
        else torch.zeros((), dtype=opmath, device=device)
        for t in tensors
    ]
    stacked = torch.stack(norms) if norms else torch.zeros((0,), dtype=opmath, device=device)
    if norm_type == 2.0:
        total = stacked.square().sum().sqrt()
    else:
        total = stacked.max() if norms else torch.zeros((), dtype=opmath, device=device)
    finite = all(bool(torch.isfinite(t).all()) for t in tensors)
    found_inf = torch.tensor(0.0 if finite else 1.0, dtype=torch.float32, device=device)
    per = stacked if per_tensor else torch.zeros((0,), dtype=opmath, device=device)
    return total, per, found_inf


def load_state(states: Sequence[Tensor], scales: Sequence[Tensor], i: int, opmath) -> Tensor:
    """State i in opmath: its values, or, where ``scales`` are given (8-bit states), its
    codes dequantized with its block absmaxes ([note: 8-bit states] in fusedopt/quant8.py)."""
    if scales:
        return quant8.dequantize(states[i], scales[i]).to(opmath)
    return states[i].to(opmath)


def store_state(
    value: Tensor, states: Sequence[Tensor], scales: Sequence[Tensor], i: int,
    sr_key: Tensor | None = None, stream: int = 0,
) -> None:  # fmt: skip
    """Writes ``value`` into state i: rounded to its dtype, or requantized (new block
    absmaxes, nearest codes: [note: 8-bit states]). With ``sr_key``, a bf16 state rounds
    stochastically with the bits of ``stream`` (state slot k of the op: k + 1; [note: state
    dtype] in csrc/include/fusedopt/dtype.h)."""
    if sr_key is not None and not scales and states[i].dtype == torch.bfloat16:
        states[i].copy_(round_stochastic(value, states[i], sr_key, i, stream))
    elif scales:
        codes, absmax = quant8.quantize(value.to(torch.float32), states[i].dtype == torch.int8)
        states[i].copy_(codes)
        scales[i].copy_(absmax)
    else:
        states[i].copy_(value)


def adamw_(
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales,
    master_params, steps, hypers, group_sizes, decoupled, amsgrad, maximize, bias_correction,
    lr_tensor, grad_scale, clip_coef, found_inf, master_sync=True, sr_key=None,
) -> None:  # fmt: skip
    """Adam (L2 decay) / AdamW (decoupled decay), as torch.optim.Adam/AdamW; with
    ``exp_avg_scales``/``exp_avg_sq_scales`` the moments are 8-bit ([note: 8-bit states])."""
    lr, beta1, beta2, eps, weight_decay = _columns(hypers, group_sizes)
    scalars = (lr, lr_tensor, grad_scale, clip_coef, found_inf, maximize, master_sync)
    for i, opmath, lr_i, g, p in _each_param(params, grads, master_params, *scalars):
        t = _next_step(steps[i])
        bc1 = _bias_correction(beta1[i], t, bias_correction)
        bc2 = _bias_correction(beta2[i], t, bias_correction)
        # [note: zero weight decay] As torch (``if weight_decay != 0``): a zero decay is no
        # decay, not p * (1 - lr*0) (NaN for lr = inf) nor g + 0*p (NaN for an infinite p).
        if weight_decay[i] != 0:
            if decoupled:
                p = p * (1 - lr_i * weight_decay[i])
            else:
                g = g + weight_decay[i] * p
        m = beta1[i] * load_state(exp_avgs, exp_avg_scales, i, opmath) + (1 - beta1[i]) * g
        v_old = load_state(exp_avg_sqs, exp_avg_sq_scales, i, opmath)
        v = beta2[i] * v_old + (1 - beta2[i]) * g * g
        v_hat = v
        if amsgrad:
            v_hat = torch.maximum(max_exp_avg_sqs[i].to(opmath), v)
        denom = sqrt_rn(v_hat) / math.sqrt(bc2) + eps[i]
        p = p - (lr_i / bc1) * m / denom
        # [note: state dtype]: the states in their own dtype, each bf16 one rounded
        # stochastically with the call's sr_key (state slot k: stream k + 1).
        store_state(m, exp_avgs, exp_avg_scales, i, sr_key, 1)
        store_state(v, exp_avg_sqs, exp_avg_sq_scales, i, sr_key, 2)
        if amsgrad:
            store_state(v_hat, max_exp_avg_sqs, (), i, sr_key, 3)
        _store_param(p, params[i], master_params, i, sr_key if _sr_param(params[i],
                     master_params) else None)  # fmt: skip


def _lamb_coefficients(i, t, beta1, beta2, grad_averaging, bias_correction):
    """beta3 (1 - beta1 with grad averaging, else 1), bc1 and sqrt(bc2) of tensor i at step t."""
    beta3 = 1 - beta1[i] if grad_averaging else 1.0
    bc1 = _bias_correction(beta1[i], t, bias_correction)
    return beta3, bc1, math.sqrt(_bias_correction(beta2[i], t, bias_correction))


def _lamb_update(m, v, p, bc1, sqrt_bc2, eps, weight_decay):
    """u = (m/bc1) / (sqrt(v)/sqrt(bc2) + eps) + wd*p (no decay term for wd == 0)."""
    u = (m / bc1) / (sqrt_rn(v) / sqrt_bc2 + eps)
    return u + weight_decay * p if weight_decay != 0 else u


def _lamb_two_pass(state, weight_decay, always_adapt, scales) -> bool:
    """Whether lamb_direction_ stores this tensor's new moments (lamb_apply_ then recomputes u
    from them): the tensor adapts and its states (``state``: its exp_avg) hold opmath values
    exactly: fp32 or fp64 storage, whatever the param ([note: state dtype]), not 8-bit codes
    (given with their ``scales``: those are written once, by lamb_apply_)."""
    exact = not scales and state.dtype in (torch.float32, torch.float64)
    return exact and (weight_decay != 0 or always_adapt)


def _lamb_moments(i, g, exp_avgs, exp_avg_sqs, scales, beta1, beta2, beta3, opmath):
    """The new moments of tensor i from its loaded grad, in opmath (``scales``: the block
    absmaxes of 8-bit moments, or two empty lists)."""
    m = beta1[i] * load_state(exp_avgs, scales[0], i, opmath) + beta3 * g
    v = beta2[i] * load_state(exp_avg_sqs, scales[1], i, opmath) + (1 - beta2[i]) * g * g
    return m, v


def lamb_direction_(
    params, grads, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales, master_params, steps,
    hypers, group_sizes, grad_averaging, bias_correction, trust_clip,
    always_adapt, lr_tensor, grad_scale, clip_coef, found_inf, master_sync=True, sr_key=None,
) -> Tensor:  # fmt: skip
    """LAMB's first pass (``fusedopt._contract.PHASE_OPS``): advances the steps, returns
    ``sq_norms`` [N, 2] (sum p², sum u² of each tensor that adapts, else 0) and stores the
    new moments of the tensors that take two passes (:func:`_lamb_two_pass`); 8-bit moments
    are read only ([note: 8-bit states] in fusedopt/quant8.py)."""
    lr, beta1, beta2, eps, weight_decay = _columns(hypers, group_sizes)
    opmath = opmath_dtype(params[0].dtype) if params else torch.float32
    device = params[0].device if params else torch.device("cpu")
    sq_norms = torch.zeros((len(params), 2), dtype=opmath, device=device)
    scales = (exp_avg_scales, exp_avg_sq_scales)
    scalars = (lr, lr_tensor, grad_scale, clip_coef, found_inf, False, master_sync)
    for i, opmath, _, g, p in _each_param(params, grads, master_params, *scalars):
        t = _next_step(steps[i])
        if weight_decay[i] == 0 and not always_adapt:
            continue
        beta3, bc1, sqrt_bc2 = _lamb_coefficients(i, t, beta1, beta2, grad_averaging,
                                                  bias_correction)  # fmt: skip
        m, v = _lamb_moments(i, g, exp_avgs, exp_avg_sqs, scales, beta1, beta2, beta3, opmath)
        u = _lamb_update(m, v, p, bc1, sqrt_bc2, eps[i], weight_decay[i])
        sq_norms[i, 0] = p.square().sum()
        sq_norms[i, 1] = u.square().sum()
        if _lamb_two_pass(exp_avgs[i], weight_decay[i], always_adapt, scales[0]):
            exp_avgs[i].copy_(m)
            exp_avg_sqs[i].copy_(v)
    return sq_norms


def lamb_apply_(
    params, grads, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales, master_params, steps,
    hypers, group_sizes, grad_averaging, bias_correction, trust_clip,
    always_adapt, sq_norms, lr_tensor, grad_scale, clip_coef, found_inf, master_sync=True,
    sr_key=None,
) -> None:  # fmt: skip
    """LAMB's second pass, after :func:`lamb_direction_`: trust ratios from ``sq_norms``, then
    ``p -= lr * (u * ratio)`` with u recomputed (from the stored new moments of a two-pass
    tensor, else from the grad and the old moments, which are then stored)."""
    lr, beta1, beta2, eps, weight_decay = _columns(hypers, group_sizes)
    scales = (exp_avg_scales, exp_avg_sq_scales)
    scalars = (lr, lr_tensor, grad_scale, clip_coef, found_inf, False, master_sync)
    for i, opmath, lr_i, g, p in _each_param(params, grads, master_params, *scalars):
        t = float(steps[i].item())  # advanced by lamb_direction_
        beta3, bc1, sqrt_bc2 = _lamb_coefficients(i, t, beta1, beta2, grad_averaging,
                                                  bias_correction)  # fmt: skip
        if _lamb_two_pass(exp_avgs[i], weight_decay[i], always_adapt, scales[0]):
            m, v = exp_avgs[i].to(opmath), exp_avg_sqs[i].to(opmath)  # g is not read
        else:
            m, v = _lamb_moments(i, g, exp_avgs, exp_avg_sqs, scales, beta1, beta2, beta3, opmath)
            # [note: state dtype]: bf16 states round stochastically with the call's sr_key
            store_state(m, exp_avgs, scales[0], i, sr_key, 1)
            store_state(v, exp_avg_sqs, scales[1], i, sr_key, 2)
        u = _lamb_update(m, v, p, bc1, sqrt_bc2, eps[i], weight_decay[i])
        ratio = 1.0
        if weight_decay[i] != 0 or always_adapt:
            w_norm, u_norm = sqrt_rn(sq_norms[i, 0].to(opmath)), sqrt_rn(sq_norms[i, 1].to(opmath))
            one = torch.ones((), dtype=opmath, device=p.device)
            ratio = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, one)
            if trust_clip:
                ratio = torch.clamp(ratio, max=1.0)
        p = p - lr_i * (u * ratio)
        _store_param(p, params[i], master_params, i, sr_key if _sr_param(params[i],
                     master_params) else None)  # fmt: skip


def lamb_(
    params, grads, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales, master_params, steps,
    hypers, group_sizes, grad_averaging, bias_correction, trust_clip,
    always_adapt, lr_tensor, grad_scale, clip_coef, found_inf, master_sync=True, sr_key=None,
) -> None:  # fmt: skip
    """LAMB with timm's semantics (DESIGN.md §3); the global clip arrives in clip_coef. Its two
    passes, :func:`lamb_direction_` then :func:`lamb_apply_`."""
    hypers_flags = (hypers, group_sizes, grad_averaging, bias_correction, trust_clip,
                    always_adapt)  # fmt: skip
    lists = (params, grads, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales,
             master_params, steps)  # fmt: skip
    scalars = (lr_tensor, grad_scale, clip_coef, found_inf, master_sync, sr_key)
    sq_norms = lamb_direction_(*lists, *hypers_flags, *scalars)
    lamb_apply_(*lists, *hypers_flags, sq_norms, *scalars)


def lion_(
    params, grads, exp_avgs, exp_avg_scales, master_params, hypers, group_sizes, maximize,
    lr_tensor, grad_scale, clip_coef, found_inf, master_sync=True, sr_key=None,
) -> None:  # fmt: skip
    """Lion (Chen et al. 2023, lion-pytorch), with sign(0) = 0; with ``exp_avg_scales`` the
    moment is 8-bit ([note: 8-bit states] in fusedopt/quant8.py)."""
    lr, beta1, beta2, weight_decay = _columns(hypers, group_sizes)
    scalars = (lr, lr_tensor, grad_scale, clip_coef, found_inf, maximize, master_sync)
    for i, opmath, lr_i, g, p in _each_param(params, grads, master_params, *scalars):
        m = load_state(exp_avgs, exp_avg_scales, i, opmath)
        p = p * (1 - lr_i * weight_decay[i])
        c = beta1[i] * m + (1 - beta1[i]) * g
        p = p - lr_i * torch.sign(c)
        store_state(beta2[i] * m + (1 - beta2[i]) * g, exp_avgs, exp_avg_scales, i, sr_key, 1)
        _store_param(p, params[i], master_params, i, sr_key if _sr_param(params[i],
                     master_params) else None)  # fmt: skip


def adan_(
    params, grads, exp_avgs, exp_avg_sqs, exp_avg_diffs, neg_pre_grads, master_params, steps,
    hypers, group_sizes, no_prox, lr_tensor, grad_scale, clip_coef,
    found_inf, master_sync=True, sr_key=None,
) -> None:  # fmt: skip
    """Adan (Xie et al. 2022), as the official sail-sg ``Adan``: betas are the EMA weights,
    ``neg_pre_grads`` keep ``-g`` of the previous step (taken as ``-g`` at step 1, so the
    grad difference starts at 0), every moment is bias-corrected."""
    lr, beta1, beta2, beta3, eps, weight_decay = _columns(hypers, group_sizes)
    scalars = (lr, lr_tensor, grad_scale, clip_coef, found_inf, False, master_sync)
    for i, opmath, lr_i, g, p in _each_param(params, grads, master_params, *scalars):
        t = _next_step(steps[i])
        b1, b2, b3 = beta1[i], beta2[i], beta3[i]
        bc1, bc2, bc3 = (_bias_correction(b, t, True) for b in (b1, b2, b3))
        neg_pre_grad = -g if t == 1 else neg_pre_grads[i].to(opmath)
        d = g + neg_pre_grad
        m = b1 * exp_avgs[i].to(opmath) + (1 - b1) * g
        v = b2 * exp_avg_diffs[i].to(opmath) + (1 - b2) * d
        u = b2 * d + g
        n = b3 * exp_avg_sqs[i].to(opmath) + (1 - b3) * u * u
        denom = sqrt_rn(n) / math.sqrt(bc3) + eps[i]
        # [note: zero weight decay]: a zero decay is none (no 1 - lr*0, NaN for lr = inf).
        decays = weight_decay[i] != 0
        if no_prox and decays:
            p = p * (1 - lr_i * weight_decay[i])
        p = p - (lr_i / bc1) * (m / denom)
        p = p - (lr_i * b2 / bc2) * (v / denom)
        if not no_prox and decays:
            p = p / (1 + lr_i * weight_decay[i])
        exp_avgs[i].copy_(m)
        exp_avg_sqs[i].copy_(n)
        exp_avg_diffs[i].copy_(v)
        neg_pre_grads[i].copy_(-g)
        _store_param(p, params[i], master_params, i, sr_key)


def _lerp(start: Tensor, end: Tensor, weight: float, one_minus_weight: float) -> Tensor:
    """torch's lerp formula (``aten/src/ATen/native/Lerp.h``), from the end nearer the weight,
    exact at weight 0 and 1; ``one_minus_weight`` is ``1 - weight`` as the caller rounds it."""
    if abs(weight) < 0.5:
        return start + weight * (end - start)
    return end - (end - start) * one_minus_weight


def schedulefree_adamw_(
    params, grads, zs, exp_avg_sqs, master_params, hypers, group_sizes,
    lr_tensor, grad_scale, clip_coef, found_inf, master_sync=True, sr_key=None,
) -> None:  # fmt: skip
    """Schedule-Free AdamW (Defazio et al. 2024), as the schedulefree package's
    ``AdamWScheduleFree.step``: the params hold y, ``zs`` the base sequence z. ``lr`` (with the
    warmup applied), ``ckp1`` and ``bias_correction2`` are the group's per-step scalars, which
    the caller computes on the host (``fusedopt.ScheduleFreeAdamW``); no step counts."""
    lr, beta1, beta2, eps, weight_decay, ckp1, bias_correction2 = _columns(hypers, group_sizes)
    scalars = (lr, lr_tensor, grad_scale, clip_coef, found_inf, False, master_sync)
    for i, opmath, lr_i, g, y in _each_param(params, grads, master_params, *scalars):
        b2, c = beta2[i], ckp1[i]
        v = b2 * exp_avg_sqs[i].to(opmath) + (1 - b2) * g * g
        u = g / (sqrt_rn(v / bias_correction2[i]) + eps[i])
        if weight_decay[i] != 0:  # [note: zero weight decay]; the decay is taken at y
            u = u + weight_decay[i] * y
        z = zs[i].to(opmath)
        y = _lerp(y, z, c, 1 - c)
        y = y + lr_i * (beta1[i] * (1 - c) - 1) * u
        zs[i].copy_(z - lr_i * u)
        exp_avg_sqs[i].copy_(v)
        _store_param(y, params[i], master_params, i, sr_key)


def sgd_(
    params, grads, momentum_buffers, momentum_buffer_scales, master_params, steps, hypers,
    group_sizes, nesterov, maximize, lr_tensor, grad_scale, clip_coef, found_inf,
    master_sync=True, sr_key=None,
) -> None:  # fmt: skip
    """SGD with momentum, dampening, Nesterov and weight decay, as torch.optim.SGD; with
    ``momentum_buffer_scales`` the buffers are 8-bit ([note: 8-bit states] in
    fusedopt/quant8.py): the step uses the new buffer, the state keeps its codes."""
    lr, momentum, dampening, weight_decay = _columns(hypers, group_sizes)
    scalars = (lr, lr_tensor, grad_scale, clip_coef, found_inf, maximize, master_sync)
    for i, opmath, lr_i, g, p in _each_param(params, grads, master_params, *scalars):
        if weight_decay[i] != 0:
            g = g + weight_decay[i] * p
        # [note: sgd momentum 0] A tensor whose momentum is 0 in a call with buffers (its
        # param group has none, another's has) steps as torch's momentum-free SGD: no
        # dampening, and its buffer and step count stay untouched, so that momentum switched
        # on later starts with buf = g, as torch's does.
        if momentum_buffers and momentum[i] != 0:
            first_step = _next_step(steps[i]) == 1.0
            if first_step:
                buf = g
            else:
                old = load_state(momentum_buffers, momentum_buffer_scales, i, opmath)
                buf = momentum[i] * old + (1 - dampening[i]) * g
            store_state(buf, momentum_buffers, momentum_buffer_scales, i, sr_key, 1)
            g = g + momentum[i] * buf if nesterov else buf
        p = p - lr_i * g
        _store_param(p, params[i], master_params, i, sr_key if _sr_param(params[i],
                     master_params) else None)  # fmt: skip


def _adafactor_eps1(eps1: float, param: Tensor, master_params: Sequence[Tensor]) -> float:
    """``eps1 < 0`` is torch's ``eps1=None``: the eps of the dtype the update runs on, the
    param's, or fp32 with master weights (torch's Adafactor stepping fp32 masters)."""
    if eps1 >= 0:
        return eps1
    return torch.finfo(torch.float32 if master_params else param.dtype).eps


def _adafactor_update(i, g, row_vars, col_vars, variances, eps1, opmath) -> Tensor:
    """The unclipped update ``u = g / sqrt(max(v, eps1²))`` of tensor i from its (new) second
    moments: ``v = row*col / max(mean(row, -2), eps1)`` when factored, else the variance."""
    if factored(g.shape):
        row, col = row_vars[i].to(opmath), col_vars[i].to(opmath)
        v = (row * col) / row.mean(dim=-2, keepdim=True).clamp(min=eps1)
    else:
        v = variances[i].to(opmath)
    return g / sqrt_rn(v.clamp(min=eps1 * eps1))


def adafactor_norms_(
    params, grads, row_vars, col_vars, variances, master_params, steps,
    hypers, group_sizes, maximize, lr_tensor, grad_scale, clip_coef, found_inf,
    master_sync=True, sr_key=None,
) -> Tensor:  # fmt: skip
    """Adafactor's reductions (``fusedopt._contract.PHASE_OPS``): advances the steps, folds
    g² into the second moments (``lerp`` with weight ``t**beta2_decay``, as torch) and
    returns ``sq_norms`` [N, 2]: ``sum p²`` (p before the decay) and ``sum u²``."""
    _, beta2_decay, eps1, _, _, _ = _columns(hypers, group_sizes)
    opmath = opmath_dtype(params[0].dtype) if params else torch.float32
    device = params[0].device if params else torch.device("cpu")
    sq_norms = torch.zeros((len(params), 2), dtype=opmath, device=device)
    scalars = ([0.0] * len(params), None, grad_scale, clip_coef, found_inf, maximize, master_sync)
    for i, opmath, _, g, p in _each_param(params, grads, master_params, *scalars):
        t = _next_step(steps[i])
        if g.numel() == 0:
            continue
        weight = t ** beta2_decay[i]
        if factored(g.shape):
            row_mean = g.square().mean(dim=-1, keepdim=True)
            col_mean = g.square().mean(dim=-2, keepdim=True)
            row_vars[i].copy_(torch.lerp(row_vars[i].to(opmath), row_mean, weight))
            col_vars[i].copy_(torch.lerp(col_vars[i].to(opmath), col_mean, weight))
        else:
            variances[i].copy_(torch.lerp(variances[i].to(opmath), g.square(), weight))
        e1 = _adafactor_eps1(eps1[i], params[i], master_params)
        u = _adafactor_update(i, g, row_vars, col_vars, variances, e1, opmath)
        sq_norms[i, 0] = p.square().sum()
        sq_norms[i, 1] = u.square().sum()
    return sq_norms


def adafactor_apply_(
    params, grads, row_vars, col_vars, variances, master_params, steps,
    hypers, group_sizes, maximize, sq_norms, lr_tensor, grad_scale, clip_coef, found_inf,
    master_sync=True, sr_key=None,
) -> None:  # fmt: skip
    """Adafactor's update, after :func:`adafactor_norms_`: per tensor, in float64,
    ``rho = min(lr, 1/sqrt(t))``, ``alpha = max(eps2, sqrt(sum p² / n)) * rho`` and
    ``clip = max(1, sqrt(sum u² / n) / d)``; then ``p = p*(1 - lr*wd) - (alpha/clip) * u``
    (no decay for wd = 0), u recomputed from the new second moments."""
    lr, _, eps1, eps2, d, weight_decay = _columns(hypers, group_sizes)
    scalars = (lr, lr_tensor, grad_scale, clip_coef, found_inf, maximize, master_sync)
    for i, opmath, lr_i, g, p in _each_param(params, grads, master_params, *scalars):
        n = g.numel()
        if n == 0:
            continue
        t = float(steps[i].item())
        lr_value = float(lr_i)  # a tensor lr is fp32: its value, as torch's _to_scalar
        rho = min(lr_value, 1.0 / math.sqrt(t))
        p_rms = math.sqrt(float(sq_norms[i, 0])) / math.sqrt(n)
        alpha = max(eps2[i], p_rms) * rho
        clip = max(1.0, math.sqrt(float(sq_norms[i, 1])) / (math.sqrt(n) * d[i]))
        e1 = _adafactor_eps1(eps1[i], params[i], master_params)
        u = _adafactor_update(i, g, row_vars, col_vars, variances, e1, opmath)
        if weight_decay[i] != 0:  # [note: zero weight decay]
            p = p * (1 - lr_value * weight_decay[i])
        p = p - (alpha / clip) * u
        _store_param(p, params[i], master_params, i, sr_key)


def adafactor_(
    params, grads, row_vars, col_vars, variances, master_params, steps,
    hypers, group_sizes, maximize, lr_tensor, grad_scale, clip_coef, found_inf,
    master_sync=True, sr_key=None,
) -> None:  # fmt: skip
    """Adafactor, as torch.optim.Adafactor (DESIGN.md §3): its passes,
    :func:`adafactor_norms_` then :func:`adafactor_apply_`."""
    lists = (params, grads, row_vars, col_vars, variances, master_params, steps)
    scalars = (lr_tensor, grad_scale, clip_coef, found_inf, master_sync, sr_key)
    sq_norms = adafactor_norms_(*lists, hypers, group_sizes, maximize, *scalars)
    adafactor_apply_(*lists, hypers, group_sizes, maximize, sq_norms, *scalars)


def _fma(a, b, c):
    """``a*b + c`` rounded once (the kernels' ``fmaf``): exact in fp64 for fp32 operands
    (a 48-bit product), then rounded to fp32; fp64 operands compute it plainly."""
    if isinstance(c, Tensor) and c.dtype == torch.float64:
        return a * b + c
    wide = [x.double() if isinstance(x, Tensor) else x for x in (a, b, c)]
    return (wide[0] * wide[1] + wide[2]).float()


def lerp(start: Tensor, end: Tensor, weight: float) -> Tensor:
    """torch.lerp's formula ([note: muon lerp] in csrc/include/fusedopt/math/muon.h): with
    ``w`` in opmath, ``start + w*(end - start)`` for ``|w| < 0.5``, else
    ``end + (w - 1)*(end - start)``, each one FMA (torch's vectorised CPU kernel)."""
    w = float(torch.tensor(weight, dtype=start.dtype))  # the weight rounded to opmath
    diff = end - start
    if abs(w) < 0.5:
        return _fma(torch.tensor(w, dtype=start.dtype), diff, start)
    return _fma(torch.tensor(w, dtype=start.dtype) - 1, diff, end)


def muon_momentum_(
    params, grads, momentum_buffers, ns_buffers, master_params, hypers, group_sizes, nesterov,
    lr_tensor, grad_scale, clip_coef, found_inf, master_sync=True, sr_key=None,
) -> None:  # fmt: skip
    """Muon's first pass (torch.optim.Muon): ``buf = lerp(buf, g, 1 - momentum)``; the
    Newton-Schulz input ``bf16(lerp(g, buf, momentum))`` with Nesterov, else ``bf16(buf)``,
    where ``buf`` is the stored (rounded) new buffer, as torch reads it."""
    _, momentum, *_ = _columns(hypers, group_sizes)
    lr = [0.0] * len(params)
    scalars = (lr, None, grad_scale, clip_coef, found_inf, False, master_sync)
    for i, opmath, _lr_i, g, _p in _each_param(params, grads, master_params, *scalars):
        buf = lerp(momentum_buffers[i].to(opmath), g, 1 - momentum[i])
        momentum_buffers[i].copy_(buf)
        buf = momentum_buffers[i].to(opmath)
        update = lerp(g, buf, momentum[i]) if nesterov else buf
        ns_buffers[i].copy_(update)


def muon_apply_(
    params, grads, momentum_buffers, ns_buffers, master_params, hypers, group_sizes, nesterov,
    lr_tensor, grad_scale, clip_coef, found_inf, master_sync=True, sr_key=None,
) -> None:  # fmt: skip
    """Muon's second pass: ``p = p*(1 - lr*wd)`` (rounded), then
    ``p = fma(-(lr*lr_ratio), O, p)``, O the Newton-Schulz output in ``ns_buffers``; the
    decay is applied for ``wd = 0`` too, as torch.optim.Muon. The per-tensor factors are
    computed in float64 and rounded to opmath, as torch's Python floats are."""
    if _skip(found_inf):
        return
    lr, _, weight_decay, lr_ratio, *_ = _columns(hypers, group_sizes)
    for i, param in enumerate(params):
        opmath = opmath_dtype(param.dtype)
        lr_i = float(_lr(lr, lr_tensor, i, opmath))
        p = _load_param(param, master_params, i, opmath, master_sync)
        decay = torch.tensor(1 - lr_i * weight_decay[i], dtype=opmath)
        step = torch.tensor(-(lr_i * lr_ratio[i]), dtype=opmath)
        p = _fma(step, ns_buffers[i].to(opmath), p * decay)
        _store_param(p, param, master_params, i, sr_key)


def muon_newton_schulz(
    params, grads, momentum_buffers, ns_buffers, master_params, hypers, group_sizes, nesterov,
    lr_tensor, grad_scale, clip_coef, found_inf, master_sync=True, sr_key=None,
) -> None:  # fmt: skip
    """The Newton-Schulz iteration of each ``ns_buffers[i]`` in place, one matrix at a time,
    with its row's ``ns_*`` hyperparameters (a host read of the table): what ``muon_`` runs
    between its passes in every backend. Nothing when ``found_inf`` is set."""
    from fusedopt.newton_schulz import newton_schulz_

    if _skip(found_inf):
        return
    _, _, _, _, ns_a, ns_b, ns_c, ns_eps, ns_steps = _columns(hypers, group_sizes)
    for i, x in enumerate(ns_buffers):
        newton_schulz_(x, ns_a[i], ns_b[i], ns_c[i], int(ns_steps[i]), ns_eps[i])


def muon_(
    params, grads, momentum_buffers, ns_buffers, master_params, hypers, group_sizes, nesterov,
    lr_tensor, grad_scale, clip_coef, found_inf, master_sync=True, sr_key=None,
) -> None:  # fmt: skip
    """Muon: :func:`muon_momentum_`, the Newton-Schulz iteration of each ``ns_buffers[i]``
    in place (:func:`muon_newton_schulz`), then :func:`muon_apply_`."""
    _check_matrices(params)
    args = (params, grads, momentum_buffers, ns_buffers, master_params, hypers, group_sizes,
            nesterov, lr_tensor, grad_scale, clip_coef, found_inf, master_sync,
            sr_key)  # fmt: skip
    muon_momentum_(*args)
    muon_newton_schulz(*args)
    muon_apply_(*args)


def _check_matrices(params) -> None:
    for i, p in enumerate(params):
        if p.dim() != 2:
            raise ValueError(
                f"muon_: params[{i}] has shape {tuple(p.shape)}; Muon steps 2-D params"
            )


def compose_muon(momentum_pass, apply_pass):
    """``muon_`` of a backend whose passes are ops of their own (cpu and cuda: fusedopt._C
    has no launcher for the whole step, [note: muon passes] in fusedopt/optim/muon.py): the
    2-D check, the momentum pass, :func:`muon_newton_schulz`, the apply pass."""

    def muon(*args) -> None:
        _check_matrices(args[0])
        momentum_pass(*args)
        muon_newton_schulz(*args)
        apply_pass(*args)

    return muon
