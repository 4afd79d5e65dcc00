"""``fusedopt.LAMB``: timm's ``Lamb`` constructor and semantics, one ``lamb_`` op (its two
passes and an all-reduce for sharded params).

[note: sharded LAMB] LAMB's trust ratio ``‖p‖/‖u‖`` needs the norms of *whole* tensors.
The ``lamb_`` op computes them from the tensors it is given, which for a DTensor param
(FSDP2) is only the local shard. For params sharded that way this module runs ``lamb_``'s two
passes as the ops they also are ([note: multi-pass ops] in DESIGN.md §2): ``lamb_direction_``
on the local shards (it advances the steps and returns each tensor's sums of p² and u²), one
all-reduce (sum) of those sums over the mesh's groups, and ``lamb_apply_`` on the summed
norms. Two fused passes and an all-reduce of 2N numbers; ``found_inf`` skips both passes on
the device (the sums of a skipped step are zeros), so it needs no host sync either. The
sums are fp32 (fp64 for fp64 params), and the all-reduce adds the ranks' sums in its own
order, so a sharded param's trust ratio may differ from the unsharded one by rounding.

[note: LAMB group step] timm's ``Lamb`` keeps one step count per param group
(``group["step"]``), advanced once per ``step()`` whether or not a param of the group has a
grad, and every param of the group takes its bias correction from it. fusedopt does the same:
``group["step"]`` is a 0-d fp32 tensor on the device of the group's first param, advanced at
the end of each ``step()`` by ``found_inf == 0`` (by 1 without a scaler), on the device, with
no host sync. The ``lamb_`` op (like every step op) takes one step tensor per param and
increments each; handing it the group's count N times would make it increment one tensor N
times (on CUDA and Triton from N programs at once). So each call gets a scratch vector with one
slot per param (cached with its views, so its addresses stay fixed for CUDA graphs), filled from
its group's count before the launch (one broadcasting copy per run of a group's params): the op
computes the bias corrections from ``count + 1`` as before, and its increments of the scratch
are simply dropped. The cost is a copy per group run and an add per group, a few scalars.

State dicts: the count is saved as ``group["step"]``, the form timm's ``Lamb`` keeps and loads
(timm 1.x keeps a 0-d tensor, older timm an int; both load here, and ours loads into timm). A
fusedopt state dict from before this note has a per-param ``state["step"]`` and no group count:
the group count becomes the largest of its params' counts (a param's count lags only where it
had no grad, and the largest is the number of steps the group took), computed on the device.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from fusedopt import ops
from fusedopt.clip import _reduce_groups, local_tensor
from fusedopt.optim._base import FusedOptimizer, Params
from fusedopt.optim._keys import STEP_KEY
from fusedopt.optim._state_bits import check_state_bits_value, with_scales
from fusedopt.optim.adamw import adam_hypers, check_adam_group


class LAMB(FusedOptimizer):
    """LAMB (You et al. 2019) with timm's ``Lamb`` arguments, defaults and semantics, fused.

    The global clip ``g /= max(1, ‖g‖ / max_grad_norm)`` (timm's default ``max_grad_norm=1.0``;
    None disables it) runs inside ``step()`` from the one ``grad_norm`` pass and is folded into
    the step's ``clip_coef``; the norm stays in :attr:`last_grad_norm`. timm's ``caution``,
    ``decoupled_decay`` and ``corrected_weight_decay`` are not implemented (True raises);
    ``foreach`` is accepted and ignored. DTensor params: see
    [note: sharded LAMB]. State per group, as timm: ``step`` (a 0-d fp32 tensor on the device,
    [note: LAMB group step]); per param: ``exp_avg``, ``exp_avg_sq`` (and ``master_param``).
    ``state_bits=8`` (a group key) keeps the moments 8-bit as :class:`~fusedopt.AdamW` does
    (``exp_avg_scale``, ``exp_avg_sq_scale``: [note: 8-bit states] in fusedopt/quant8.py);
    the codes are written once per step, by the second pass ([note: lamb passes]).
    ``state_dtype`` (a group key; default None: fp32 with master weights, else the param's
    dtype) stores the moments as torch.float32, torch.bfloat16 or torch.float16 whatever the
    param, as :class:`~fusedopt.AdamW`'s does; the math stays fp32, and 16-bit moments are
    written once per step, by the second pass. With ``stochastic_rounding=True`` every bf16
    store of the step rounds stochastically, the moments included; fp16 states take round to
    nearest only. Not with ``state_bits=8`` nor fp64 params ([note: state dtype] in
    ``csrc/include/fusedopt/dtype.h``).
    """

    OP = "lamb_"
    # STATE_LISTS (from the spec) has "step", so that older fusedopt state dicts (a per-param
    # count) load; a param keeps no step here ([note: LAMB group step]).

    def __init__(
        self, params: Params, lr: float | Tensor = 1e-3, bias_correction: bool = True,
        betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.01,
        grad_averaging: bool = True, max_grad_norm: float | None = 1.0, trust_clip: bool = False,
        always_adapt: bool = False, caution: bool = False, decoupled_decay: bool = False,
        corrected_weight_decay: bool = False, foreach: bool | None = None, *,
        capturable: bool = False, master_weights: bool | str = False, master_sync: bool = True,
        stochastic_rounding: bool = False,
        backend: str = "auto", grad_norm_group: Any = None, state_bits: int | None = None,
        state_dtype: torch.dtype | None = None,
    ) -> None:  # fmt: skip
        self._init_from_arguments(locals(), betas=tuple(betas))

    @classmethod
    def _check_group(cls, group: dict[str, Any]) -> None:
        check_adam_group(group)
        for option in _TIMM_UNSUPPORTED:  # a loaded timm group may carry them
            if group.get(option):
                raise ValueError(f"fusedopt.LAMB: timm's {option}=True is not supported")
        step = group.get(STEP_KEY)
        if step is not None and torch.as_tensor(step).numel() != 1:
            raise ValueError(f"LAMB group step must hold one number, got {step!r}")
        check_state_bits_value(group)

    def _state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        return with_scales(self.OP, group, ("exp_avg", "exp_avg_sq"))

    _hypers = staticmethod(adam_hypers)

    def _flags(self, group: dict[str, Any]) -> dict[str, bool]:
        return dict(
            grad_averaging=bool(group["grad_averaging"]),
            bias_correction=bool(group["bias_correction"]),
            trust_clip=bool(group["trust_clip"]), always_adapt=bool(group["always_adapt"]),
        )  # fmt: skip

    def _clip_coef(self, norm: Tensor, max_grad_norm: float) -> Tensor:
        """timm's global clip as a multiplier: ``1 / max(1, norm / max_grad_norm)``."""
        return 1.0 / torch.clamp(norm / max_grad_norm, min=1.0)

    # ----------------------------------------------------------------- group step
    def _fused_step(self) -> None:
        for group in self.param_groups:  # timm counts every group, with or without grads
            group[STEP_KEY] = _as_count(group.get(STEP_KEY, 0), _group_device(group))
        super()._fused_step()

    def _after_step(self, found_inf: Tensor | None) -> None:
        """[note: LAMB group step] every group's count advances, unless the step was skipped."""
        for group in self.param_groups:
            count = group[STEP_KEY]
            if found_inf is None:
                count.add_(1.0)
            else:
                count.add_(found_inf.to(count.device) == 0)

    def _step_slots(self, device: torch.device, group_runs: list[list[int]]) -> list[Tensor]:
        """One step tensor per param of a call, each holding its group's count
        ([note: LAMB group step])."""
        key = (device, tuple(tuple(run) for run in group_runs))
        cache = {} if torch.compiler.is_compiling() else self._step_out.setdefault("lamb", {})
        entry = cache.get(key)
        if entry is None:
            if len(cache) >= 16:  # group layouts that no longer occur
                cache.clear()
            scratch = torch.empty(sum(n for _, n in group_runs), device=device)
            runs, start = [], 0
            for gi, n in group_runs:
                runs.append((gi, scratch[start : start + n]))
                start += n
            entry = cache[key] = (list(scratch.unbind()), runs)
        slots, runs = entry
        for gi, run in runs:
            run.copy_(self.param_groups[gi][STEP_KEY])
        return slots

    def _fix_loaded_group(self, group: dict[str, Any], states: dict[Tensor, dict]) -> None:
        """[note: LAMB group step] the group's count from timm's ``group["step"]`` or, in an
        older fusedopt dict, the largest per-param ``step``."""
        device = _group_device(group)
        param_steps = [s.pop(STEP_KEY).to(device) for s in states.values() if STEP_KEY in s]
        if STEP_KEY in group:
            group[STEP_KEY] = _as_count(group[STEP_KEY], device, copy=True)
        elif param_steps:
            group[STEP_KEY] = torch.stack(param_steps).amax()

    def state_dict(self) -> dict[str, Any]:
        """torch's ``state_dict``; each group's ``step`` is a copy (as timm saves it), so a
        saved dict does not move on with later steps."""
        saved = super().state_dict()
        for packed in saved["param_groups"]:
            if isinstance(packed.get(STEP_KEY), Tensor):
                packed[STEP_KEY] = packed[STEP_KEY].clone()
        return saved

    def _run(self, lists, hypers, flags, params, group_runs, **scalars) -> None:
        lists = {**lists, "steps": self._step_slots(lists["params"][0].device, group_runs)}
        by_groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(params):
            by_groups.setdefault(_reduce_groups(p, None), []).append(i)
        for groups, index in by_groups.items():
            sub_lists, sub_hypers = _subset(lists, hypers, index, len(params))
            sub_scalars, key = scalars, scalars.get("sr_key")
            if key is not None and len(index) != len(params):  # [note: stochastic rounding]
                at = torch.tensor(index, device=key.device)
                sub_scalars = {**scalars, "sr_key": torch.cat((key[:2], key[2:][at]))}
            if not groups:  # whole tensors: the fused op's own per-tensor norms are right
                ops.step(self.OP, sub_lists, sub_hypers, flags, **sub_scalars, _checked=True)
                continue
            # [note: sharded LAMB]
            sq_norms = ops.step("lamb_direction_", sub_lists, sub_hypers, flags, **sub_scalars,
                                _checked=True)  # fmt: skip
            for group in groups:
                dist.all_reduce(sq_norms, group=group)
            ops.step("lamb_apply_", sub_lists, sub_hypers, flags, **sub_scalars,
                     inputs={"sq_norms": sq_norms}, _checked=True)  # fmt: skip


