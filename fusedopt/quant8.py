"""8-bit optimizer states: the block-wise quantizer, defined once in plain torch.

[note: 8-bit states] A group with ``state_bits=8`` keeps its moments (the states its op's
spec declares quantized, ``StepOpSpec.quantized_states``: AdamW/Adam's and LAMB's
``exp_avg`` and ``exp_avg_sq``, Lion's ``exp_avg``, SGD's ``momentum_buffer``) as one byte
per element plus one fp32 scale per block:

* **Blocks never depend on a mesh.** A block is a run of up to :data:`BLOCK` (256) elements
  within one row of the param's last dimension: row ``r`` of a ``(*lead, C)`` param holds
  blocks ``[r, 0..ceil(C/256))``, the last one short when 256 does not divide C. The scales
  have shape ``(*lead, ceil(C/256))`` (:func:`scale_shape`; a 0-d param: ``(1,)``). FSDP2
  shards params (and so their states) on dim 0: a shard of a param of two or more dims
  holds whole rows, hence whole blocks, and its scales are the same dim-0 shard of the
  scales, so a sharded state is the unsharded one cut in pieces, and a checkpoint saved on
  one mesh loads on another ([note: 8-bit states under FSDP2], below). A 1-D param's only
  dim is the last one: a dim-0 shard cuts its blocks unless the shard size is a multiple
  of 256, so sharded 1-D params keep plain states (biases and norms in a group without
  ``state_bits``; a negligible share of the memory, as bitsandbytes' ``min_8bit_size``
  assumes). torchao's 8-bit AdamW blocks the flattened local shard instead, so its blocks,
  and so its precision, change with the mesh.
* **Scale: the block's absmax** (fp32, as bitsandbytes and torchao). Values are normalised
  ``y = x / absmax`` in [-1, 1] by one IEEE fp32 division.
* **Code maps: power maps.** The first moment (signed) takes an int8 code
  ``q in [-127, 127]`` for ``sign(y) * (|q|/127)**P_SIGNED``; the second moment (never
  negative) a uint8 code ``q in [0, 255]`` for ``(q/255)**P_UNSIGNED``. Linear maps (P=1)
  send every element below half a code step of the block's absmax to 0; for ``exp_avg_sq``
  that is fatal (the update m/(sqrt(v)+eps) of an element whose v became 0 is m/eps), and
  real second moments span 4-8 decades within a block. A power map spends its codes
  geometrically near 0. Chosen by the measurement in ``bench/q8_maps.py`` on the moments
  of the byte-level LM of ``bench/lm_quality.py`` after 200 AdamW steps (numbers in
  DESIGN.md [note: 8-bit states]): the error of the *update* ``m/(sqrt(v)+eps)`` that the
  dequantized moments give, and the fraction of elements whose ``v`` dequantizes to 0.
  bitsandbytes' and torchao's dynamic-tree map reaches a similar spread with an exponent
  field; a power map needs no table generator of its own, and its codes are products of
  exact fp64 operations, so every backend derives the same table (:func:`code_table`).
  The second moment is stored as v itself, not sqrt(v): a power map of exponent P on
  sqrt(v) is a map of exponent 2P on v, up to where the midpoints fall, so the exponent
  is the one choice, and storing v saves a sqrt and a square per element.
* **Rounding: to the nearest code, by the fp32 midpoints.** ``|q|`` is the number of
  midpoints ``mid[k] = fp32((code[k] + code[k+1]) / 2)`` (in fp64, rounded once) that are
  strictly below ``|y|``: nearest, a tie (``|y| == mid[k]``) going to the smaller code. Only
  comparisons of fp32 values: every backend finds the same code (a binary search).
* **Dequantization** is ``fp32(code[|q|]) * scale`` (one fp32 product), negated for a
  negative q.
* **Edge cases.** An all-zero block has scale 0 and codes 0. A block holding an infinity or
  NaN stores its absmax (a NaN as the canonical 0x7FC00000) and codes 0, so the whole block
  dequantizes to NaN: a non-finite moment poisons its block, not just its element (an fp32
  state would keep it in one element; it is a divergence either way).
* **Quantization error** (the derived bound the tests check): an element ``x`` of a block
  of absmax ``s`` comes back within half the gap between the two codes around ``x/s``,
  times ``s`` (plus the fp32 roundings of the division and the product, 2 ulps).

[note: 8-bit states under FSDP2] A DTensor param (FSDP2: ``Shard(0)`` over the mesh)
keeps its codes and scales as DTensors with the param's mesh and placements: codes of the
param's global shape, scales of :func:`scale_shape` of the global shape, each rank's shards
made from (and stepped with) its local shard alone, no communication
(``fusedopt.optim._state_bits``). Any placement that cuts no row of the last dimension
qualifies (``Replicate``, ``Shard(d)`` for d below the last dim): a shard of rows holds
whole blocks, and the scales, whose leading dims are the param's, shard the same way, so
uneven shards (FSDP2 puts fewer rows, maybe none, on the last ranks) hold exactly their
rows' blocks. The sharded step is then the unsharded step cut in pieces, bit for bit, and
DCP saves codes and scales with their global offsets: a checkpoint saved on 2 ranks loads
into 2 ranks or into one unsharded optimizer and goes on with the bits of the uninterrupted
run (``tests/test_distributed.py``: ``fsdp2_q8_equals_unsharded``,
``fsdp2_q8_checkpoint_reshards``). A param sharded on its last dim, that is every 1-D param
under FSDP2 (biases, norms), would have its blocks cut wherever a shard boundary falls
inside one, so its states would depend on the mesh; it is refused with a ``ValueError``
naming it (before any tensor is touched): put such params in a group with
``state_bits=None``. Chosen over keeping plain states for them silently (what
bitsandbytes' ``min_8bit_size`` amounts to) because the states' format must not change with
the mesh: the same param 8-bit unsharded and plain sharded would not load from one into the
other.

Every backend implements exactly these rules (``fusedopt.reference``: the functions below;
the CPU launcher and the CUDA kernel: ``csrc/include/fusedopt/quant8.h``); the tests hold
their codes and scales equal bit for bit.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from fusedopt._contract import QUANT_BLOCK, state_shape

#: Elements per quantization block: a run within one row of the last dimension.
BLOCK = QUANT_BLOCK
#: Exponents of the power maps ([note: 8-bit states]; ``bench/q8_maps.py``: 2 for the first
#: moment gave the smallest update error, 4 for the second the margin against v -> 0).
P_SIGNED = 2
P_UNSIGNED = 4
#: Codes on each side of zero: int8 magnitudes 0..127, uint8 0..255.
LEVELS_SIGNED = 127
LEVELS_UNSIGNED = 255
#: The dtypes of the quantized first (signed) and second (unsigned) moments.
SIGNED_DTYPE = torch.int8
UNSIGNED_DTYPE = torch.uint8
CANONICAL_NAN = 0x7FC00000


def scale_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """The shape of the block scales of a param of ``shape``: ``(*shape[:-1],
    ceil(shape[-1] / BLOCK))``; ``(1,)`` for a 0-d param ([note: 8-bit states])."""
    return state_shape("block_scales", shape)


def code_table(signed: bool, power: int | None = None, levels: int | None = None) -> list[float]:
    """The magnitudes of the codes, ``(k/levels)**power`` for ``k = 0..levels``, in fp64 by
    repeated products (exact IEEE operations, the same in C++), as Python floats."""
    power = power if power is not None else (P_SIGNED if signed else P_UNSIGNED)
    levels = levels if levels is not None else (LEVELS_SIGNED if signed else LEVELS_UNSIGNED)
    table = []
    for k in range(levels + 1):
        base = k / levels
        value = base
        for _ in range(power - 1):
            value = value * base
        table.append(value)
    return table


@functools.cache
def _tables(signed: bool, power: int, levels: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(codes, midpoints) as fp32 tensors on ``device``."""
    table = code_table(signed, power, levels)
    mids = [(a + b) / 2 for a, b in itertools.pairwise(table)]
    codes = torch.tensor(table, dtype=torch.float64).to(torch.float32)
    midpoints = torch.tensor(mids, dtype=torch.float64).to(torch.float32)
    return codes.to(device), midpoints.to(device)


