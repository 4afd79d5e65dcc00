"""The op contract: the schema of every fusedopt op, declared once.

Every backend registers its own copy of each op as ``fusedopt::<op>_<backend>[_]`` (the
dispatcher picks kernels by device, not by backend, so each backend needs its own op name);
the schemas below are shared, so all backends take exactly the same arguments. The C++
extension only *implements* these ops (``TORCH_LIBRARY_IMPL``); the definitions live here so
that they exist even when ``fusedopt._C`` is not built. DESIGN.md §3 summarises this table.

Conventions common to every op (see [note: common scalars]):

* Tensor lists are aligned: ``params[i]``, ``grads[i]``, ``exp_avgs[i]``... belong to the same
  parameter. All tensors of one call share one device. Within one call all params share one
  dtype, all grads share one dtype (the param dtype or fp32), and ``master_params`` is either
  empty (no master weights) or one fp32 tensor per param. The functional layer
  (``fusedopt.ops``) splits a user's lists into such calls.
* Per-tensor hyperparameters are ``float[]`` lists of length N (one value per tensor), so
  that one launch covers every param group. Flags that change the code path (``amsgrad``,
  ``nesterov``...) are per call.
* ``lr_tensor``: when given, overrides ``lr``; a 0-d fp32 tensor (one lr for all tensors) or a
  1-d fp32 tensor of length N, on the params' device.
* ``steps``: one 0-d fp32 tensor per param on the params' device (torch's layout). The op
  adds 1 to each, unless ``found_inf`` is non-zero, then uses the new value ``t``. Bias
  corrections ``1 - beta**t`` are computed in float64.
* ``grad_scale``: 0-d fp32 (or fp64 when the params are fp64); every grad is divided by it on
  load (never written back).
* ``clip_coef``: 0-d fp32 (or fp64 when the params are fp64); every grad is multiplied by it on
  load, after the division.
* ``found_inf``: 0-d fp32; when non-zero the whole op is a no-op: params, master params,
  states and steps stay bit-identical.
* ``master_sync`` (every step op's last argument, default True): see [note: master sync].

[note: common scalars] Order of operations on a grad element, in opmath (fp32; fp64 for
fp64 storage): ``g = grad; g = g / grad_scale; g = g * clip_coef; if maximize: g = -g``.

[note: opmath scalars] ``grad_scale`` and ``clip_coef`` are read in opmath: an fp64 call takes
them as fp64 (an fp32 one is widened, exactly; the C++ backends widen it before the launch, so
their kernels read one value of the opmath type), so that an fp64 model's clip coefficient is
not rounded to fp32. ``found_inf`` and ``lr_tensor`` stay fp32. DESIGN.md §3.

[note: master sync] With master weights a step reads the fp32 master, not the param, and
writes ``master.to(param.dtype)`` into the param. A value written into the param between
steps (``load_state_dict`` of the model, re-initialising a layer, ``p.clamp_()``) would be
lost: the next step would rebuild the param from the stale master. So with
``master_sync=True`` every element of a step first compares the param's bits with the bits of
its rounded master, and where they differ takes the param's value (widened to fp32) as the
master before the update. Bits, not values: a param written to ``+0`` over a ``-0`` master,
or to a NaN of other bits, is adopted; an unchanged NaN is not. An element the user did not
touch keeps its master's extra precision. It costs one read of the param (2 bytes per
element). With ``found_inf`` set nothing is adopted either (the step changes nothing; the
next step adopts). LAMB adopts in both passes alike, so ``|p|`` of the trust ratio is the
norm of the adopted master. ``master_sync=False`` is the old behaviour (Apex's, TE's,
DeepSpeed's): the master alone is the truth. Without master params the flag does nothing.
"""

from __future__ import annotations

import torch

NAMESPACE = "fusedopt"

#: Every backend's name, in the order ``backend="auto"`` prefers them for a device.
BACKEND_NAMES: tuple[str, ...] = ("cuda", "triton", "cpu", "reference")

_COMMON_SCALARS = "Tensor? lr_tensor, Tensor? grad_scale, Tensor? clip_coef, Tensor? found_inf"
#: What every step op ends with: the common scalars, then the master_sync flag ([note: master
#: sync]), last and with a default so that positional callers of the older schema still fit.
_STEP_TAIL = _COMMON_SCALARS + ", bool master_sync=True"