#: timm ``Lamb`` options fusedopt does not implement (True raises).
_TIMM_UNSUPPORTED = ("caution", "decoupled_decay", "corrected_weight_decay")


def _group_device(group: dict[str, Any]) -> torch.device:
    params = group["params"]
    return local_tensor(params[0]).device if params else torch.device("cpu")


def _as_count(value: Any, device: torch.device, copy: bool = False) -> Tensor:
    """A group step count as a 0-d fp32 tensor on ``device`` (as is when it already is one)."""
    count = torch.as_tensor(value).detach().reshape(())
    return count.to(dtype=torch.float32, device=device, copy=copy)


def _subset(lists: dict, hypers: Mapping, index: list[int], n: int) -> tuple[dict, Mapping]:
    """The lists and hyperparameters of the tensors at ``index``: all of them as given (the
    plan's cached ``ops.StepHypers`` table), else per-tensor values (``ops.step`` builds
    their table)."""
    if len(index) == n:
        return lists, hypers
    sub_lists = {k: [v[i] for i in index] if v else v for k, v in lists.items()}
    sub_hypers = {}
    for k, v in hypers.items():
        if isinstance(v, Tensor):
            sub_hypers[k] = v if v.dim() == 0 else v[torch.tensor(index, device=v.device)]
        else:
            sub_hypers[k] = [v[i] for i in index]
    return sub_lists, sub_hypers
