"""``fusedopt.Adafactor``: torch.optim.Adafactor's constructor and semantics, one
``adafactor_`` op (its passes: [note: adafactor passes] in DESIGN.md §2)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor

from fusedopt._contract import factored
from fusedopt._dense import is_dense
from fusedopt.optim._base import FusedOptimizer


class Adafactor(FusedOptimizer):
    """Adafactor (Shazeer and Stern 2018) with ``torch.optim.Adafactor``'s arguments, defaults
    and semantics, fused.

    Per step ``t``: ``rho = min(lr, 1/sqrt(t))``, ``alpha = max(eps2, rms(p)) * rho``; a param
    of two or more dims keeps row and column factors of its second moment over its last two
    dims (leading dims batched), updated by ``lerp(., mean(g²), t**beta2_decay)``, and
    estimates ``v = row*col / max(mean(row), eps1)``; a vector or scalar keeps ``v`` itself.
    ``u = g / sqrt(max(v, eps1²))``; ``p *= 1 - lr*weight_decay``; ``p -= alpha / max(1,
    rms(u)/d) * u``. ``eps=(None, 1e-3)``: ``eps1=None`` is the eps of the
    dtype the update runs on: the param's, fp32 with master weights (as torch's Adafactor
    stepping fp32 masters).
    ``foreach`` is accepted and ignored. Beyond torch: ``max_grad_norm``, ``master_weights``,
    ``master_sync``, the GradScaler protocol (torch's Adafactor refuses scaled grads),
    ``backend`` (see :class:`~fusedopt.optim._base.FusedOptimizer`).

    State per param, torch's keys: ``step`` (0-d fp32 on the param's device) and
    ``row_var``/``col_var`` (a param of 2+ dims) or ``variance`` (any other), plus
    ``master_param`` with master weights ([note: factored layouts] in
    fusedopt/_contract.py). A dense param of 2+ dims must be row-major (contiguous; a
    non-dense view is stepped through a contiguous copy), and DTensor params are refused:
    the factored moments and the per-tensor norms would need reductions across the shards.
    """

    OP = "adafactor_"

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-2,
        beta2_decay: float = -0.8,
        eps: tuple[float | None, float] = (None, 1e-3),
        d: float = 1.0,
        weight_decay: float = 0.0,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        master_weights: bool = False,
        master_sync: bool = True,
        stochastic_rounding: bool = False,
        max_grad_norm: float | None = None,
        backend: str = "auto",
        grad_norm_group: Any = None,
    ) -> None:
        self._init_from_arguments(locals(), eps=tuple(eps))

    @classmethod
    def _check_group(cls, group: dict[str, Any]) -> None:
        """torch.optim.Adafactor's checks and messages."""
        lr = group["lr"]
        if not isinstance(lr, Tensor) and not lr >= 0.0:
            raise ValueError(f"Learning rate should be >= 0 but is: {lr}")
        if not group["beta2_decay"] <= 0.0:
            raise ValueError(f"beta2_decay should be <= 0 but is: {group['beta2_decay']}")
        eps = group["eps"]
        if not isinstance(eps, (tuple, list)) or len(eps) != 2:
            raise ValueError(f"eps must be a pair (eps1 or None, eps2), got {eps!r}")
        if eps[0] is not None and not eps[0] >= 0.0:
            raise ValueError(f"epsilon1 should be >= 0 but is: {eps[0]}")
        if not eps[1] >= 0.0:
            raise ValueError(f"epsilon2 should be >= 0 but is: {eps[1]}")
        if not group["d"] >= 1.0:
            raise ValueError(f"Clipping threshold d should be >= 1 but is: {group['d']}")
        if not group["weight_decay"] >= 0.0:
            raise ValueError(f"weight_decay should be >= 0 but is: {group['weight_decay']}")

    def _state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("step", "row_var", "col_var", "variance")

    def _hypers(self, group: dict[str, Any]) -> dict[str, Any]:
        eps1, eps2 = group["eps"]
        return dict(
            lr=group["lr"], beta2_decay=group["beta2_decay"],
            eps1=-1.0 if eps1 is None else eps1,  # the op's "eps of the update dtype"
            eps2=eps2, d=group["d"], weight_decay=group["weight_decay"],
        )  # fmt: skip

    def _flags(self, group: dict[str, Any]) -> dict[str, bool]:
        return dict(maximize=bool(group["maximize"]))

    def _collect(self) -> list[tuple]:
        """The base's, then Adafactor's own checks of each param, before anything is made."""
        entries = super()._collect()
        for gi, i, p, _, local_p, _ in entries:
            where = f"fusedopt.Adafactor: {self._param_name(gi, i)}"
            if local_p is not p:
                raise NotImplementedError(
                    f"{where} is a DTensor: Adafactor's factored moments and per-tensor norms "
                    "would need reductions across its shards, which are not implemented"
                )
            # A dense, not row-major param (channels_last, transposed); a non-dense one is
            # stepped through a contiguous twin ([note: non-dense params] in _dense.py).
            if factored(p.shape) and is_dense(local_p) and not local_p.is_contiguous():
                raise RuntimeError(
                    f"{where} (shape {tuple(p.shape)}, strides {p.stride()}) is not "
                    "contiguous; its factored moments are reduced over its last two dims, "
                    "which the kernels walk in row-major order: make it contiguous (e.g. no "
                    "channels_last)"
                )
        return entries


__all__ = ["Adafactor"]
