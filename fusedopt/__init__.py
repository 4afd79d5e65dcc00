"""fusedopt: fused multi-tensor optimizer kernels for PyTorch (CUDA C++, Triton, C++ CPU).

``fusedopt.ops`` holds the functional ops; ``fusedopt.backends()`` reports which backends can
run here and why the others cannot. See DESIGN.md for the architecture.
"""

from __future__ import annotations

import contextlib
import os

# In a source checkout, ``fusedopt.triton_kernels`` lives in the top-level ``triton_kernels/``
# folder (setup.py maps it with ``package_dir``); let the same import work uninstalled.
_SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if (
    not os.path.isdir(os.path.join(__path__[0], "triton_kernels"))
    and os.path.isfile(os.path.join(_SOURCE_ROOT, "triton_kernels", "__init__.py"))
    and os.path.isfile(os.path.join(_SOURCE_ROOT, "setup.py"))
):
    __path__.append(_SOURCE_ROOT)

from fusedopt import (  # noqa: E402
    _contract,  # noqa: F401  (defines every op schema first)
    ops,
    reference,  # noqa: F401  (registers the reference backend)
)
from fusedopt._backend import BackendStatus, backends, resolve  # noqa: E402
from fusedopt.amp import GradScaler  # noqa: E402
from fusedopt.clip import clip_grad_norm_  # noqa: E402
from fusedopt.optim import LAMB, SGD, Adam, AdamW, Lion  # noqa: E402

with contextlib.suppress(ImportError):  # _C registers the cpu and cuda backends when built
    from fusedopt import _C  # noqa: F401

__version__ = "0.1.0"

__all__ = [
    "LAMB",
    "SGD",
    "Adam",
    "AdamW",
    "BackendStatus",
    "GradScaler",
    "Lion",
    "backends",
    "clip_grad_norm_",
    "ops",
    "resolve",
]
