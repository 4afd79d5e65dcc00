"""The host side of a step op that runs as a reduction pass and an apply pass with
per-tensor sums of squares between them (LAMB, Adafactor; [note: multi-pass ops] in
DESIGN.md §2): the step op and its two pass ops, registered from the op's two launches."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .._contract import PHASE_OPS
from .layout import StepArguments, prepare
from .multi_tensor import TableCache
from .registry import register

#: A pass's launches over a prepared call, given the ``sq_norms`` [N, 2] they fill or read.
Launches = Callable[[StepArguments, torch.Tensor], None]


def _zero_norms(args: tuple) -> torch.Tensor:
    """``sq_norms`` zeros [N, 2] in the params' opmath, on their device."""
    params = args[0]
    fp64 = bool(params) and params[0].dtype == torch.float64
    device = params[0].device if params else torch.device("cpu")
    dtype = torch.float64 if fp64 else torch.float32
    return torch.zeros((len(params), 2), dtype=dtype, device=device)


def register_norm_passes(
    op: str, reduce_op: str, apply_op: str, tables: TableCache, reduce: Launches, apply: Launches
) -> None:
    """Register ``op`` (``reduce`` then ``apply`` on one ``sq_norms``), ``reduce_op`` (returns
    the ``sq_norms`` it filled) and ``apply_op`` (takes them: a contiguous [N, 2] tensor in
    the params' opmath on their device, checked before anything runs)."""

    def reduce_pass(*args) -> torch.Tensor:
        sq_norms = _zero_norms(args)
        a = prepare(op, args, tables)
        if a is not None:
            reduce(a, sq_norms)
        return sq_norms

    def apply_pass(*args) -> None:
        k = PHASE_OPS[apply_op].input_index
        sq_norms = args[k]
        expected = _zero_norms(args)
        if (sq_norms.shape, sq_norms.dtype, sq_norms.device) != (
            expected.shape, expected.dtype, expected.device,
        ) or not sq_norms.is_contiguous():  # fmt: skip
            raise TypeError(
                f"{apply_op}triton_: sq_norms must be a contiguous {expected.dtype} tensor of "
                f"shape {tuple(expected.shape)} on {expected.device}; got "
                f"{tuple(sq_norms.shape)}, {sq_norms.dtype} on {sq_norms.device}"
            )
        a = prepare(op, args[:k] + args[k + 1 :], tables)
        if a is not None:
            apply(a, sq_norms)

    def step(*args) -> None:
        a = prepare(op, args, tables)
        if a is None:
            return
        sq_norms = _zero_norms(args)
        reduce(a, sq_norms)
        apply(a, sq_norms)

    for name, function in ((op, step), (reduce_op, reduce_pass), (apply_op, apply_pass)):
        function.__name__ = function.__qualname__ = name
        register(name, function)
