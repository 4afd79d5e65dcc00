"""``load_state_dict`` of fusedopt's optimizers: torch's, checked before anything changes
and cast to fusedopt's state layout. A mixin of :class:`fusedopt.optim._base.FusedOptimizer`.
"""

from __future__ import annotations

from collections import defaultdict
from copy import deepcopy
from typing import Any

import torch
from torch import Tensor

from fusedopt import quant8
from fusedopt._contract import STEP_OPS, state_shape
from fusedopt._dense import state_for
from fusedopt._validate import LOW_PRECISION
from fusedopt.clip import local_tensor
from fusedopt.optim import _state_bits
from fusedopt.optim._keys import (
    KAHAN_KEY,
    MASTER_KEY,
    MASTER_KEYS,
    REMAINDER_KEY,
    SR_COUNTER_KEY,
    SR_GROUP_KEY,
    SR_SEED_KEY,
    STEP_KEY,
    TORCH_ONLY_KEYS,
)


class StateDictMixin:
    """torch's ``load_state_dict``, with fusedopt's checks and casts."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's ``load_state_dict``, checked first and cast to fusedopt's state dtypes.

        Accepts torch.optim state dicts of the same algorithm. Every mismatch (group or param
        counts, an unknown state key, a state tensor whose shape does not fit its param, an
        invalid hyperparameter) raises naming the param before anything changes. Moments are
        fp32 when the param is fp32 or keeps a master copy, else in the param's dtype; steps
        become 0-d fp32 tensors on the param's device.
        """
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        # Deep-copied as torch does: a tensor lr (or any group value) of the source optimizer
        # must not be shared with this one, or a scheduler's in-place update of one would
        # change the other.
        saved_groups = deepcopy(state_dict["param_groups"])
        if len(saved_groups) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        new_groups, id_map, group_sr = [], {}, None
        for gi, (group, saved) in enumerate(zip(self.param_groups, saved_groups, strict=True)):
            if len(group["params"]) != len(saved["params"]):
                raise ValueError(
                    f"loaded state dict contains a parameter group (group {gi}) that doesn't "
                    "match the size of optimizer's group"
                )
            new_group = {k: v for k, v in saved.items() if k != "params"}
            if SR_SEED_KEY in new_group:  # the groups' copy of the top-level SR entry
                group_sr = {"seed": new_group.pop(SR_SEED_KEY),
                            "counter": new_group.pop(SR_COUNTER_KEY, None)}  # fmt: skip
            new_group["params"] = group["params"]
            if "param_names" in group and "param_names" not in saved:
                new_group["param_names"] = group["param_names"]
            for key, value in self.defaults.items():
                new_group.setdefault(key, value)
            for key in TORCH_ONLY_KEYS:
                new_group.pop(key, None)
            try:
                self._check_group(new_group)
                self._check_common(new_group)
            except ValueError as error:
                raise ValueError(f"loaded state dict, param group {gi}: {error}") from None
            new_groups.append(new_group)
            for i, (pid, p) in enumerate(zip(saved["params"], group["params"], strict=True)):
                id_map[pid] = (gi, i, p)
        if len({g.get("max_grad_norm") for g in new_groups}) > 1:
            raise ValueError("loaded state dict: groups have different max_grad_norm")
        # The top-level entry, else the groups' copy (a state dict through DCP's
        # get_optimizer_state_dict, which keeps only state and param_groups).
        sr = _stochastic_rounding(state_dict.get(SR_GROUP_KEY, group_sr))

        new_state: dict[Tensor, dict[str, Any]] = {}
        for pid, saved_state in state_dict["state"].items():
            if pid not in id_map:
                raise ValueError(f"loaded state dict has state for unknown param id {pid!r}")
            gi, i, p = id_map[pid]
            new_state[p] = self._cast_state(new_groups[gi], p, saved_state, gi, i)
        for group in new_groups:
            self._fix_loaded_group(
                group, {p: new_state[p] for p in group["params"] if p in new_state}
            )
        state: defaultdict = defaultdict(dict)
        state.update(new_state)
        self.__setstate__({"state": state, "param_groups": new_groups})
        if sr is not None:  # [note: stochastic rounding]: the saved seed and counter go on
            self.sr_seed, self._sr_start = sr
            self._sr_keys = {}
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _cast_state(self, group, p: Tensor, saved: dict, gi: int, i: int) -> dict[str, Any]:
        """Check one param's saved state and cast it to this optimizer's layout."""
        where = f"loaded state dict, {self._param_name(gi, i)}"
        allowed = set(self.STATE_LISTS) | set(MASTER_KEYS)
        unknown = set(saved) - allowed
        if unknown:
            raise ValueError(
                f"{where}: unknown state keys {sorted(unknown)} for {type(self).__name__} "
                f"(expected some of {sorted(allowed)})"
            )
        master = self._uses_master(group, p)
        masters = set(MASTER_KEYS)
        if masters & set(saved) and not master and p.dtype in LOW_PRECISION:
            # Saved with master weights, loaded without: [note: master weights switched].
            saved = {k: v for k, v in saved.items() if k not in masters}
        for key in sorted(masters & set(saved)):
            if not master or (key == REMAINDER_KEY and p.dtype != torch.bfloat16):
                raise ValueError(
                    f"{where}: has a {key} but the param is {p.dtype} with "
                    f"master_weights={group['master_weights']}"
                )
        # A saved master of another kind (fp32, compact, Kahan) is converted at the next
        # step (_convert_master, [note: master weights switched]).
        device = local_tensor(p).device
        layouts = STEP_OPS[self.OP].state_layouts
        # The float states take the loaded group's dtype (fp32 with masters, else the
        # param's, or its state_dtype: [note: state dtype]), rounded to nearest as torch
        # casts a loaded state to its param's dtype.
        float_dtype = _state_bits.state_dtype(group, self.OP, p.dtype, master)
        out: dict[str, Any] = {}
        for key, value in saved.items():
            if key == STEP_KEY:
                value = torch.as_tensor(value)
                if value.numel() != 1:
                    raise ValueError(f"{where}: step must hold one number, has shape {value.shape}")
                # A copy, as every other state: two optimizers never advance one count.
                value = value.detach().reshape(())
                out[key] = value.to(dtype=torch.float32, device=device, copy=True)
                continue
            if not isinstance(value, Tensor):
                raise ValueError(f"{where}: state {key!r} must be a tensor, got {type(value)}")
            layout = layouts.get(key, "param")
            shape = state_shape(layout, p.shape)  # [note: factored layouts]
            if tuple(value.shape) != shape:
                expected = "the param has" if layout == "param" else f"a {layout!r} state has"
                raise ValueError(
                    f"{where}: state {key!r} has shape {tuple(value.shape)} but {expected} {shape}"
                )
            dtype = torch.float32 if key == MASTER_KEY else float_dtype
            if key == REMAINDER_KEY:  # [note: compact master]
                dtype = torch.int16
            if key == KAHAN_KEY:  # [note: kahan master]: the param's dtype
                dtype = p.dtype
            # [note: 8-bit states]: codes and absmaxes as saved; converted at the next step
            # if this group's state_bits says otherwise
            dtype = _state_bits.loaded_dtype(key, self.OP, value, dtype)
            # In the param's memory layout, whatever the saved one: the step pairs elements
            # by position ([note: checked once] in _init_state).
            # Codes and absmaxes are contiguous, DTensors placed as a DTensor param
            # ([note: 8-bit states under FSDP2] in fusedopt/quant8.py).
            quantized = layout == "param" and quant8.is_quantized(value)
            if quantized or layout == "block_scales":
                out[key] = _state_bits.empty_state(key, self.OP, p, dtype).copy_(value.detach())
            elif layout == "param":
                out[key] = torch.empty_like(p, dtype=dtype).copy_(value.detach())
            else:
                out[key] = state_for(p, layout, dtype).copy_(value.detach())
        return out


def _stochastic_rounding(saved: Any) -> tuple[int, int] | None:
    """The (seed, counter) of a state dict's ``"stochastic_rounding"`` entry, checked (None
    when it has none) ([note: stochastic rounding] in csrc/include/fusedopt/dtype.h)."""
    if saved is None:
        return None
    ints = (int, torch.Tensor)
    if not (
        isinstance(saved, dict) and isinstance(saved.get("seed"), ints)
        and isinstance(saved.get("counter"), ints)
    ):  # fmt: skip
        raise ValueError(
            f"loaded state dict: {SR_GROUP_KEY!r} must be a dict with int 'seed' and 'counter', "
            f"got {saved!r}"
        )
    seed, counter = int(saved["seed"]), int(saved["counter"])
    if not 0 <= seed < 1 << 63 or not 0 <= counter < 1 << 63:
        raise ValueError(f"loaded state dict: {SR_GROUP_KEY} seed and counter must be in "
                         f"[0, 2**63), got {seed} and {counter}")  # fmt: skip
    return seed, counter