#: op name -> schema template. ``{name}`` is replaced by the backend-specific op name.
#: In-place ops end in ``_``; the backend suffix goes before it (``adamw_cuda_``).
SCHEMAS: dict[str, str] = {
    # tensors *= scale (opmath, rounded to storage). found_inf, when given, is set to 1.0
    # if any element of the input is non-finite; it is never cleared (as torch's amp check).
    "scale_": "{name}(Tensor(a!)[] tensors, Tensor scale, Tensor(b!)? found_inf) -> ()",
    # Global norm of the tensors (each divided by the fp32 grad_scale first), accumulated in
    # fp32 for every storage dtype (fp64, with fp64 outputs, if every tensor is fp64),
    # deterministic. norm_type is 2.0 or
    # inf. Returns (total_norm 0-d, per_tensor_norms [N] if per_tensor else [0],
    # found_inf 0-d: 1.0 if any element is non-finite, else 0.0).
    "grad_norm": (
        "{name}(Tensor[] tensors, float norm_type, bool per_tensor, Tensor? grad_scale)"
        " -> (Tensor total_norm, Tensor per_tensor_norms, Tensor found_inf)"
    ),
    # Adam / AdamW. decoupled=True: p *= 1 - lr*wd; decoupled=False (Adam): g += wd*p.
    # max_exp_avg_sqs is empty unless amsgrad.
    "adamw_": (
        "{name}(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs,"
        " Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] master_params,"
        " Tensor(f!)[] steps, float[] lr, float[] beta1, float[] beta2, float[] eps,"
        " float[] weight_decay, bool decoupled, bool amsgrad, bool maximize,"
        " bool bias_correction, " + _STEP_TAIL + ") -> ()"
    ),
    # LAMB, timm semantics. The global clip g /= max(1, |g|/max_grad_norm) arrives folded
    # into clip_coef (the functional layer computes it with grad_norm), so the op itself
    # sees only the common scalars.
    "lamb_": (
        "{name}(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs,"
        " Tensor(c!)[] exp_avg_sqs, Tensor(e!)[] master_params, Tensor(f!)[] steps,"
        " float[] lr, float[] beta1, float[] beta2, float[] eps, float[] weight_decay,"
        " bool grad_averaging, bool bias_correction, bool trust_clip, bool always_adapt,"
        " " + _STEP_TAIL + ") -> ()"
    ),
    # Lion (lion-pytorch): p *= 1 - lr*wd; p -= lr*sign(b1*m + (1-b1)*g); m = b2*m + (1-b2)*g.
    "lion_": (
        "{name}(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs,"
        " Tensor(e!)[] master_params, float[] lr, float[] beta1, float[] beta2,"
        " float[] weight_decay, bool maximize, " + _STEP_TAIL + ") -> ()"
    ),
    # SGD (torch.optim.SGD). momentum_buffers and steps are both empty (no momentum in this
    # call: every momentum value is 0) or both of length N. A param whose step count is 0
    # before this step takes buf = g (torch's first-step rule); a skipped step does not count.
    # A tensor whose momentum is 0 in a call with buffers steps as p -= lr*g (torch's
    # momentum-free SGD: no dampening) and leaves its buffer and step untouched.
    "sgd_": (
        "{name}(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers,"
        " Tensor(e!)[] master_params, Tensor(f!)[] steps, float[] lr, float[] momentum,"
        " float[] dampening, float[] weight_decay, bool nesterov, bool maximize,"
        " " + _STEP_TAIL + ") -> ()"
    ),
}

OP_NAMES: tuple[str, ...] = tuple(SCHEMAS)


def op_name(op: str, backend: str) -> str:
    """The registered name of ``op`` for ``backend``: ``adamw_`` + ``cuda`` -> ``adamw_cuda_``."""
    if op not in SCHEMAS:
        raise ValueError(f"unknown fusedopt op {op!r}; known: {', '.join(OP_NAMES)}")
    if backend not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {backend!r}; known: {', '.join(BACKEND_NAMES)}")
    return f"{op[:-1]}_{backend}_" if op.endswith("_") else f"{op}_{backend}"


def op_handle(op: str, backend: str) -> torch._ops.OpOverloadPacket:
    """``torch.ops.fusedopt.<op_name(op, backend)>``."""
    return getattr(getattr(torch.ops, NAMESPACE), op_name(op, backend))


def _fake_grad_norm(tensors, norm_type, per_tensor, grad_scale):
    device = tensors[0].device if tensors else torch.device("cpu")
    dtype = (
        torch.float64
        if tensors and all(t.dtype == torch.float64 for t in tensors)
        else torch.float32
    )
    n = len(tensors) if per_tensor else 0
    return (
        torch.empty((), dtype=dtype, device=device),
        torch.empty((n,), dtype=dtype, device=device),
        torch.empty((), dtype=torch.float32, device=device),
    )


def _fake_inplace(*args, **kwargs):
    return None


_LIBRARY = torch.library.Library(NAMESPACE, "DEF")


def _define_all() -> None:
    for op, template in SCHEMAS.items():
        fake = _fake_grad_norm if op == "grad_norm" else _fake_inplace
        for backend in BACKEND_NAMES:
            name = op_name(op, backend)
            _LIBRARY.define(template.format(name=name))
            torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=_LIBRARY)


_define_all()
