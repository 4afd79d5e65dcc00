"""fusedopt: fused multi-tensor optimizer kernels for PyTorch (CUDA C++, Triton, C++ CPU).

``fusedopt.ops`` holds the functional ops; ``fusedopt.backends()`` reports which backends can
run here and why the others cannot. See DESIGN.md for the architecture.
"""

from __future__ import annotations

import contextlib

from fusedopt import (
    _contract,  # noqa: F401  (defines every op schema first)
    ops,
    reference,  # noqa: F401  (registers the reference backend)
)
from fusedopt._backend import BackendStatus, backends, resolve
from fusedopt.amp import GradScaler
from fusedopt.clip import clip_grad_norm_
from fusedopt.optim import LAMB, SGD, Adam, AdamW, Adan, Lion, Muon, ScheduleFreeAdamW

with contextlib.suppress(ImportError):  # _C registers the cpu and cuda backends when built
    from fusedopt import _C  # noqa: F401

__version__ = "0.1.0"

__all__ = [
    "LAMB",
    "SGD",
    "Adam",
    "AdamW",
    "Adan",
    "BackendStatus",
    "GradScaler",
    "Lion",
    "Muon",
    "ScheduleFreeAdamW",
    "backends",
    "clip_grad_norm_",
    "ops",
    "resolve",
]
