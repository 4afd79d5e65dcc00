"""The memory modes of issue #15: how an optimizer holds the params and its own state.

One registry, read by both pieces of the issue's evidence: the language-model quality run
(``bench/lm_quality.py``: one loss curve per mode and optimizer) and the memory table
(``bench/memory.py``: bytes per parameter held, and traffic per step). A new mode (stochastic
rounding, Kahan compensation, bf16 or 8-bit states...) is one more :class:`MemoryMode` in
:data:`MEMORY_MODES`: the constructor arguments that select it, the dtype the params are in,
and what it keeps per element, from which the expected bytes and the traffic follow.
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType

import torch

from bench.traffic import state_names, step_bytes_per_param
from fusedopt._contract import STEP_OPS


@dataclasses.dataclass(frozen=True)
class MemoryMode:
    """One way of holding a model's params and the optimizer state.

    ``kwargs``: what the fusedopt constructor is given to select the mode (on top of the
    optimizer's hyperparameters). ``param_dtype``: the dtype the model's params (and so its
    grads) are cast to. ``state_dtype``: the dtype the mode keeps each optimizer state in.
    ``master``: the optimizer keeps a master of every param (the update runs on fp32
    values). ``master_bytes``: what it holds per element for it: 4 for an fp32 copy, 2 for a
    compact one (the int16 low halves beside the bf16 param, [note: compact master] in
    fusedopt/_contract.py) or a Kahan one (a bf16 compensation, [note: kahan master]), 0
    without.
    """

    name: str
    param_dtype: torch.dtype
    state_dtype: torch.dtype
    master: bool
    kwargs: MappingProxyType
    what: str
    master_bytes: int = 0

    def applies(self, op: str) -> bool:
        """Whether the optimizer of step op ``op`` has this mode: 8-bit states where the op's
        spec declares quantized states (``fusedopt._contract``), every other mode always."""
        return not self.kwargs.get("state_bits") or bool(STEP_OPS[op].quantized_states)

    def expected_state_bytes(self, op: str) -> int:
        """Bytes per param the optimizer should hold: its states, plus the master if kept."""
        size = torch.empty((), dtype=self.state_dtype).element_size()
        return size * len(state_names(op)) + self.master_bytes

    def traffic(self, op: str) -> int:
        """Compulsory bytes per param of one step of ``op`` in this mode (bench/traffic.py)."""
        return step_bytes_per_param(
            op,
            param_bytes=torch.empty((), dtype=self.param_dtype).element_size(),
            state_bytes=torch.empty((), dtype=self.state_dtype).element_size(),
            master=self.master,
            master_bytes=self.master_bytes,
        )


def _mode(name: str, param: torch.dtype, state: torch.dtype, what: str, **kwargs) -> MemoryMode:
    setting = kwargs.get("master_weights", False)
    master = bool(setting)
    master_bytes = 2 if setting in ("compact", "kahan") else 4 if master else 0
    return MemoryMode(name, param, state, master, MappingProxyType(kwargs), what, master_bytes)


#: Every memory mode that exists today, in report order. The reference of the quality
#: comparison is :data:`REFERENCE_MODE` (bf16 params with fp32 masters: "fp32 master").
MEMORY_MODES: dict[str, MemoryMode] = {
    m.name: m
    for m in (
        _mode("fp32", torch.float32, torch.float32, "fp32 params, grads and states"),
        _mode(
            "bf16+master",
            torch.bfloat16,
            torch.float32,
            "bf16 params and grads; fp32 master weights and states",
            master_weights=True,
        ),
        _mode(
            "bf16+compact master",
            torch.bfloat16,
            torch.float32,
            "bf16 params and grads; compact master weights (the int16 low halves of the fp32 "
            "master beside the param: the same step bit for bit) and fp32 states",
            master_weights="compact",
        ),
        _mode(
            "bf16+kahan",
            torch.bfloat16,
            torch.float32,
            "bf16 params and grads; Kahan masters (a bf16 compensation beside the param: the "
            "master is param + compensation, ~16 significant bits) and fp32 states",
            master_weights="kahan",
        ),
        _mode(
            "bf16",
            torch.bfloat16,
            torch.bfloat16,
            "bf16 params, grads and states; no master (round-to-nearest writes)",
        ),
        _mode(
            "bf16+master+8-bit states",
            torch.bfloat16,
            torch.int8,
            "bf16 params and grads; fp32 master weights; 8-bit moments, one fp32 absmax per "
            "256-element block of a row beside each ([note: 8-bit states] in "
            "fusedopt/quant8.py; the scales, 4 B per block and state, are counted with the "
            "per-tensor numbers); the optimizers whose op has 8-bit states",
            master_weights=True,
            state_bits=8,
        ),
    )
}

#: The mode every other one is compared with: mixed precision with fp32 master weights.
REFERENCE_MODE = "bf16+master"
