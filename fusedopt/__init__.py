"""fusedopt: fused multi-tensor optimizer kernels for PyTorch (CUDA C++, Triton, C++ CPU).

``fusedopt.ops`` holds the functional ops; ``fusedopt.backends()`` reports which backends can
run here and why the others cannot. See DESIGN.md for the architecture.
"""

from __future__ import annotations

from fusedopt import (
    _contract,  # defines every op schema first
    ops,
    optim,
    reference,  # registers the reference backend
)
from fusedopt._backend import BackendStatus, backends, resolve
from fusedopt.amp import GradScaler
from fusedopt.clip import clip_grad_norm_
from fusedopt.optim import *  # noqa: F403  (the optimizers, fusedopt.optim.__all__)

try:  # _C registers the cpu and cuda backends when built
    from fusedopt import _C
except ImportError:  # fusedopt.backends() says why cpu and cuda are unusable
    _C = None
else:  # muon_ is its passes around torch's Newton-Schulz GEMMs: composed here, not in C++
    for _backend, _key in (("cpu", "CPU"), ("cuda", "CUDA"))[: 1 + bool(_C.WITH_CUDA)]:
        _contract.register_composite(
            "muon_",
            _backend,
            _key,
            reference.ops.compose_muon(
                _contract.op_handle("muon_momentum_", _backend),
                _contract.op_handle("muon_apply_", _backend),
            ),
        )

__version__ = "0.1.0"

__all__ = [
    "BackendStatus",
    "GradScaler",
    "backends",
    "clip_grad_norm_",
    "ops",
    "resolve",
]
__all__ += optim.__all__  # the optimizers, named once in fusedopt.optim
