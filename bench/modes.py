"""The memory modes of issue #15: how an optimizer holds the params and its own state.

One registry, read by both pieces of the issue's evidence: the language-model quality run
(``bench/lm_quality.py``: one loss curve per mode and optimizer) and the memory table
(``bench/memory.py``: bytes per parameter held, and traffic per step). A new mode (bf16
states beside fp32 masters, 8-bit states of another optimizer...) is one more
:class:`MemoryMode` in :data:`MEMORY_MODES`: the constructor arguments that select it, the
dtype the params are in, and what it keeps per element, from which the expected bytes and the
traffic follow.

[note: mode applicability] Which optimizers have a mode is not listed here: a mode applies to
an optimizer class when its constructor takes every argument the mode passes
(``inspect.signature``), and an 8-bit mode (``state_bits=8``) only where the class's op spec
declares states that may hold 8-bit codes (``StepOpSpec.quantized_states`` in
``fusedopt/_contract.py``). So when an op gains 8-bit states (or a class a new constructor
argument), its rows join the quality run and the memory table with no change here; and the
8-bit bytes count only the states the spec quantizes, the others staying in ``state_dtype``.
"""

from __future__ import annotations

import dataclasses
import inspect
from types import MappingProxyType

import torch

from bench.traffic import state_names, step_bytes_per_param
from fusedopt._contract import STEP_OPS, StepOpSpec


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def quantized_roles(op: str) -> tuple[str, ...]:
    """The roles of ``op``'s states in ``bench/traffic.py`` (``m``, ``v``...) that its spec
    lets hold 8-bit codes: the spec's per-element states (layout ``param``, not present only
    under a flag such as amsgrad) are the traffic roles, in the same order."""
    spec = STEP_OPS[op]
    lists = [t.name for t in spec.states if t.layout == "param" and t.present_iff is None]
    roles = state_names(op)
    if len(lists) != len(roles):
        raise AssertionError(f"{op}: spec states {lists} do not match traffic roles {roles}")
    quantized = {name for name, _, _ in spec.quantized_states}
    return tuple(role for role, name in zip(roles, lists, strict=True) if name in quantized)


@dataclasses.dataclass(frozen=True)
class MemoryMode:
    """One way of holding a model's params and the optimizer state.

    ``kwargs``: what the fusedopt constructor is given to select the mode (on top of the
    optimizer's hyperparameters). ``param_dtype``: the dtype the model's params (and so its
    grads) are cast to. ``state_dtype``: the dtype the mode keeps each optimizer state in
    (with ``state_bits=8`` in ``kwargs``: the states the op's spec does not quantize; the
    others hold 1-byte codes, [note: mode applicability]).
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

    @property
    def eight_bit(self) -> bool:
        return self.kwargs.get("state_bits") == 8

    def applies(self, optimizer: type[torch.optim.Optimizer]) -> bool:
        """Whether the fusedopt class ``optimizer`` has this mode ([note: mode
        applicability]): it takes every argument of :attr:`kwargs`, and, for 8-bit states,
        its op (``optimizer.OP``) declares quantized states."""
        accepted = inspect.signature(optimizer.__init__).parameters
        if any(k not in accepted for k in self.kwargs):
            return False
        spec: StepOpSpec = STEP_OPS[optimizer.OP]
        return not self.eight_bit or bool(spec.quantized_states)

    def state_sizes(self, op: str) -> dict[str, int]:
        """Bytes per element of each of ``op``'s states (traffic roles) in this mode."""
        eight = set(quantized_roles(op)) if self.eight_bit else set()
        return {r: 1 if r in eight else _size(self.state_dtype) for r in state_names(op)}

    def expected_state_bytes(self, op: str) -> int:
        """Bytes per param the optimizer should hold: its states, plus the master if kept
        (an 8-bit state's block absmaxes are per-block numbers, not counted here)."""
        return sum(self.state_sizes(op).values()) + self.master_bytes

    def traffic(self, op: str) -> int:
        """Compulsory bytes per param of one step of ``op`` in this mode (bench/traffic.py)."""
        return step_bytes_per_param(
            op,
            param_bytes=_size(self.param_dtype),
            state_bytes=_size(self.state_dtype),
            master=self.master,
            master_bytes=self.master_bytes,
            state_sizes=self.state_sizes(op),
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
            "bf16+SR",
            torch.bfloat16,
            torch.bfloat16,
            "bf16 params, grads and states; no master; the param writes rounded "
            "stochastically, the bf16 states of AdamW, Adam, LAMB, Lion and SGD too, the "
            "other optimizers' states (Adan, Schedule-Free AdamW, Adafactor, Muon) to "
            "nearest ([note: stochastic rounding], [note: state dtype] in "
            "csrc/include/fusedopt/dtype.h)",
            stochastic_rounding=True,
        ),
        _mode(
            "fp32+bf16 states",
            torch.float32,
            torch.bfloat16,
            "fp32 params and grads; bf16 states (the `state_dtype` key) rounded stochastically "
            "([note: state dtype] in csrc/include/fusedopt/dtype.h)",
            state_dtype=torch.bfloat16,
            stochastic_rounding=True,
        ),
        _mode(
            "bf16+master+bf16 states",
            torch.bfloat16,
            torch.bfloat16,
            "bf16 params and grads; fp32 master weights; bf16 states rounded stochastically "
            "(Transformer Engine's `exp_avg_dtype` setting, with SR: [note: state dtype])",
            master_weights=True,
            state_dtype=torch.bfloat16,
            stochastic_rounding=True,
        ),
        _mode(
            "bf16+master+8-bit states",
            torch.bfloat16,
            torch.float32,
            "bf16 params and grads; fp32 master weights; 8-bit states where the op's spec "
            "quantizes them (AdamW, Adam, LAMB: both moments; Lion: exp_avg; SGD: the momentum "
            "buffer), one fp32 absmax per 256-element block "
            "of a row beside each ([note: 8-bit states] in fusedopt/quant8.py; the scales, "
            "4 B per block and state, are counted with the per-tensor numbers)",
            master_weights=True,
            state_bits=8,
        ),
    )
}

#: The mode every other one is compared with: mixed precision with fp32 master weights.
REFERENCE_MODE = "bf16+master"
