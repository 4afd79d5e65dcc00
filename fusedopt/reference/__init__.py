"""``fusedopt.reference``: the pure-torch oracle, also usable as the ``reference`` backend."""

from __future__ import annotations

import functools
import inspect

import torch

from fusedopt import _contract
from fusedopt._validate import check_sr_key
from fusedopt.reference.ops import (
    adafactor_,
    adafactor_apply_,
    adafactor_norms_,
    adamw_,
    adan_,
    grad_norm,
    lamb_,
    lamb_apply_,
    lamb_direction_,
    lion_,
    load_grad,
    muon_,
    muon_apply_,
    muon_momentum_,
    opmath_dtype,
    scale_,
    schedulefree_adamw_,
    sgd_,
)

__all__ = [
    "adafactor_",
    "adafactor_apply_",
    "adafactor_norms_",
    "adamw_",
    "grad_norm",
    "lamb_",
    "lamb_apply_",
    "lamb_direction_",
    "lion_",
    "load_grad",
    "muon_",
    "muon_apply_",
    "muon_momentum_",
    "opmath_dtype",
    "scale_",
    "schedulefree_adamw_",
    "sgd_",
]

IMPLEMENTATIONS = {
    "scale_": scale_,
    "grad_norm": grad_norm,
    "adamw_": adamw_,
    "lamb_": lamb_,
    "lamb_direction_": lamb_direction_,
    "lamb_apply_": lamb_apply_,
    "lion_": lion_,
    "adan_": adan_,
    "schedulefree_adamw_": schedulefree_adamw_,
    "sgd_": sgd_,
    "adafactor_": adafactor_,
    "adafactor_norms_": adafactor_norms_,
    "adafactor_apply_": adafactor_apply_,
    "muon_": muon_,
    "muon_momentum_": muon_momentum_,
    "muon_apply_": muon_apply_,
}


def _checks_sr_key(op: str, fn):
    """``fn`` with its ``sr_key`` checked before it touches any tensor ([note: stochastic
    rounding] in csrc/include/fusedopt/dtype.h; the C++ backends check it in
    ``StepArguments``, Triton in ``layout.prepare``)."""
    signature = inspect.signature(fn)
    if _contract.SR_KEY not in signature.parameters:
        return fn

    @functools.wraps(fn)
    def checked(*args, **kwargs):
        bound = signature.bind(*args, **kwargs).arguments
        spec = _contract.PHASE_OPS[op].step if op in _contract.PHASE_OPS else None
        spec = spec or _contract.STEP_OPS.get(op)
        state_dtype = spec.free_state_dtype(bound) if spec is not None else None
        check_sr_key(bound.get(_contract.SR_KEY), op, bound["params"], bound["master_params"],
                     state_dtype)  # fmt: skip
        return fn(*args, **kwargs)

    return checked


def _register() -> None:
    for op, fn in IMPLEMENTATIONS.items():
        name = f"{_contract.NAMESPACE}::{_contract.op_name(op, 'reference')}"
        torch.library.impl(
            name, "CompositeExplicitAutograd", _checks_sr_key(op, fn), lib=_contract._LIBRARY
        )


_register()
