"""``fusedopt.reference``: the pure-torch oracle, also usable as the ``reference`` backend."""

from __future__ import annotations

import torch

from fusedopt import _contract
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


def _register() -> None:
    for op, fn in IMPLEMENTATIONS.items():
        name = f"{_contract.NAMESPACE}::{_contract.op_name(op, 'reference')}"
        torch.library.impl(name, "CompositeExplicitAutograd", fn, lib=_contract._LIBRARY)


_register()
