"""Input checks shared by every op: each raises before any tensor is touched, naming the
offending list and index (``grads[3]``) and the problem."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fusedopt._dense import dense_stride, overlaps
from fusedopt._dense import is_dense as _dense

PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
LOW_PRECISION = (torch.bfloat16, torch.float16)


def _same_layout(a: Tensor, param: Tensor) -> bool:
    """``a`` has the layout of ``param``'s states: ``param``'s own when it is dense, else
    contiguous ([note: non-dense params] in fusedopt/_dense.py)."""
    if a.is_contiguous() and param.is_contiguous():
        return True
    stride = dense_stride(param)
    return all(
        sa == sb or size == 1 for size, sa, sb in zip(a.shape, a.stride(), stride, strict=True)
    )


def check_tensor(t: object, where: str, op: str, dense: bool = True, read: bool = False) -> Tensor:
    """Any tensor in a list: a real, strided tensor whose elements do not share memory (unless
    ``read``: an op that only reads it); dense too unless ``dense=False`` (a tensor stepped
    through a dense twin, [note: non-dense params] in fusedopt/_dense.py)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {where} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise RuntimeError(
            f"{op}: {where} is sparse ({t.layout}); only dense tensors are supported"
        )
    if t.is_complex():
        raise RuntimeError(f"{op}: {where} is complex ({t.dtype}); only real dtypes are supported")
    if not read and not _dense(t) and overlaps(t):
        raise RuntimeError(
            f"{op}: {where} overlaps itself (shape {tuple(t.shape)}, strides {t.stride()}): "
            "several of its elements share memory, so it cannot be updated in place (torch.optim "
            "refuses it too); pass a tensor that does not, e.g. its .clone()"
        )
    if dense and not _dense(t):
        raise RuntimeError(
            f"{op}: {where} is not dense (shape {tuple(t.shape)}, strides {t.stride()}); "
            "fused kernels need non-overlapping, dense memory: pass .contiguous() tensors"
        )
    return t


def check_like(t: Tensor, param: Tensor, where: str, op: str, dtype: torch.dtype | None) -> None:
    """A tensor that pairs element-for-element with ``param``: same shape, device, layout."""
    check_tensor(t, where, op)
    if t.shape != param.shape:
        raise RuntimeError(
            f"{op}: {where} has shape {tuple(t.shape)} but its param has {tuple(param.shape)}"
        )
    if t.device != param.device:
        raise RuntimeError(f"{op}: {where} is on {t.device} but its param is on {param.device}")
    if not _same_layout(t, param):
        raise RuntimeError(
            f"{op}: {where} has strides {t.stride()} but its param has {param.stride()}; "
            "both must share one memory layout"
        )
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{op}: {where} has dtype {t.dtype}, expected {dtype}")


def check_state(
    t: Tensor, param: Tensor, layout: str, where: str, op: str, dtype: torch.dtype
) -> None:
    """A state of ``param`` in ``layout`` ([note: factored layouts] in fusedopt._contract): the
    param's shape and layout for ``"param"`` (and ``"unfactored"`` on a vector), else a
    contiguous tensor of :func:`fusedopt._contract.state_shape` (a ``(0,)`` placeholder where
    the param has no such state)."""
    from fusedopt._contract import state_shape

    shape = state_shape(layout, param.shape)
    if shape == tuple(param.shape) and layout in ("param", "bf16", "unfactored"):
        check_like(t, param, where, op, dtype)
        return
    check_tensor(t, where, op)
    if tuple(t.shape) != shape:
        raise RuntimeError(
            f"{op}: {where} has shape {tuple(t.shape)} but a {layout!r} state of a param of "
            f"shape {tuple(param.shape)} has {shape}"
        )
    if t.device != param.device:
        raise RuntimeError(f"{op}: {where} is on {t.device} but its param is on {param.device}")
    if not t.is_contiguous():
        raise RuntimeError(f"{op}: {where} must be contiguous (a {layout!r} state)")
    if t.dtype != dtype and t.numel():
        raise TypeError(f"{op}: {where} has dtype {t.dtype}, expected {dtype}")


