"""Philox4x32-10 and stochastic rounding to bf16 in plain torch, the oracle of the kernels'
([note: stochastic rounding] in csrc/include/fusedopt/dtype.h; the C++ generator is
csrc/include/fusedopt/philox.h, Triton's ``tl.philox``). int64 tensors hold the 32-bit words;
a 32 x 32-bit product is formed from 16-bit halves so that nothing overflows int64."""

from __future__ import annotations

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF
#: Philox4x32's round multipliers and Weyl key increments (Random123's constants).
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85


def _mulhilo(a: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """The high and low 32-bit words of ``a * m`` (a: int64 words < 2^32, m a constant)."""
    low = a * (m & 0xFFFF)  # < 2^48
    mid = a * (m >> 16) + (low >> 16)  # < 2^49: the product is mid * 2^16 + (low & 0xFFFF)
    return mid >> 16, ((mid & 0xFFFF) << 16) | (low & 0xFFFF)


def philox4x32_10(
    c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor, k0: int, k1: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox4x32-10 of counters (c0, c1, c2, c3) (int64 tensors of 32-bit words, broadcast
    together) under key (k0, k1): the four output words, int64 in [0, 2^32)."""
    c0, c1, c2, c3 = torch.broadcast_tensors(
        *(c.to(torch.int64) & _MASK32 for c in (c0, c1, c2, c3))
    )
    k0, k1 = k0 & _MASK32, k1 & _MASK32
    for _ in range(10):
        hi0, lo0 = _mulhilo(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + PHILOX_W0) & _MASK32, (k1 + PHILOX_W1) & _MASK32
    return c0, c1, c2, c3


def memory_order_index(t: Tensor) -> Tensor:
    """Each element's index in ``t``'s memory order (int64, ``t``'s shape): the element index
    the kernels walk a dense tensor by (channels_last and other dense layouts included)."""
    index = torch.empty_strided(t.shape, t.stride(), dtype=torch.int64, device=t.device)
    index.as_strided((t.numel(),), (1,)).copy_(torch.arange(t.numel(), device=t.device))
    return index


def rounding_bits(seed: int, counter: int, tensor: int, element: Tensor, stream: int = 0) -> Tensor:
    """The 16 random bits of each ``element`` index of the tensor with id ``tensor`` at SR
    step ``counter`` under ``seed``: a half of a word of Philox4x32-10 with key (seed low,
    seed high) and counter (element low, element high, tensor, counter). ``stream`` (not
    the sr_key entry's stream id, which is ``tensor``) picks the half: 0 (the param store)
    the top half of the first word, 1..3 the top halves of words 1..3 (state slot
    ``stream - 1`` of the op), 4..7 the low halves of words 0..3 ([note: state dtype] in
    csrc/include/fusedopt/dtype.h)."""
    seed &= (1 << 64) - 1
    e = element.to(torch.int64)
    words = philox4x32_10(
        e & _MASK32, (e >> 32) & _MASK32, torch.tensor(tensor & _MASK32, device=e.device),
        torch.tensor(counter & _MASK32, device=e.device), seed & _MASK32, seed >> 32,
    )  # fmt: skip
    word = words[stream & 3]
    return word >> 16 if stream < 4 else word & 0xFFFF


def float_to_bf16_stochastic(x: Tensor, random: Tensor) -> Tensor:
    """fp32 ``x`` rounded to bf16 with the 16 random bits ``random`` per element: the carry
    of (bits + random) out of the low half; NaN -> 0x7FC0; never an infinity where round to
    nearest stays finite (saturates at 0x7F7F) ([note: stochastic rounding])."""
    u = x.to(torch.float32).view(torch.int32).to(torch.int64) & _MASK32
    magnitude = u & 0x7FFFFFFF
    rounded = (u + (random & 0xFFFF)) >> 16
    overflow = (magnitude < 0x7F7F8000) & ((rounded & 0x7FFF) == 0x7F80)
    saturated = ((u >> 16) & 0x8000) | 0x7F7F
    bits = torch.where(overflow, saturated, rounded)
    bits = torch.where(magnitude > 0x7F800000, torch.full_like(bits, 0x7FC0), bits)
    bits = torch.where(bits >= 0x8000, bits - 0x10000, bits)  # as int16
    return bits.to(torch.int16).view(torch.bfloat16)


def round_stochastic(x: Tensor, like: Tensor, sr_key: Tensor, i: int, stream: int = 0) -> Tensor:
    """``x`` (opmath) rounded to bf16 stochastically for tensor ``i`` of a call whose
    ``sr_key`` is [seed, counter, entry_0, ...], with ``like``'s (the stored tensor's) memory
    order, from the 16 bits of ``stream`` (0: the param store; k + 1: state slot k)."""
    seed, counter, entry = (int(v) for v in sr_key[[0, 1, 2 + i]].tolist())
    # entry: stream id | first element << 32 ([note: sharded stochastic rounding] in
    # fusedopt/optim/_plan.py): elements counted in the whole param
    first = (entry >> 32) & _MASK32
    bits = rounding_bits(seed, counter, entry, memory_order_index(like) + first, stream)
    return float_to_bf16_stochastic(x.to(torch.float32), bits)
