"""Multi-tensor launch tables: one launch covers every tensor of a call (DESIGN.md §2).

A call's tensors are cut into chunks of ``CHUNK`` elements; the kernel's grid has one program
per chunk. Two device tables drive it:

* the **tensor table**, ``int64 [N, WIDTH]``, one row per tensor::

      [numel, first_chunk, n_chunks, address of list 0, ..., address of list S-1,
       address of the tensor's hyperparameter row]                       (step ops)
      [numel, first_chunk, n_chunks, address of the tensors, column 0, ...] (scale_, grad_norm)

  The kernel turns an address into a typed pointer (``int64 -> tl.pointer_type``), which works
  both compiled and under ``TRITON_INTERPRET=1`` (the interpreter dereferences raw addresses
  too), so one scheme serves both. A step op's hyperparameters stay in the caller's float64
  ``[G, K]`` table ([note: hyper table] in ``fusedopt._contract``): the row holds the address
  of its group's row there, so a changed value (an lr schedule) changes no tensor table.
  The mixed-dtype ops keep their per-tensor dtype code as a float64 column.
* the **chunk table**, ``int32 [n_chunks, 2]``: (tensor index, chunk index within the tensor).

[note: table caching] What fixes the chunk table is the tensor count and sizes (and dtypes,
which pick the kernel), so that is the cache key. The chunk table is built once per key with
torch ops over chunk counts (no per-element host work) and stays on the device. Addresses
(hyperparameter rows included) and columns are compared with the cached ones on every call
(O(N) Python ints, no device access) and the tensor table is re-uploaded only when one moved
(grads set to None come back at new addresses; a new hyperparameter table); an lr schedule,
which rewrites the hyperparameter table in place, uploads nothing. On CUDA the upload is a
non-blocking copy from pinned memory: no host sync. A table that a CUDA graph captured is
kept alive for the life of the cache (the graph reads it at every replay), and never written
again: a rebuild allocates a new table.

[note: empty tensors] Every tensor gets at least one chunk, even an empty one, so that its
step count advances and its per-tensor norm (0) is written by the same kernels.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor

#: Elements per program (chunk). 2^16: large enough that the per-program set-up is noise,
#: small enough that a 1-tensor call still fills an H200 (132 SMs) from 8.6M elements on.
CHUNK = 1 << 16
#: Elements per inner iteration: 4 warps x 32 threads x 8 elements (one 128-bit access of
#: bf16, two of fp32 per thread).
BLOCK = 1024
#: Columns before the first address: numel, first_chunk, n_chunks.
HEADER = 3
#: Byte alignment that the vectorised path needs (128-bit accesses).
ALIGNMENT = 16


def address(t: Tensor | None) -> int:
    """The tensor's data address (0 for an absent tensor)."""
    return 0 if t is None else t.data_ptr()


@dataclasses.dataclass
class Launch:
    """What a multi-tensor kernel needs: the tables and the grid."""

    table: Tensor  # int64 [N, width]
    chunks: Tensor  # int32 [n_chunks, 2]
    counters: Tensor  # int32 [N] zeros, for the last-chunk-finishes-the-tensor protocol
    n_chunks: int
    width: int
    aligned: bool  # every address is ALIGNMENT-byte aligned: the 128-bit path is safe


@dataclasses.dataclass
class _Entry:
    chunks: Tensor
    counters: Tensor
    n_chunks: int
    addresses: list[int] | None = None
    hyper_rows: list[int] | None = None
    columns: list[tuple[float, ...]] | None = None
    table: Tensor | None = None
    pinned: Tensor | None = None  # the host copy the last upload read from
    captured: bool = False


def _upload(host: Tensor, device: torch.device) -> tuple[Tensor, Tensor | None]:
    """Host table -> device without a host sync (pinned, non-blocking on CUDA)."""
    if device.type != "cuda":
        return host.to(device), None
    pinned = host.pin_memory()
    return pinned.to(device, non_blocking=True), pinned


