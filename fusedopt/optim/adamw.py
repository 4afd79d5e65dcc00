"""``fusedopt.AdamW`` and ``fusedopt.Adam``: torch.optim's constructors, one ``adamw_`` op."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fusedopt.optim._base import FusedOptimizer, Params, check_betas, check_nonnegative
from fusedopt.optim._state_bits import check_state_bits_value


def check_adam_group(group: dict[str, Any]) -> None:
    """torch's ValueErrors for the hyperparameters Adam, AdamW and LAMB share."""
    check_nonnegative("eps", group["eps"], "epsilon value")
    check_betas(group["betas"])
    check_nonnegative("weight_decay", group["weight_decay"], "weight_decay value")


def adam_hypers(group: dict[str, Any]) -> dict[str, Any]:
    """A group's per-tensor hyperparameters as the ``adamw_`` and ``lamb_`` ops name them."""
    beta1, beta2 = group["betas"]
    return dict(
        lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
        weight_decay=group["weight_decay"],
    )  # fmt: skip


class Adam(FusedOptimizer):
    """``torch.optim.Adam`` (L2 weight decay ``g += wd*p``; ``decoupled_weight_decay=True`` is
    AdamW), fused. Same arguments and defaults as torch; ``foreach``/``fused`` are accepted
    and ignored. See :class:`~fusedopt.optim._base.FusedOptimizer` for ``master_weights``,
    ``max_grad_norm``, ``capturable`` and ``backend``.

    State per param: ``step`` (0-d fp32, on the param's device), ``exp_avg``, ``exp_avg_sq``,
    ``max_exp_avg_sq`` (amsgrad), ``master_param`` (master weights).

    ``state_bits=8`` (a group key; default None: states in the param's dtype, fp32 with
    master weights) keeps ``exp_avg`` as int8 and ``exp_avg_sq`` as uint8 codes with one fp32
    absmax per 256-element block of a row in ``exp_avg_scale`` / ``exp_avg_sq_scale``:
    ~2.03 bytes per param instead of 8 ([note: 8-bit states] in fusedopt/quant8.py). Params
    must be contiguous, not fp64; not with amsgrad. Switching it mid-run (group key, or a
    state dict saved with the other setting) converts the states at the next step.

    ``state_dtype`` (a group key; default None: the rule above) stores ``exp_avg``,
    ``exp_avg_sq`` and ``max_exp_avg_sq`` as torch.float32, torch.bfloat16 or torch.float16
    whatever the param (fp32 params, or bf16/fp16 params with fp32 masters, with 16-bit
    moments, as torch's fused AdamW and Transformer Engine's ``exp_avg_dtype`` allow); the
    math stays fp32. With ``stochastic_rounding=True`` every bf16 store of the step rounds
    stochastically, the moments included (round to nearest cannot decay a bf16
    ``exp_avg_sq`` at beta2 = 0.999); fp16 states take round to nearest only. Not with
    ``state_bits=8`` nor fp64 params. States are saved in their dtype; a state dict with
    other dtypes converts when loaded, a changed key at the next step ([note: state dtype] in
    ``csrc/include/fusedopt/dtype.h``).
    """

    OP = "adamw_"
    STEPS_COMPLEX = True  # as torch ([note: complex params] in _base.py)
    #: AdamW is decoupled whatever a loaded group says.
    _ALWAYS_DECOUPLED = False

    def __init__(
        self, params: Params, lr: float | Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False, *,
        foreach: bool | None = None, maximize: bool = False, capturable: bool = False,
        differentiable: bool = False, fused: bool | None = None,
        decoupled_weight_decay: bool = False,
        master_weights: bool | str = False, master_sync: bool = True,
        stochastic_rounding: bool = False,
        max_grad_norm: float | None = None, backend: str = "auto", grad_norm_group: Any = None,
        state_bits: int | None = None, state_dtype: torch.dtype | None = None,
    ) -> None:  # fmt: skip
        self._init_from_arguments(locals(), betas=_float_pair(betas))

    @staticmethod
    def _check_group(group: dict[str, Any]) -> None:
        check_adam_group(group)
        check_state_bits_value(group)

    def _state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        base = ("step", "exp_avg", "exp_avg_sq")
        if group.get("state_bits") == 8:  # [note: 8-bit states] in fusedopt/quant8.py
            return (*base, "exp_avg_scale", "exp_avg_sq_scale")
        return (*base, "max_exp_avg_sq") if group["amsgrad"] else base

    _hypers = staticmethod(adam_hypers)

    def _flags(self, group: dict[str, Any]) -> dict[str, bool]:
        return dict(
            decoupled=self._ALWAYS_DECOUPLED or bool(group["decoupled_weight_decay"]),
            amsgrad=bool(group["amsgrad"]), maximize=bool(group["maximize"]),
            bias_correction=True,
        )  # fmt: skip


class AdamW(Adam):
    """``torch.optim.AdamW`` (decoupled weight decay ``p *= 1 - lr*wd``), fused.

    Same arguments and defaults as torch (``weight_decay=1e-2``); ``foreach``/``fused`` are
    accepted and ignored. See :class:`Adam` for the state and the fusedopt extras.
    """

    _ALWAYS_DECOUPLED = True

    def __init__(
        self, params: Params, lr: float | Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *,
        maximize: bool = False, foreach: bool | None = None, capturable: bool = False,
        differentiable: bool = False, fused: bool | None = None,
        master_weights: bool | str = False, master_sync: bool = True,
        stochastic_rounding: bool = False,
        max_grad_norm: float | None = None, backend: str = "auto", grad_norm_group: Any = None,
        state_bits: int | None = None, state_dtype: torch.dtype | None = None,
    ) -> None:  # fmt: skip
        self._init_from_arguments(locals(), betas=_float_pair(betas), decoupled_weight_decay=True)


def _float_pair(betas: Any) -> Any:
    """Two betas of one kind (floats, or Tensors read once here) as a tuple of floats; a
    mixed pair stays as given for ``check_betas`` to refuse, as torch does."""
    pair = (
        isinstance(betas, (tuple, list))
        and len(betas) == 2
        and isinstance(betas[0], Tensor) == isinstance(betas[1], Tensor)
    )
    return tuple(float(b) for b in betas) if pair else betas