def check_scalar(
    t: Tensor | None, name: str, op: str, device: torch.device, allow_fp64: bool = False
) -> None:
    """A device scalar: a one-element fp32 tensor (fp32 or fp64 with ``allow_fp64``: an fp64
    step's grad_scale and clip_coef, [note: opmath scalars]) on the params' device."""
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a 0-d torch.Tensor or None, got {type(t).__name__}")
    dtypes = (torch.float32, torch.float64) if allow_fp64 else (torch.float32,)
    if t.numel() != 1 or t.dtype not in dtypes:
        allowed = "float32 or float64" if allow_fp64 else "float32"
        raise TypeError(
            f"{op}: {name} must be a one-element {allowed} tensor, got shape "
            f"{tuple(t.shape)} and dtype {t.dtype}"
        )
    if t.device != device:
        raise RuntimeError(f"{op}: {name} is on {t.device} but the tensors are on {device}")


def check_lengths(op: str, n: int, lists: dict[str, Sequence], optional: Sequence[str]) -> None:
    """Every list has length n; those named in ``optional`` may also be empty."""
    for name, values in lists.items():
        if len(values) != n and not (name in optional and len(values) == 0):
            allowed = f"{n} or 0" if name in optional else f"{n}"
            raise ValueError(
                f"{op}: {name} has {len(values)} entries but params has {n} (expected {allowed})"
            )


def per_tensor(op: str, name: str, value: float | Sequence[float], n: int) -> list[float]:
    """A hyperparameter as one Python float per tensor."""
    if isinstance(value, Tensor):
        raise TypeError(f"{op}: {name} must be a float or a sequence of floats, not a Tensor")
    if isinstance(value, int | float):
        return [float(value)] * n
    values = [float(v) for v in value]
    if len(values) != n:
        raise ValueError(f"{op}: {name} has {len(values)} values for {n} tensors")
    return values


def check_sr_key(
    sr_key: Tensor | None, op: str, params: Sequence[Tensor], master_params: Sequence[Tensor],
    state_dtype: torch.dtype | None = None,
) -> None:  # fmt: skip
    """A step op's ``sr_key`` ([note: stochastic rounding] in csrc/include/fusedopt/dtype.h):
    None, or a contiguous int64 vector ``[seed, counter, id_0, ..., id_{N-1}]`` on the params'
    device, beside bf16 params without master weights or bf16 states (``state_dtype``, the
    call's: [note: state dtype]), the stores it rounds; an id's high word is its tensor's
    first element in the whole param ([note: sharded stochastic rounding] in
    fusedopt/optim/_plan.py). The C++ backends check the same in ``StepArguments``."""
    if sr_key is None or not params:
        return
    n = len(params)
    if (
        not isinstance(sr_key, Tensor) or sr_key.dtype != torch.int64 or sr_key.dim() != 1
        or sr_key.numel() != n + 2 or not sr_key.is_contiguous()
    ):  # fmt: skip
        got = (
            f"shape {tuple(sr_key.shape)} and dtype {sr_key.dtype}"
            if isinstance(sr_key, Tensor) else type(sr_key).__name__
        )  # fmt: skip
        raise TypeError(
            f"{op}: sr_key must be a contiguous int64 vector of length {n + 2} ([seed, counter, "
            f"one id per param]); got {got}"
        )
    if sr_key.device != params[0].device:
        raise RuntimeError(f"{op}: sr_key is on {sr_key.device} but the params are on "
                           f"{params[0].device}")  # fmt: skip
    if state_dtype == torch.float16:
        raise TypeError(
            f"{op}: sr_key beside float16 states: stochastic rounding stores bf16 only, and "
            "every 16-bit store of an SR step rounds stochastically ([note: state dtype])"
        )
    bf16_param = params[0].dtype == torch.bfloat16 and not len(master_params)
    if not bf16_param and state_dtype != torch.bfloat16:
        masters = " with master_params" if len(master_params) else ""
        raise TypeError(
            f"{op}: sr_key (stochastic rounding of 16-bit stores) is for bfloat16 params "
            f"without master weights or bfloat16 states; got {params[0].dtype} params{masters}"
            f" and {state_dtype} states"
        )
