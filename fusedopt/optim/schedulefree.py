"""``fusedopt.ScheduleFreeAdamW``: the schedulefree package's ``AdamWScheduleFree``
constructor, state dict and ``train()``/``eval()`` switch; one ``schedulefree_adamw_`` op."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from fusedopt._validate import LOW_PRECISION
from fusedopt.optim._base import FusedOptimizer, check_betas, check_nonnegative
from fusedopt.optim._keys import KAHAN_KEY, MASTER_KEY, REMAINDER_KEY
from fusedopt.reference.ops import join_kahan, join_master, split_kahan, split_master

#: The group keys the schedulefree package keeps on the host, advanced at every step.
_SCHEDULE_KEYS = ("k", "lr_max", "weight_sum", "scheduled_lr")


class ScheduleFreeAdamW(FusedOptimizer):
    """Schedule-Free AdamW (Defazio et al. 2024, "The Road Less Scheduled") with the
    schedulefree package's ``AdamWScheduleFree`` arguments, defaults, state dict and
    ``train()``/``eval()`` switch, fused into one op per step.

    In train mode the params hold y, the point where grads are taken; ``eval()`` moves them to
    the average x (``x = y + (1/beta1 - 1)(y - z)``... exactly the anchor's
    ``p.lerp_(z, 1 - 1/beta1)``) and ``train()`` back (``p.lerp_(z, 1 - beta1)``). A step in
    eval mode raises, as the anchor's. Unlike the anchor, the optimizer starts in train mode
    (the anchor starts in eval mode and raises at a step until ``train()`` is called; code
    written for it calls ``train()`` first, which is then a no-op here).

    Each step, per group, on the host and in float64 as the anchor: with ``k`` the steps
    taken, ``lr_k = lr * min(1, (k+1)/warmup_steps)``, ``lr_max = max(lr_max, lr_k)``,
    ``weight = (k+1)**r * lr_max**weight_lr_power``, ``weight_sum += weight``,
    ``ckp1 = weight / weight_sum`` (0 when ``weight_sum`` is 0) and
    ``bias_correction2 = 1 - beta2**(k+1)``; they reach the op as columns of its
    hyperparameter table, which is therefore rewritten at every step (G x 7 float64 values,
    one host-to-device copy). Then per element ``v = b2*v + (1-b2)*g*g``,
    ``u = g / (sqrt(v / bias_correction2) + eps) + weight_decay*y``,
    ``y = lerp(y, z, ckp1) + lr_k*(b1*(1-ckp1) - 1)*u``, ``z -= lr_k*u``.

    Consequences of the host scalars: a step whose ``found_inf`` is set (a GradScaler) reads
    it on the host (one sync) to take back the group's advance of ``k``, ``lr_max`` and
    ``weight_sum``, as the anchor's step would not have run; a tensor ``lr`` is read on the
    host at every step (one sync); under ``torch.compile`` the changing group values make
    Dynamo recompile once, after which it traces them as dynamic (2 graphs over 5 compiled
    steps, torch 2.14.1); a captured CUDA graph would replay the captured scalars, so a
    graph-captured step is not supported.

    Unlike the anchor, the grads are not overwritten (the anchor divides them in place). The
    extras: ``max_grad_norm`` (torch's clip, inside the step), ``master_weights``,
    ``master_sync``, ``backend`` (see :class:`~fusedopt.optim._base.FusedOptimizer`); with
    master weights, ``train()``/``eval()`` move the fp32 master (after adopting what was
    written into the param, with ``master_sync``) and round it into the param. ``foreach`` is
    accepted and ignored.

    State per param: ``z``, ``exp_avg_sq`` (and ``master_param``); per group, as the anchor:
    ``k``, ``lr_max``, ``weight_sum``, ``scheduled_lr``, ``train_mode``.
    """

    OP = "schedulefree_adamw_"

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 0.0025,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
        foreach: bool | None = True,
        *,
        master_weights: bool = False,
        master_sync: bool = True,
        stochastic_rounding: bool = False,
        max_grad_norm: float | None = None,
        capturable: bool = False,
        backend: str = "auto",
        grad_norm_group: Any = None,
    ) -> None:
        self._init_from_arguments(
            locals(), betas=tuple(betas), k=0, train_mode=True, weight_sum=0.0, lr_max=-1.0,
            scheduled_lr=0.0,
        )  # fmt: skip

    @classmethod
    def _check_group(cls, group: dict[str, Any]) -> None:
        check_betas(group["betas"])
        check_nonnegative("eps", group["eps"], "epsilon value")
        check_nonnegative("weight_decay", group["weight_decay"], "weight_decay value")
        check_nonnegative("warmup_steps", group["warmup_steps"], "warmup_steps value")

    def _state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("z", "exp_avg_sq")

    def _flags(self, group: dict[str, Any]) -> dict[str, bool]:
        return {}

    def _hypers(self, group: dict[str, Any]) -> dict[str, Any]:
        """The step's columns, from the group as :meth:`_advance` left it (``k`` counts this
        step): the same float64 expressions as the anchor's."""
        beta1, beta2 = group["betas"]
        k = group["k"]
        weight = (k ** group["r"]) * (group["lr_max"] ** group["weight_lr_power"])
        weight_sum = group["weight_sum"]
        return dict(
            lr=group["scheduled_lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
            weight_decay=group["weight_decay"],
            ckp1=weight / weight_sum if weight_sum != 0 else 0.0,
            bias_correction2=1 - beta2**k,
        )  # fmt: skip

    @staticmethod
    def _advance(group: dict[str, Any]) -> None:
        """The anchor's host update of a group at a step: warmup lr, ``lr_max``,
        ``weight_sum``, ``k`` (every group, with grads or not, as the anchor)."""
        k, warmup_steps = group["k"], group["warmup_steps"]
        sched = (k + 1) / warmup_steps if k < warmup_steps else 1.0
        lr = group["lr"]
        lr = (float(lr) if isinstance(lr, Tensor) else lr) * sched  # a tensor lr: read here
        group["scheduled_lr"] = lr
        group["lr_max"] = lr_max = max(lr, group["lr_max"])
        group["weight_sum"] = group["weight_sum"] + ((k + 1) ** group["r"]) * (
            lr_max ** group["weight_lr_power"]
        )
        group["k"] = k + 1

    def step(self, closure: Any = None) -> Any:
        """One step (see the class); raises in eval mode, as the anchor."""
        if not self.param_groups[0]["train_mode"]:
            raise RuntimeError(
                "Optimizer was not in train mode when step is called. Please insert .train() "
                "and .eval() calls on the optimizer. See documentation for details."
            )
        return super().step(closure)

    @torch.no_grad()
    def _fused_step(self) -> None:
        # Kept in _step_out ([note: no setattr in step]) until _after_step knows whether the
        # step ran.
        before = [{key: group[key] for key in _SCHEDULE_KEYS} for group in self.param_groups]
        self._step_out["schedule_before"] = before
        for group in self.param_groups:
            self._advance(group)
        try:
            super()._fused_step()
        except BaseException:  # bad input raised before any tensor was touched: undo
            self._step_out.pop("schedule_before", None)
            for group, saved in zip(self.param_groups, before, strict=True):
                group.update(saved)
            raise

    def _after_step(self, found_inf: Tensor | None) -> None:
        """A step skipped on the device (``found_inf``) did not happen for the schedule
        either: the anchor's step is not called then. One host read, only under a scaler."""
        before = self._step_out.pop("schedule_before", None)
        if found_inf is not None and before is not None and bool(found_inf.item() != 0):
            for group, saved in zip(self.param_groups, before, strict=True):
                group.update(saved)

    def _init_state(self, group: dict[str, Any], p: Tensor) -> dict[str, Tensor]:
        """z starts at the param (its master's value with master weights), as the anchor's."""
        state = self.state[p]
        if "z" not in state:
            dtype = torch.float32 if self._uses_master(group, p) else p.dtype
            state["z"] = p.detach().to(dtype=dtype, memory_format=torch.preserve_format, copy=True)
        return super()._init_state(group, p)

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict, each group with ``foreach`` (the anchor's default, True): the
        anchor's step reads it, and fusedopt keeps no such key (it is always fused)."""
        state = super().state_dict()
        for group in state["param_groups"]:
            group.setdefault("foreach", True)
        return state

    # ----------------------------------------------------------------- train / eval
    @torch.no_grad()
    def _move(self, to_train: bool) -> None:
        """Move every param with a z between y (train) and x (eval), as the anchor's
        ``p.lerp_(z, w)``: ``w = 1 - beta1`` to y, ``1 - 1/beta1`` to x; groups already in
        that mode are left alone. With master weights the master moves (after adopting the
        param's writes, with ``master_sync``) and is rounded into the param."""
        for group in self.param_groups:
            if bool(group["train_mode"]) == to_train:
                continue
            beta1, _ = group["betas"]
            weight = 1 - beta1 if to_train else 1 - 1 / beta1
            for p in group["params"]:
                state = self.state.get(p, {})
                if "z" not in state:
                    continue
                remainder = state.get(REMAINDER_KEY)
                if remainder is not None:  # [note: compact master]: join, move, split
                    master = join_master(p, remainder).lerp_(state["z"].to(p.device), weight)
                    rounded, new_remainder = split_master(master)
                    p.copy_(rounded)
                    remainder.copy_(new_remainder)
                    continue
                compensation = state.get(KAHAN_KEY)
                if compensation is not None:  # [note: kahan master]: join, move, split
                    master = join_kahan(p, compensation).lerp_(state["z"].to(p.device), weight)
                    rounded, new_compensation = split_kahan(master, p.dtype)
                    p.copy_(rounded)
                    compensation.copy_(new_compensation)
                    continue
                master = state.get(MASTER_KEY)
                if master is None or p.dtype not in LOW_PRECISION:
                    p.lerp_(state["z"].to(p.device), weight)
                    continue
                if group.get("master_sync", True):  # [note: master sync]
                    written = master.to(p.dtype).view(torch.int16) != p.view(torch.int16)
                    master.copy_(torch.where(written, p.to(torch.float32), master))
                master.lerp_(state["z"].to(master.device), weight)
                p.copy_(master)
            group["train_mode"] = to_train

    def train(self) -> None:
        """Put the params at y, where the grads of training are taken (the anchor's
        ``train()``)."""
        self._move(True)

    def eval(self) -> None:
        """Put the params at x, the average to evaluate and save (the anchor's ``eval()``)."""
        self._move(False)
