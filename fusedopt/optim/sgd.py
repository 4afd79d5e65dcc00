"""``fusedopt.SGD``: torch.optim.SGD's constructor, one ``sgd_`` op."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fusedopt.clip import local_tensor
from fusedopt.optim._base import FusedOptimizer, Params, check_nonnegative
from fusedopt.optim._state_bits import check_state_bits_value, with_scales


class SGD(FusedOptimizer):
    """``torch.optim.SGD`` (momentum, dampening, Nesterov, L2 weight decay, maximize), fused.

    Same arguments and defaults as torch; ``foreach``/``fused`` are accepted and ignored. See
    :class:`~fusedopt.optim._base.FusedOptimizer` for the fusedopt extras.

    State per param, only when ``momentum != 0``: ``momentum_buffer`` and ``step`` (0-d fp32
    on the device). torch's SGD has no ``step``: the ``sgd_`` op needs it to apply torch's
    first-step rule (``buf = g``) on the device without a host sync. A fusedopt state dict
    loads into torch.optim.SGD as is (torch ignores ``step``); a torch SGD state dict that
    has a ``momentum_buffer`` but no ``step`` loads with ``step = 1`` (the buffer exists, so
    its first step is behind it).

    ``state_bits=8`` (a group key, as :class:`~fusedopt.AdamW`'s) keeps ``momentum_buffer``
    as int8 codes with one fp32 absmax per 256-element block of a row in
    ``momentum_buffer_scale`` ([note: 8-bit states] in fusedopt/quant8.py). With
    ``momentum=0`` there is no buffer to keep, and ``state_bits=8`` changes nothing (as
    torch keeps no buffer then): a setting shared by groups with and without momentum holds
    for each, and a momentum switched on later starts an 8-bit buffer.

    ``state_dtype`` (a group key; default None: fp32 with master weights, else the param's
    dtype) stores ``momentum_buffer`` as torch.float32, torch.bfloat16 or torch.float16
    whatever the param, as :class:`~fusedopt.AdamW`'s does; the math stays fp32. With
    ``stochastic_rounding=True`` every bf16 store of the step rounds stochastically, the
    buffer included (round to nearest stalls a bf16 buffer at momentum close to 1); fp16
    states take round to nearest only. Not with ``state_bits=8`` nor fp64 params ([note:
    state dtype] in ``csrc/include/fusedopt/dtype.h``).
    """

    OP = "sgd_"
    STEPS_COMPLEX = True  # as torch ([note: complex params] in _base.py)

    def __init__(
        self, params: Params, lr: float | Tensor = 1e-3, momentum: float = 0.0,
        dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False, *,
        maximize: bool = False, foreach: bool | None = None, differentiable: bool = False,
        fused: bool | None = None, capturable: bool = False,
        master_weights: bool | str = False, master_sync: bool = True,
        stochastic_rounding: bool = False,
        max_grad_norm: float | None = None, backend: str = "auto", grad_norm_group: Any = None,
        state_bits: int | None = None, state_dtype: torch.dtype | None = None,
    ) -> None:  # fmt: skip
        self._init_from_arguments(locals())

    @classmethod
    def _check_group(cls, group: dict[str, Any]) -> None:
        check_nonnegative("momentum", group["momentum"], "momentum value")
        check_nonnegative("weight_decay", group["weight_decay"], "weight_decay value")
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        check_state_bits_value(group)

    def _state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        keys = ("step", "momentum_buffer") if group["momentum"] != 0 else ()
        return with_scales(self.OP, group, keys)

    def _hypers(self, group: dict[str, Any]) -> dict[str, Any]:
        return dict(
            lr=group["lr"], momentum=group["momentum"], dampening=group["dampening"],
            weight_decay=group["weight_decay"],
        )  # fmt: skip

    def _flags(self, group: dict[str, Any]) -> dict[str, bool]:
        return dict(nesterov=bool(group["nesterov"]), maximize=bool(group["maximize"]))

    def _fix_loaded_state(self, group: dict[str, Any], param: Tensor, state: dict) -> None:
        if "momentum_buffer" in state and "step" not in state:
            device = local_tensor(param).device
            state["step"] = torch.ones((), dtype=torch.float32, device=device)
