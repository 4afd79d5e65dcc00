"""Registration of the Triton implementations under the op contract (``fusedopt._contract``)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from fusedopt import _contract


def register(op: str, fn: Callable[..., object]) -> None:
    """Implement ``fusedopt::<op>_triton[_]`` with ``fn`` for CUDA tensors and for CPU tensors
    (those run under ``TRITON_INTERPRET=1``)."""
    name = f"{_contract.NAMESPACE}::{_contract.op_name(op, 'triton')}"
    torch.library.impl(name, ("CPU", "CUDA"), fn, lib=_contract._LIBRARY)
