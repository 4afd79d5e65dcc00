"""Muon's Newton-Schulz orthogonalization, batched over matrices of one shape.

torch does the GEMMs (``bmm``/``baddbmm``, one chain per batch); fusedopt writes none. The
arithmetic is torch.optim.Muon's (``_zeropower_via_newtonschulz``, torch 2.14): in bfloat16,
``X / max(|X|_F, eps)``, then ``ns_steps`` quintic steps ``A = X X^T``,
``B = b*A + c*A A``, ``X = a*X + B X`` on the wide orientation (rows <= cols).

[note: tall matrices in place] torch transposes a tall matrix (rows > cols) to make it
wide and transposes the result back. A batch of tall matrices is iterated in its own layout
instead, with the transposed formulas (``A = X^T X``, ``X = a*X + X B^T``): the same products
and sums element for element, but every output is laid out as the params, so that the last
step writes straight into the buffer ``muon_apply_`` reads (no transposed copy). Accumulation
order inside a GEMM may differ from torch's: tests/test_optim_muon.py bounds the difference
by the bf16 rounding it allows ([note: muon ns tolerance]).
"""

from __future__ import annotations

import torch
from torch import Tensor


def newton_schulz_(x: Tensor, a: float, b: float, c: float, steps: int, eps: float) -> Tensor:
    """Orthogonalize each matrix of the bf16 batch ``x`` ``[B, rows, cols]`` (or one matrix
    ``[rows, cols]``) in place, as torch.optim.Muon does, in bf16 (GEMMs accumulate in
    fp32); returns ``x``.

    [note: newton-schulz op] It runs as the custom op ``fusedopt::newton_schulz_``, opaque
    to ``torch.compile``: Inductor would otherwise fuse the bf16 division and the
    ``baddbmm`` epilogues in fp32 and round once at the end, and a compiled step would leave
    torch.optim.Muon's bits (measured: params 3e-4 apart after four steps)."""
    _check(x, steps)
    torch.ops.fusedopt.newton_schulz_(x, float(a), float(b), float(c), int(steps), float(eps))
    return x


def _check(x: Tensor, steps: int) -> None:
    if x.dtype != torch.bfloat16:
        raise TypeError(f"newton_schulz_: expected a bfloat16 batch, got {x.dtype}")
    if x.dim() not in (2, 3):
        raise ValueError(f"newton_schulz_: expected [B, rows, cols] matrices, got {tuple(x.shape)}")
    if steps >= 100:
        raise ValueError("Number of steps must be less than 100 for computational efficiency")


@torch.library.custom_op("fusedopt::newton_schulz_", mutates_args=("x",))
def _newton_schulz_op(x: Tensor, a: float, b: float, c: float, steps: int, eps: float) -> None:
    """The iteration itself (:func:`newton_schulz_`), eager under ``torch.compile``."""
    batch = x if x.dim() == 3 else x.unsqueeze(0)
    target = batch
    tall = batch.shape[-2] > batch.shape[-1]
    norm = torch.linalg.vector_norm(batch, dim=(-2, -1), keepdim=True).clamp(min=eps)
    if steps == 0:
        target.copy_(batch / norm)
        return
    y = batch / norm
    for k in range(steps):
        last = target if k == steps - 1 else None
        if tall:
            gram = torch.bmm(y.mT, y)
            update = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
            y = torch.baddbmm(y, y, update.mT, beta=a, out=last)
        else:
            gram = torch.bmm(y, y.mT)
            update = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
            y = torch.baddbmm(y, update, y, beta=a, out=last)


@_newton_schulz_op.register_fake
def _(x: Tensor, a: float, b: float, c: float, steps: int, eps: float) -> None:
    return None