def _chunk_table(numels: Sequence[int], device: torch.device) -> tuple[Tensor, int]:
    counts = torch.tensor([max(1, -(-n // CHUNK)) for n in numels], dtype=torch.int64)
    total = int(counts.sum())
    tensor_ids = torch.repeat_interleave(torch.arange(len(numels)), counts)
    first = torch.cumsum(counts, 0) - counts
    chunk_ids = torch.arange(total) - torch.repeat_interleave(first, counts)
    table = torch.stack([tensor_ids, chunk_ids], dim=1).to(torch.int32)
    return _upload(table, device)[0], total


class TableCache:
    """Tables of one op, cached across steps ([note: table caching]).

    Kept inside the op's implementation so that ``torch.compile`` sees no Python pointer
    logic. ``max_entries`` bounds memory when calls alternate between tensor lists (param
    dtypes, groups); the least recently used entry goes first.
    """

    def __init__(self, max_entries: int = 16) -> None:
        self._entries: collections.OrderedDict[tuple, _Entry] = collections.OrderedDict()
        self._max_entries = max_entries
        self._captured: list[Tensor] = []  # tables a CUDA graph may still read
        self.uploads = 0  # tensor tables built and uploaded so far (a test counts them)

    def launch(
        self,
        lists: Sequence[Sequence[Tensor | None]],
        columns: Sequence[Sequence[float]] = (),
        extra_key: tuple = (),
        scalar_lists: Sequence[int] = (),
        hyper_rows: Sequence[int] = (),
    ) -> Launch:
        """Tables for ``lists`` (aligned, one entry per tensor; the first list gives the
        sizes; an empty list stands for an absent one), then either ``hyper_rows`` (each
        tensor's hyperparameter row address, a step op's) or ``columns`` (K lists of N
        floats). ``scalar_lists`` (indices into ``lists``: the step counts) are read as
        scalars, so their addresses do not decide whether the 128-bit path is safe."""
        first = lists[0]
        n = len(first)
        device = first[0].device
        numels = tuple(t.numel() for t in first)
        key = (device, numels, len(lists), len(columns), bool(hyper_rows), extra_key)
        entry = self._entries.get(key)
        if entry is None:
            chunks, n_chunks = _chunk_table(numels, device)
            counters = torch.zeros(n, dtype=torch.int32, device=device)
            entry = _Entry(chunks, counters, n_chunks)
            self._entries[key] = entry
            if len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)
        else:
            self._entries.move_to_end(key)
        addresses = [address(seq[i]) if seq else 0 for i in range(n) for seq in lists]
        rows = list(zip(*columns, strict=True)) if columns else []
        hyper_rows = list(hyper_rows)
        if (
            entry.table is None
            or addresses != entry.addresses
            or hyper_rows != entry.hyper_rows
            or rows != entry.columns
        ):
            self._rebuild(entry, numels, lists, addresses, hyper_rows, rows, device)
        if not entry.captured and _capturing(device):
            entry.captured = True
            self._captured += [entry.table, entry.chunks, entry.counters]
        width = len(lists)
        aligned = all(
            a % ALIGNMENT == 0 for k, a in enumerate(addresses) if k % width not in scalar_lists
        )
        return Launch(
            entry.table, entry.chunks, entry.counters, entry.n_chunks, entry.table.shape[1], aligned
        )

    def _rebuild(self, entry, numels, lists, addresses, hyper_rows, rows, device) -> None:
        n, s = len(numels), len(lists)
        counts = [max(1, -(-m // CHUNK)) for m in numels]
        firsts = [0] * n
        for i in range(1, n):
            firsts[i] = firsts[i - 1] + counts[i - 1]
        header = torch.tensor(list(zip(numels, firsts, counts, strict=True)), dtype=torch.int64)
        host = [header.reshape(n, HEADER), torch.tensor(addresses, dtype=torch.int64).view(n, s)]
        if hyper_rows:
            host.append(torch.tensor(hyper_rows, dtype=torch.int64).view(n, 1))
        if rows:
            host.append(torch.tensor(rows, dtype=torch.float64).view(torch.int64))
        table, pinned = _upload(torch.cat(host, dim=1), device)
        # A captured table is never overwritten: the new one is a new allocation anyway.
        entry.table, entry.pinned = table, pinned
        entry.addresses, entry.hyper_rows, entry.columns = addresses, hyper_rows, rows
        entry.captured = False
        self.uploads += 1


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


_TL_DTYPES = {
    torch.float32: "float32",
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
    torch.float64: "float64",
}


def tl_dtype(dtype: torch.dtype):
    """The Triton dtype of a torch dtype (a constexpr kernel argument)."""
    import triton.language as tl

    return getattr(tl, _TL_DTYPES[dtype])


#: A step kernel's MASTER constexpr: no master weights; masters; masters that first adopt a
#: param written since the last step ([note: master sync] in fusedopt._contract); compact
#: masters, the int16 remainders of bf16 params ([note: compact master]); MASTER_KAHAN: Kahan
#: masters, a compensation of the param's own dtype ([note: kahan master]).
#: MASTER_STOCHASTIC: no master weights, the bf16 param store rounded stochastically
#: ([note: stochastic rounding] in csrc/include/fusedopt/dtype.h).
NO_MASTER, MASTER, MASTER_SYNCED, MASTER_COMPACT, MASTER_STOCHASTIC, MASTER_KAHAN = range(6)


def dtype_arguments(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    master: bool,
    master_sync: bool = False,
    compact: bool = False,
    kahan: bool = False,
    stochastic: bool = False,
    state_dtype: torch.dtype | None = None,
    free_states: bool = False,
) -> dict:
    """Constexpr dtypes of a step call (one param dtype, one grad dtype: fusedopt.ops splits),
    and MASTER (``NO_MASTER``, ``MASTER``, ``MASTER_SYNCED`` or, for int16 ``compact``
    masters, ``MASTER_COMPACT``; for ``kahan`` ones, ``MASTER_KAHAN``; ``MASTER_STOCHASTIC``
    for bf16 params without masters when the call has an ``sr_key``).

    States are fp32 with master weights, else in the param dtype (DESIGN.md §3), unless the
    op has ``free_states`` and the call's ``state_dtype`` says otherwise; then, with an
    ``sr_key``, bf16 states round stochastically: ``STATE_SR`` ([note: state dtype] in
    csrc/include/fusedopt/dtype.h). The math is fp32, fp64 for fp64 params."""
    p, g = params[0].dtype, grads[0].dtype
    mode = (MASTER_SYNCED if master_sync else MASTER) if master else NO_MASTER
    if master and compact:
        mode = MASTER_COMPACT
    if master and kahan:
        mode = MASTER_KAHAN
    if stochastic and p == torch.bfloat16 and not master:
        mode = MASTER_STOCHASTIC
    default = torch.float32 if master else p
    states = state_dtype if free_states and state_dtype is not None else default
    out = {
        "P_DTYPE": tl_dtype(p),
        "G_DTYPE": tl_dtype(g),
        "S_DTYPE": tl_dtype(states),
        "COMPUTE": tl_dtype(torch.float64 if p == torch.float64 else torch.float32),
        "MASTER": mode,
    }
    if stochastic and free_states and states == torch.bfloat16:
        out["STATE_SR"] = True  # absent (the kernels' default False) for every other call
    return out


def scalar_arguments(
    dummy: Tensor,
    lr_tensor: Tensor | None,
    grad_scale: Tensor | None,
    clip_coef: Tensor | None,
    found_inf: Tensor | None,
    sr_key: Tensor | None = None,
) -> tuple[list[Tensor], dict]:
    """The common scalars and ``sr_key`` as kernel arguments (``dummy`` stands in for an
    absent one) and the constexpr flags saying which are present (an sr_key shows in the
    MASTER constexpr: ``dtype_arguments``). LR_MODE: 0 lr from the table (Python floats), 1 a
    0-d lr tensor, 2 one lr per tensor."""
    lr_mode = 0 if lr_tensor is None else (1 if lr_tensor.dim() == 0 else 2)
    scalars = (lr_tensor, grad_scale, clip_coef, found_inf, sr_key)
    tensors = [t if t is not None else dummy for t in scalars]
    flags = {
        "LR_MODE": lr_mode,
        "HAS_GRAD_SCALE": grad_scale is not None,
        "HAS_CLIP": clip_coef is not None,
        "HAS_FOUND_INF": found_inf is not None,
    }
    return tensors, flags


#: Per-tensor dtype codes, for ops whose tensors may mix dtypes in one call (scale_,
#: grad_norm): the kernel branches on the code, compiling only the branches present.
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}


def dtype_code_arguments(tensors: Sequence[Tensor]) -> tuple[list[float], dict]:
    """The per-tensor dtype codes (a table column) and the HAS_* constexprs."""
    present = {t.dtype for t in tensors}
    flags = {
        "HAS_F32": torch.float32 in present,
        "HAS_BF16": torch.bfloat16 in present,
        "HAS_F16": torch.float16 in present,
        "HAS_F64": torch.float64 in present,
    }
    return [float(DTYPE_CODES[t.dtype]) for t in tensors], flags
