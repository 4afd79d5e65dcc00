"""Backend discovery and selection (DESIGN.md §2).

``backend="auto"`` picks, per device: CUDA tensors -> ``cuda`` if ``fusedopt._C`` was built
with CUDA, else ``triton``; CPU tensors -> ``cpu`` if ``fusedopt._C`` is there, else
``reference``. The environment variable ``FUSEDOPT_BACKEND`` overrides ``auto``. Asking for a
backend that cannot run is an error that says why; there is no silent fallback.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os

import torch

from fusedopt._contract import BACKEND_NAMES


@dataclasses.dataclass(frozen=True)
class BackendStatus:
    """Whether a backend can run, on which device types, and if not, why not."""

    name: str
    usable: bool
    devices: tuple[str, ...]
    reason: str

    def __str__(self) -> str:
        where = ", ".join(self.devices) if self.devices else "-"
        state = "usable" if self.usable else "unusable"
        return f"{self.name:<10} {state:<9} devices: {where:<10} {self.reason}"


@functools.cache
def _extension():
    """``fusedopt._C`` or the ImportError that explains why it is missing."""
    try:
        return importlib.import_module("fusedopt._C")
    except ImportError as error:
        return error


@functools.cache
def _triton():
    try:
        importlib.import_module("fusedopt.triton_kernels")
        return None
    except ImportError as error:
        return error


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _status(name: str) -> BackendStatus:
    if name == "reference":
        return BackendStatus(name, True, ("cpu", "cuda"), "pure torch, any device")
    if name == "cpu":
        ext = _extension()
        if isinstance(ext, ImportError):
            return BackendStatus(name, False, (), f"fusedopt._C is not built ({ext})")
        return BackendStatus(name, True, ("cpu",), "fusedopt._C (C++, OpenMP)")
    if name == "cuda":
        ext = _extension()
        if isinstance(ext, ImportError):
            return BackendStatus(name, False, (), f"fusedopt._C is not built ({ext})")
        if not getattr(ext, "WITH_CUDA", False):
            return BackendStatus(name, False, (), "fusedopt._C was built without CUDA")
        if not torch.cuda.is_available():
            return BackendStatus(name, False, (), "built with CUDA, but no CUDA device is visible")
        return BackendStatus(name, True, ("cuda",), "fusedopt._C (CUDA kernels)")
    if name == "triton":
        error = _triton()
        if error is not None:
            return BackendStatus(name, False, (), f"Triton is not importable ({error})")
        devices = (("cuda",) if torch.cuda.is_available() else ()) + (
            ("cpu",) if _interpreting() else ()
        )
        if not devices:
            return BackendStatus(
                name, False, (), "no CUDA device, and TRITON_INTERPRET=1 is not set"
            )
        return BackendStatus(name, True, devices, "Triton JIT kernels")
    raise ValueError(f"unknown backend {name!r}; known: {', '.join(BACKEND_NAMES)}")


def backends() -> dict[str, BackendStatus]:
    """Report every backend: usable or not, the device types it serves, and why."""
    return {name: _status(name) for name in BACKEND_NAMES}


_AUTO_ORDER = {"cuda": ("cuda", "triton"), "cpu": ("cpu", "reference")}


def resolve(backend: str, device: torch.device) -> str:
    """The backend to run for tensors on ``device``: ``backend`` itself, or auto's choice.

    Raises ``RuntimeError`` naming the reason when the backend cannot run there.
    """
    if backend == "auto":
        backend = os.environ.get("FUSEDOPT_BACKEND", "auto") or "auto"
    if backend == "auto":
        for candidate in _AUTO_ORDER.get(device.type, ("reference",)):
            status = _status(candidate)
            if status.usable and device.type in status.devices:
                return candidate
        return "reference"
    if backend not in BACKEND_NAMES:
        raise ValueError(
            f"unknown backend {backend!r}; choose one of: auto, {', '.join(BACKEND_NAMES)}"
        )
    status = _status(backend)
    if not status.usable:
        raise RuntimeError(f"fusedopt backend {backend!r} is not usable: {status.reason}")
    if device.type not in status.devices:
        raise RuntimeError(
            f"fusedopt backend {backend!r} cannot run on {device.type} tensors "
            f"(it serves: {', '.join(status.devices)}; {status.reason})"
        )
    return backend