def _blocks(x: Tensor) -> tuple[Tensor, int]:
    """``x`` (any shape) as ``(*lead, nb, BLOCK)`` fp32, zero-padded at the end of each row;
    and the row length."""
    rows = x.reshape(1) if x.dim() == 0 else x
    c = rows.shape[-1]
    nb = -(-c // BLOCK)
    padded = torch.nn.functional.pad(rows.to(torch.float32), (0, nb * BLOCK - c))
    return padded.reshape(*rows.shape[:-1], nb, BLOCK), c


def _unblocks(blocks: Tensor, c: int, shape: torch.Size) -> Tensor:
    flat = blocks.reshape(*blocks.shape[:-2], blocks.shape[-2] * BLOCK)[..., :c]
    return flat.reshape(shape)


def quantize(
    x: Tensor, signed: bool, power: int | None = None, levels: int | None = None
) -> tuple[Tensor, Tensor]:
    """``x`` (fp32 values, the param's shape) as (codes, scales): int8 codes (signed) or
    uint8 (unsigned) of ``x``'s shape, contiguous, and fp32 scales of :func:`scale_shape`.
    The exact rule of [note: 8-bit states]."""
    power = power if power is not None else (P_SIGNED if signed else P_UNSIGNED)
    levels = levels if levels is not None else (LEVELS_SIGNED if signed else LEVELS_UNSIGNED)
    _, midpoints = _tables(signed, power, levels, x.device)
    blocks, c = _blocks(x)
    absmax = blocks.abs().amax(-1)  # NaN propagates
    nan = torch.tensor(CANONICAL_NAN, dtype=torch.int32, device=x.device).view(torch.float32)
    absmax = torch.where(absmax.isnan(), nan, absmax)
    finite = torch.isfinite(absmax) & (absmax > 0)
    divisor = torch.where(finite, absmax, torch.ones_like(absmax))
    y = blocks / divisor.unsqueeze(-1)
    y = torch.where(finite.unsqueeze(-1), y, torch.zeros_like(y))
    magnitude = torch.searchsorted(midpoints, y.abs().contiguous(), side="left")
    q = torch.where(y < 0, -magnitude, magnitude) if signed else magnitude
    dtype = SIGNED_DTYPE if signed else UNSIGNED_DTYPE
    codes = _unblocks(q, c, x.shape).to(dtype).contiguous()
    return codes, absmax.reshape(scale_shape(x.shape)).contiguous()


def dequantize(
    codes: Tensor, scales: Tensor, power: int | None = None, levels: int | None = None
) -> Tensor:
    """The fp32 values of (codes, scales): ``fp32(code[|q|]) * scale``, negated for q < 0."""
    signed = codes.dtype == SIGNED_DTYPE
    power = power if power is not None else (P_SIGNED if signed else P_UNSIGNED)
    levels = levels if levels is not None else (LEVELS_SIGNED if signed else LEVELS_UNSIGNED)
    table, _ = _tables(signed, power, levels, codes.device)
    blocks, c = _blocks(codes.to(torch.int64))
    q = blocks.to(torch.int64)
    values = table[q.abs()] * scales.reshape(*blocks.shape[:-1]).unsqueeze(-1)
    values = torch.where(q < 0, -values, values)
    return _unblocks(values, c, codes.shape).contiguous()


def half_gap_bound(x: Tensor, scales_of_x: Tensor, signed: bool) -> Tensor:
    """The derived bound on ``|dequantize(quantize(x)) - x|`` per element: half the gap
    between the codes around ``|x|/s``, times s, plus 2 fp32 ulps of the result (the
    division and the product) ([note: 8-bit states], the tests' bound)."""
    power = P_SIGNED if signed else P_UNSIGNED
    levels = LEVELS_SIGNED if signed else LEVELS_UNSIGNED
    table = torch.tensor(code_table(signed, power, levels), dtype=torch.float64, device=x.device)
    blocks, c = _blocks(x.to(torch.float64))
    s = scales_of_x.to(torch.float64).reshape(*blocks.shape[:-1]).unsqueeze(-1)
    y = (blocks.abs() / torch.where(s > 0, s, torch.ones_like(s))).clamp(max=1.0)
    upper = torch.searchsorted(table, y.contiguous()).clamp(1, levels)
    gap = table[upper] - table[upper - 1]
    bound = gap / 2 * s + 2 * torch.finfo(torch.float32).eps * (blocks.abs() + s * gap)
    return _unblocks(bound, c, x.shape)


def is_quantized(t: Tensor) -> bool:
    """Whether a state tensor holds 8-bit codes."""
    return t.dtype in (SIGNED_DTYPE, UNSIGNED_DTYPE)


def bytes_per_element(numel_last: int) -> float:
    """Bytes a quantized state holds per element for rows of ``numel_last``: 1 + 4 per block."""
    return 1 + 4 * math.ceil(numel_last / BLOCK) / numel_last
