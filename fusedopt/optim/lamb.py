"""``fusedopt.LAMB``: timm's ``Lamb`` constructor and semantics, one ``lamb_`` op.

[note: sharded LAMB] LAMB's trust ratio ``‖p‖/‖u‖`` needs the norms of *whole* tensors.
The ``lamb_`` op computes them from the tensors it is given, which for a DTensor param
(FSDP2) is only the local shard. For params sharded that way this module runs a
decomposition instead: on the local shards it forms the new moments and the update ``u`` in
fp32, sums the squared per-tensor norms ``‖p‖², ‖u‖²`` of all params in one all-reduce over
the mesh, and only then applies ``p -= lr * r * u``. It is a second writing of the LAMB math,
kept to plain torch ops on purpose (it is the path that must be right, not fast); the skip on
``found_inf`` stays on the device (``torch.where``), so it needs no host sync either.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor

from fusedopt import ops
from fusedopt._contract import STEP_OPS
from fusedopt.clip import _reduce_groups
from fusedopt.optim._base import FusedOptimizer
from fusedopt.optim.adamw import adam_hypers, check_adam_group
from fusedopt.reference import load_grad


class LAMB(FusedOptimizer):
    """LAMB (You et al. 2019) with timm's ``Lamb`` arguments, defaults and semantics, fused.

    The global clip ``g /= max(1, ‖g‖ / max_grad_norm)`` (timm's default ``max_grad_norm=1.0``;
    None disables it) runs inside ``step()`` from the one ``grad_norm`` pass and is folded into
    the step's ``clip_coef``; the norm stays in :attr:`last_grad_norm`. timm's ``caution`` and
    ``decoupled_decay`` are not implemented (True raises). DTensor params: see
    [note: sharded LAMB]. State per param: ``step`` (0-d fp32 on the device), ``exp_avg``,
    ``exp_avg_sq`` (and ``master_param``).
    """

    OP = "lamb_"
    #: torch state key -> op list name, from the op's spec (``fusedopt._contract``).
    STATE_LISTS: ClassVar[dict[str, str]] = STEP_OPS[OP].state_keys

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-3,
        bias_correction: bool = True,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        grad_averaging: bool = True,
        max_grad_norm: float | None = 1.0,
        trust_clip: bool = False,
        always_adapt: bool = False,
        caution: bool = False,
        decoupled_decay: bool = False,
        *,
        capturable: bool = False,
        master_weights: bool = False,
        backend: str = "auto",
        grad_norm_group: Any = None,
    ) -> None:
        if caution or decoupled_decay:
            raise ValueError("fusedopt.LAMB: timm's caution and decoupled_decay are not supported")
        defaults = dict(
            lr=lr, bias_correction=bias_correction, betas=tuple(betas), eps=eps,
            weight_decay=weight_decay, grad_averaging=grad_averaging,
            max_grad_norm=max_grad_norm, trust_clip=trust_clip, always_adapt=always_adapt,
            capturable=capturable, master_weights=master_weights, backend=backend,
        )  # fmt: skip
        super().__init__(params, defaults, grad_norm_group)

    _check_group = staticmethod(check_adam_group)

    def _state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("step", "exp_avg", "exp_avg_sq")

    _hypers = staticmethod(adam_hypers)

    def _flags(self, group: dict[str, Any]) -> dict[str, bool]:
        return dict(
            grad_averaging=bool(group["grad_averaging"]),
            bias_correction=bool(group["bias_correction"]),
            trust_clip=bool(group["trust_clip"]), always_adapt=bool(group["always_adapt"]),
        )  # fmt: skip

    def _clip_coef(self, norm: Tensor, max_grad_norm: float) -> Tensor:
        """timm's global clip as a multiplier: ``1 / max(1, norm / max_grad_norm)``."""
        return 1.0 / torch.clamp(norm / max_grad_norm, min=1.0)

    def _run(self, lists, hypers, flags, params, **scalars) -> None:
        by_groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(params):
            by_groups.setdefault(_reduce_groups(p, None), []).append(i)
        for groups, index in by_groups.items():
            sub_lists, sub_hypers = _subset(lists, hypers, index, len(params))
            if not groups:  # whole tensors: the fused op's own per-tensor norms are right
                ops.step(self.OP, sub_lists, sub_hypers, flags, **scalars, _checked=True)
            else:
                sharded = {k: v for k, v in scalars.items() if k != "backend"}
                _sharded_lamb(sub_lists, sub_hypers, flags, groups, **sharded)


