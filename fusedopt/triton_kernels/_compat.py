"""Shims for older Triton releases that fusedopt supports (3.6 and newer), each gated on the
version that needs it.

[note: interpreter __index__] Triton 3.6's interpreter converts a scalar used as a Python
index (a ``range()`` bound such as a chunk's start and end, loaded from the table) with
``int(handle.data)``, and the interpreter keeps scalars as shape-(1,) NumPy arrays. NumPy 2.4
made ``int()`` of an array with ``ndim > 0`` a TypeError, so every kernel with a loop fails
under ``TRITON_INTERPRET=1`` ("only 0-dimensional arrays can be converted to Python scalars";
triton-lang/triton issue 9171). Triton 3.7 squeezes the array first; the shim does the same
for 3.6. Compiled kernels never take this path.
"""

from __future__ import annotations

import re

import triton


def triton_version() -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", triton.__version__)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def patch_interpreter_index() -> None:
    """[note: interpreter __index__]: Triton < 3.7 only; a no-op elsewhere and when repeated."""
    if triton_version() >= (3, 7):
        return
    from triton.runtime import interpreter

    patch_tensor = interpreter._patch_lang_tensor
    if getattr(patch_tensor, "_fusedopt_squeezes", False):
        return

    def _patch_lang_tensor(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    _patch_lang_tensor._fusedopt_squeezes = True
    interpreter._patch_lang_tensor = _patch_lang_tensor


def patch_interpreter_fma() -> None:
    """[note: interpreter fma] Triton's interpreter (3.6 to 3.8 at least) evaluates
    ``tl.fma(x, y, z)`` as NumPy's ``x*y + z``: two roundings, where the GPU's FMA rounds
    once. An fp32 (or fp16/bf16) FMA is computed here in float64, where the product of two
    24-bit significands is exact, and rounded once to the operands' dtype (the double
    rounding through 53 bits can differ from a true FMA only on exact ties of the 24-bit
    rounding, which the reference's fp32 FMA, ``fusedopt.reference.ops._fma``, shares). fp64
    keeps NumPy's two roundings. A no-op when repeated."""
    import numpy as np
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder.create_fma, "_fusedopt_fused", False):
        return

    def create_fma(self, x, y, z):
        dtype = z.data.dtype
        if dtype == np.float64:
            data = x.data * y.data + z.data
        else:
            wide = x.data.astype(np.float64) * y.data.astype(np.float64)
            data = (wide + z.data.astype(np.float64)).astype(dtype)
        return interpreter.TensorHandle(data, z.dtype.scalar)

    create_fma._fusedopt_fused = True
    builder.create_fma = create_fma
