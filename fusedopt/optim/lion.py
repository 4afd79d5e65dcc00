"""``fusedopt.Lion``: lion-pytorch's constructor, one ``lion_`` op."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fusedopt.optim._base import FusedOptimizer, Params, check_betas, check_nonnegative
from fusedopt.optim._state_bits import check_state_bits_value, with_scales


class Lion(FusedOptimizer):
    """Lion (Chen et al. 2023) with lion-pytorch's arguments and defaults, fused.

    ``p *= 1 - lr*wd; p -= lr * sign(b1*m + (1-b1)*g); m = b2*m + (1-b2)*g`` with
    ``sign(0) = 0``. As in lion-pytorch, ``decoupled_weight_decay=True`` divides the weight
    decay by the constructor's lr (so the decay does not shrink with a scheduled lr);
    ``use_triton`` is accepted and ignored (the backend decides). ``maximize`` is a fusedopt
    extra. State per param: ``exp_avg`` (and ``master_param``); Lion keeps no step count.

    ``state_bits=8`` (a group key, as :class:`~fusedopt.AdamW`'s) keeps ``exp_avg`` as int8
    codes with one fp32 absmax per 256-element block of a row in ``exp_avg_scale``: ~1.02
    bytes per param instead of 4 ([note: 8-bit states] in fusedopt/quant8.py).

    ``state_dtype`` (a group key; default None: fp32 with master weights, else the param's
    dtype) stores ``exp_avg`` as torch.float32, torch.bfloat16 or torch.float16 whatever the
    param, as :class:`~fusedopt.AdamW`'s does; the math stays fp32. With
    ``stochastic_rounding=True`` every bf16 store of the step rounds stochastically, ``exp_avg``
    included (round to nearest stalls a bf16 ``exp_avg`` at beta2 = 0.99 once the grad's
    share is below half its ulp); fp16 states take round to nearest only. Not with
    ``state_bits=8`` nor fp64 params ([note: state dtype] in
    ``csrc/include/fusedopt/dtype.h``).
    """

    OP = "lion_"

    def __init__(
        self, params: Params, lr: float | Tensor = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0, use_triton: bool = False,
        decoupled_weight_decay: bool = False, *, maximize: bool = False, capturable: bool = False,
        master_weights: bool | str = False, master_sync: bool = True,
        stochastic_rounding: bool = False,
        max_grad_norm: float | None = None, backend: str = "auto", grad_norm_group: Any = None,
        state_bits: int | None = None, state_dtype: torch.dtype | None = None,
    ) -> None:  # fmt: skip
        del use_triton  # lion-pytorch's kernel switch; fusedopt picks by `backend`
        if not isinstance(lr, Tensor) and not lr > 0.0:
            raise ValueError(f"Invalid learning rate: {lr} (Lion needs lr > 0)")
        self._init_lr = float(lr)
        self._init_from_arguments(locals(), betas=tuple(betas))

    @classmethod
    def _check_group(cls, group: dict[str, Any]) -> None:
        check_betas(group["betas"], inclusive_upper=True)  # lion-pytorch allows 1.0
        check_nonnegative("weight_decay", group["weight_decay"], "weight_decay value")
        check_state_bits_value(group)

    def _state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        return with_scales(self.OP, group, ("exp_avg",))

    def _hypers(self, group: dict[str, Any]) -> dict[str, Any]:
        beta1, beta2 = group["betas"]
        wd = group["weight_decay"]
        if group["decoupled_weight_decay"]:
            wd = wd / getattr(self, "_init_lr", self.defaults["lr"])
        return dict(lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=wd)

    def _flags(self, group: dict[str, Any]) -> dict[str, bool]:
        return dict(maximize=bool(group["maximize"]))