def _subset(lists: dict, hypers: dict, index: list[int], n: int) -> tuple[dict, dict]:
    """The lists and per-tensor hyperparameters of the tensors at ``index``."""
    if len(index) == n:
        return lists, hypers
    sub_lists = {k: [v[i] for i in index] if v else v for k, v in lists.items()}
    sub_hypers = {}
    for k, v in hypers.items():
        if isinstance(v, Tensor):
            sub_hypers[k] = v if v.dim() == 0 else v[torch.tensor(index, device=v.device)]
        else:
            sub_hypers[k] = [v[i] for i in index]
    return sub_lists, sub_hypers


def _sharded_lamb(lists, hypers, flags, reduce_groups, grad_scale, clip_coef, found_inf) -> None:
    """[note: sharded LAMB] LAMB over local shards with all-reduced per-tensor norms."""
    params, grads = lists["params"], lists["grads"]
    masters = lists.get("master_params") or []
    n = len(params)
    device = params[0].device
    ok = torch.ones((), device=device) if found_inf is None else (found_inf == 0).float()
    lr = hypers["lr"]
    new = []
    sq_norms = []
    for i in range(n):
        step = lists["steps"][i]
        t = (step + ok).double()
        b1, b2 = hypers["beta1"][i], hypers["beta2"][i]
        bc1 = 1 - torch.pow(b1, t) if flags["bias_correction"] else torch.ones((), device=device)
        bc2 = 1 - torch.pow(b2, t) if flags["bias_correction"] else torch.ones((), device=device)
        b3 = 1 - b1 if flags["grad_averaging"] else 1.0
        g = load_grad(grads[i], torch.float32, grad_scale, clip_coef)
        p = (masters[i] if masters else params[i]).float()
        m = b1 * lists["exp_avgs"][i].float() + b3 * g
        v = b2 * lists["exp_avg_sqs"][i].float() + (1 - b2) * g * g
        u = (m / bc1.float()) / (v.sqrt() / bc2.sqrt().float() + hypers["eps"][i])
        wd = hypers["weight_decay"][i]
        if wd != 0:
            u = u + wd * p
        sq_norms += [p.square().sum(), u.square().sum()]
        new.append((p, m, v, u, t))
    norms = torch.stack(sq_norms)
    for group in reduce_groups:
        dist.all_reduce(norms, group=group)
    norms = norms.sqrt().view(n, 2)
    for i, (p, m, v, u, t) in enumerate(new):
        wd = hypers["weight_decay"][i]
        if wd != 0 or flags["always_adapt"]:
            w_norm, u_norm = norms[i, 0], norms[i, 1]
            ratio = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, 1.0)
            if flags["trust_clip"]:
                ratio = torch.clamp(ratio, max=1.0)
            u = u * ratio
        lr_i = lr[i] if not isinstance(lr, Tensor) else lr.reshape(-1)[i if lr.dim() else 0]
        p = p - lr_i * u
        keep = ok == 0
        for dst, value in (
            (lists["exp_avgs"][i], m),
            (lists["exp_avg_sqs"][i], v),
            *(((masters[i], p),) if masters else ()),
            (params[i], p),
        ):
            dst.copy_(torch.where(keep, dst.to(value.dtype), value))
        lists["steps"][i].copy_(t.float())
