"""``fusedopt.Muon``: torch.optim.Muon's constructor; matrices through Muon's two fused
passes around a batched Newton-Schulz iteration, every other param through ``adamw_``."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from fusedopt import ops
from fusedopt._contract import STEP_OPS
from fusedopt.clip import local_tensor
from fusedopt.newton_schulz import newton_schulz_
from fusedopt.ops import StepHypers
from fusedopt.optim._base import FusedOptimizer, check_betas, check_nonnegative

#: torch.optim.Muon's defaults (Keller Jordan's coefficients).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
ADJUST_LR_FNS = ("original", "match_rms_adamw", "spectral_unclamped")


def adjust_lr_ratio(adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """The factor torch.optim.Muon multiplies lr by for a ``[rows, cols]`` param (float64):
    ``original`` (None) ``sqrt(max(1, rows/cols))`` (Keller Jordan), ``match_rms_adamw``
    ``0.2*sqrt(max(rows, cols))`` (Moonshot, Liu et al. 2025), ``spectral_unclamped``
    ``sqrt(rows/cols)`` (Bernstein, "Deriving Muon")."""
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    if adjust_lr_fn == "spectral_unclamped":
        return math.sqrt(rows / cols)
    raise ValueError(f"Adjust learning rate function {adjust_lr_fn} is not supported")


class Muon(FusedOptimizer):
    """Muon (Jordan et al. 2024; torch.optim.Muon's arguments, defaults and arithmetic),
    fused, with AdamW for the params Muon is not for.

    A param group is a Muon group or an AdamW group (group key ``use_muon``). Muon groups
    take 2-D params: ``buf = lerp(buf, g, 1 - momentum)``; ``u = lerp(g, buf, momentum)``
    (``nesterov``, the default) or ``buf``; ``O`` = ``ns_steps`` Newton-Schulz steps with
    ``ns_coefficients`` on ``bf16(u) / max(|u|_F, eps)`` in bf16 (transposed when
    rows > cols); ``p = p*(1 - lr*weight_decay) - lr*ratio*O``, ``ratio`` from
    ``adjust_lr_fn`` (:func:`adjust_lr_ratio`). AdamW groups step torch's AdamW with the
    group's ``lr`` and ``weight_decay`` and ``adamw_betas``, ``adamw_eps``.

    ``use_muon=None`` (the default) decides by shape: 2-D params are Muon's; a group holding
    both 2-D and other params is split into two groups where it is added (its 2-D params,
    then the others), so an embedding or output matrix must be put in a group with
    ``use_muon=False`` by hand, as practice wants. ``use_muon=True`` on a param that is not
    2-D raises torch.optim.Muon's ValueError.

    [note: muon passes] A Muon step is two fused elementwise passes with torch's GEMMs in
    between: ``muon_momentum_`` (reads g, buf; writes buf and the bf16 Newton-Schulz input
    into a per-shape stacked scratch ``[B, rows, cols]``), the Newton-Schulz iteration of
    each stack (``fusedopt.newton_schulz.newton_schulz_``: one bmm/baddbmm chain per shape
    and set of NS hyperparameters, writing its output back into the stack), and
    ``muon_apply_`` (reads p and the output; writes p). So launches grow with the number of
    distinct shapes, not of params. Unscaling, clipping, master weights and ``found_inf``
    are the common step scalars of both passes (a skipped step leaves params and buffers
    bit-identical; its Newton-Schulz runs on stale scratch and is discarded).

    State: ``momentum_buffer`` (torch.optim.Muon's key; torch.optim.Muon's state dicts
    load) for Muon params, ``step``, ``exp_avg``, ``exp_avg_sq`` (torch's AdamW keys) for
    AdamW params, ``master_param`` with master weights. See
    :class:`~fusedopt.optim._base.FusedOptimizer` for ``master_weights``, ``max_grad_norm``,
    ``capturable`` and ``backend``.
    """

    OP = "muon_"

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        eps: float = 1e-7,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = None,
        *,
        use_muon: bool | None = None,
        adamw_betas: tuple[float, float] = (0.9, 0.999),
        adamw_eps: float = 1e-8,
        max_grad_norm: float | None = None,
        capturable: bool = False,
        master_weights: bool = False,
        master_sync: bool = True,
        stochastic_rounding: bool = False,
        backend: str = "auto",
        grad_norm_group: Any = None,
    ) -> None:
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        self._ns_scratch: dict[tuple, Tensor] = {}
        self._init_from_arguments(
            locals(), ns_coefficients=tuple(ns_coefficients), adamw_betas=tuple(adamw_betas)
        )

    # ----------------------------------------------------------------- groups
    @classmethod
    def _check_group(cls, group: dict[str, Any]) -> None:
        """torch.optim.Muon's checks and messages, then the AdamW keys'."""
        lr = group["lr"]
        if not (lr if not isinstance(lr, Tensor) else float(lr)) >= 0.0:
            raise ValueError(f"Learning rate should be >= 0 but is: {lr}")
        if not group["momentum"] >= 0.0:
            raise ValueError(f"momentum should be >= 0 but is: {group['momentum']}")
        if not group["weight_decay"] >= 0.0:
            raise ValueError(f"weight decay should be >= 0 but is: {group['weight_decay']}")
        fn = group["adjust_lr_fn"]
        if fn is not None and fn not in ADJUST_LR_FNS:
            raise ValueError(f"Adjust learning rate function {fn} is not supported")
        if len(group["ns_coefficients"]) != 3:
            raise ValueError("Coefficients must be a tuple of exactly 3 values")
        if group["ns_steps"] >= 100:
            raise ValueError("Number of steps must be less than 100 for computational efficiency")
        check_nonnegative("adamw_eps", group["adamw_eps"], "epsilon value")
        check_betas(group["adamw_betas"])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's ``add_param_group``; a group without ``use_muon`` (or None) is Muon's if its
        params are 2-D, AdamW's if none is, and split in two if both kinds are there."""
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        if params and isinstance(params[0], tuple):  # named params, as torch's groups take them
            param_group = {**param_group, "param_names": [name for name, _ in params]}
            params = [p for _, p in params]
        use_muon = param_group.get("use_muon", self.defaults.get("use_muon"))
        if use_muon is None and params:
            matrices = [k for k, p in enumerate(params) if p.ndim == 2]
            others = [k for k, p in enumerate(params) if p.ndim != 2]
            if matrices and others:
                for index, flag in ((matrices, True), (others, False)):
                    part = {**param_group, "params": [params[k] for k in index]}
                    if "param_names" in param_group:
                        part["param_names"] = [param_group["param_names"][k] for k in index]
                    self.add_param_group({**part, "use_muon": flag})
                return
            use_muon = bool(matrices)
        if use_muon:
            for p in params:
                if local_tensor(p) is not p:
                    raise NotImplementedError(
                        "fusedopt.Muon: a sharded (DTensor) param in a Muon group: the "
                        "Newton-Schulz iteration needs whole matrices, and gathering them is "
                        "not implemented; step it unsharded or with use_muon=False"
                    )
                if p.ndim != 2:
                    raise ValueError(
                        "Muon only supports 2D parameters whereas we found a parameter with "
                        f"size: {p.size()}"
                    )
        super().add_param_group({**param_group, "params": params, "use_muon": use_muon})

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_ns_scratch", {})

    def _fix_loaded_group(self, group: dict[str, Any], states: dict[Tensor, dict]) -> None:
        """A torch.optim.Muon group has no ``use_muon``: its params are all 2-D, Muon's."""
        if group.get("use_muon") is None:
            group["use_muon"] = all(p.ndim == 2 for p in group["params"])
        super()._fix_loaded_group(group, states)

    def _state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        if group["use_muon"]:
            return ("momentum_buffer",)
        return ("step", "exp_avg", "exp_avg_sq")

    def _hypers(self, group: dict[str, Any]) -> dict[str, Any]:
        if not group["use_muon"]:
            beta1, beta2 = group["adamw_betas"]
            return dict(
                lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["adamw_eps"],
                weight_decay=group["weight_decay"],
            )  # fmt: skip
        a, b, c = group["ns_coefficients"]
        return dict(
            lr=group["lr"], momentum=group["momentum"], weight_decay=group["weight_decay"],
            lr_ratio=1.0, ns_a=a, ns_b=b, ns_c=c, ns_eps=group["eps"],
            ns_steps=float(group["ns_steps"]),
        )  # fmt: skip

    def _flags(self, group: dict[str, Any]) -> dict[str, bool]:
        if not group["use_muon"]:
            return dict(decoupled=True, amsgrad=False, maximize=False, bias_correction=True)
        return dict(nesterov=bool(group["nesterov"]))

    def _call_op(self, flags: dict[str, bool]) -> str:
        return "muon_" if "nesterov" in flags else "adamw_"

    # ----------------------------------------------------------------- step
    def _run(self, lists, hypers, flags, params, group_runs, **scalars) -> None:
        if "nesterov" not in flags:
            ops.step("adamw_", lists, hypers, flags, **scalars, _checked=True)
            return
        local = lists["params"]
        device = local[0].device
        groups = [gi for gi, count in group_runs for _ in range(count)]
        # The hyperparameter rows per tensor: its group's, with its shape's lr ratio.
        names = STEP_OPS["muon_"].hypers
        k_ratio = names.index("lr_ratio")
        rows, batches = [], {}
        for i, (p, gi) in enumerate(zip(local, groups, strict=True)):
            group = self.param_groups[gi]
            row = list(hypers.rows[_run_index(group_runs, i)])
            row[k_ratio] = adjust_lr_ratio(group["adjust_lr_fn"], p.shape)
            rows.append(tuple(row))
            ns = (*group["ns_coefficients"], int(group["ns_steps"]), float(group["eps"]))
            batches.setdefault((tuple(p.shape), p.stride(), ns), []).append(i)
        key = ("muon_", device, local[0].data_ptr(), len(local))
        sizes, table = ops._site_table(key, rows, device)
        muon_hypers = StepHypers(names, ops._runs(rows)[0], sizes, hypers.lr_tensor, table)
        ns_buffers: list[Tensor] = [None] * len(local)  # type: ignore[list-item]
        stacks = []
        for (shape, stride, ns), index in batches.items():
            stack = self._scratch(device, shape, stride, len(index))
            for slot, i in enumerate(index):
                ns_buffers[i] = stack[slot]
            stacks.append((stack, ns))
        all_lists = {**lists, "ns_buffers": ns_buffers}
        ops.step("muon_momentum_", all_lists, muon_hypers, flags, **scalars, _checked=True)
        for stack, (a, b, c, steps, eps) in stacks:
            newton_schulz_(stack, a, b, c, steps, eps)
        ops.step("muon_apply_", all_lists, muon_hypers, flags, **scalars, _checked=True)

    def _scratch(self, device, shape, stride, count: int) -> Tensor:
        """A bf16 ``[count, rows, cols]`` stack whose matrices have the params' strides
        (row-major, or column-major for a transposed param), reused across steps."""
        key = (device, shape, stride, count)
        stack = None if torch.compiler.is_compiling() else self._ns_scratch.get(key)
        if stack is None:
            rows, cols = shape
            if stride[0] >= stride[1]:
                stack = torch.empty((count, rows, cols), dtype=torch.bfloat16, device=device)
            else:
                stack = torch.empty((count, cols, rows), dtype=torch.bfloat16, device=device).mT
            if not torch.compiler.is_compiling():
                self._ns_scratch[key] = stack
        return stack


#: Muon's state keys and those of the AdamW params ([note: muon passes]).
Muon.STATE_LISTS = {**STEP_OPS["adamw_"].state_keys, **STEP_OPS["muon_"].state_keys}


def _run_index(group_runs: list[list[int]], i: int) -> int:
    """The index of the run (hyperparameter row) that tensor ``i`` of a call belongs to."""
    for r, (_, count) in enumerate(group_runs):
        if i < count:
            return r
        i -= count
    raise IndexError(i)
