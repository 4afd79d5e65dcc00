"""``fusedopt.triton_kernels``: the Triton backend (multi-tensor kernels, one launch per op).

Importing this package registers ``fusedopt::<op>_triton[_]`` for every op of the contract,
for CUDA tensors and for CPU tensors (run by Triton's interpreter under
``TRITON_INTERPRET=1``). It raises ImportError when Triton is not installed.
"""

from __future__ import annotations

try:
    import triton  # noqa: F401
except ImportError as error:  # the backend reports this reason (fusedopt.backends())
    raise ImportError(f"the Triton backend needs the triton package: {error}") from error

from ._compat import patch_interpreter_fma, patch_interpreter_index

patch_interpreter_index()  # Triton 3.6 under TRITON_INTERPRET=1 with NumPy >= 2.4
patch_interpreter_fma()  # tl.fma rounds once under TRITON_INTERPRET=1, as on a GPU

from . import adafactor, adamw, adan, grad_norm, lamb, lion, muon, scale, schedulefree_adamw, sgd  # noqa: E402, F401  (each op registers itself)
