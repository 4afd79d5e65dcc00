"""``fusedopt.Adan``: the official Adan's (sail-sg/Adan) constructor, one ``adan_`` op."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fusedopt.optim._base import FusedOptimizer, Params, check_nonnegative


class Adan(FusedOptimizer):
    """Adan (Xie et al. 2022, "Adan: Adaptive Nesterov Momentum Algorithm") with the official
    implementation's arguments and defaults, fused.

    ``betas`` are the EMA weights (the paper's ``1 - beta``): with ``d = g - g_prev`` (0 at the
    first step), ``m = b1*m + (1-b1)*g``, ``v = b2*v + (1-b2)*d``,
    ``n = b3*n + (1-b3)*(g + b2*d)**2`` and ``u = (m/bc1 + b2*v/bc2) / (sqrt(n/bc3) + eps)``;
    ``no_prox=False`` (the default) steps ``p = (p - lr*u) / (1 + lr*wd)``, ``no_prox=True``
    ``p = p*(1 - lr*wd) - lr*u``. ``max_grad_norm=0.0`` (the default) does not clip; a
    positive one clips the global norm with the official coefficient
    ``min(1, max_grad_norm / (norm + eps))`` (``eps`` of the last group, as the official code).
    ``foreach``/``fused`` are accepted and ignored. See
    :class:`~fusedopt.optim._base.FusedOptimizer` for ``master_weights``, ``capturable`` and
    ``backend``.

    State per param: ``step`` (0-d fp32 on the param's device; the official code counts
    ``group["step"]``, the same count unless a param misses grads on some steps),
    ``exp_avg``, ``exp_avg_sq``, ``exp_avg_diff``, ``neg_pre_grad`` (``-g`` of the previous
    step, after unscaling and clipping, as the official state) and ``master_param`` (master
    weights).
    """

    OP = "adan_"

    def __init__(
        self, params: Params, lr: float | Tensor = 1e-3,
        betas: tuple[float, float, float] = (0.98, 0.92, 0.99), eps: float = 1e-8,
        weight_decay: float = 0.0, max_grad_norm: float = 0.0, no_prox: bool = False,
        foreach: bool = True, fused: bool = False, *,
        capturable: bool = False, master_weights: bool | str = False, master_sync: bool = True,
        stochastic_rounding: bool = False,
        backend: str = "auto", grad_norm_group: Any = None,
    ) -> None:  # fmt: skip
        if max_grad_norm is not None and not max_grad_norm >= 0.0:
            raise ValueError(f"Invalid Max grad norm: {max_grad_norm}")
        self._init_from_arguments(locals(), betas=tuple(betas), max_grad_norm=max_grad_norm or None)

    @classmethod
    def _check_group(cls, group: dict[str, Any]) -> None:
        if group.get("max_grad_norm") == 0.0:  # the official "no clip" (a loaded official group)
            group["max_grad_norm"] = None
        check_nonnegative("eps", group["eps"], "epsilon value")
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 3:
            raise ValueError(f"betas must be three floats, got {betas!r}")
        for i, beta in enumerate(betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {beta}")

    def _state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("step", "exp_avg", "exp_avg_sq", "exp_avg_diff", "neg_pre_grad")

    def _hypers(self, group: dict[str, Any]) -> dict[str, Any]:
        beta1, beta2, beta3 = group["betas"]
        return dict(
            lr=group["lr"], beta1=beta1, beta2=beta2, beta3=beta3, eps=group["eps"],
            weight_decay=group["weight_decay"],
        )  # fmt: skip

    def _flags(self, group: dict[str, Any]) -> dict[str, bool]:
        return dict(no_prox=bool(group["no_prox"]))

    def _fix_loaded_group(self, group: dict[str, Any], states: dict[Tensor, dict]) -> None:
        """An official Adan state dict counts steps per group (``group["step"]``, an int) and
        keeps none per param: each param of the group takes the group's count."""
        count = group.pop("step", None)
        for p, state in states.items():
            if "step" not in state and count is not None:
                state["step"] = torch.tensor(float(count), dtype=torch.float32, device=p.device)

    def _clip_coef(self, norm: Tensor, max_grad_norm: float) -> Tensor:
        """The official Adan's global clip: ``min(1, max_grad_norm / (norm + eps))``."""
        eps = self.param_groups[-1]["eps"]
        return torch.clamp(max_grad_norm / (norm + eps), max=1.0)
