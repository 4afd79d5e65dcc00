"""``fusedopt.GradScaler``: torch's dynamic loss scaler without torch's inf-check pass.

``torch.amp.GradScaler.step(opt)`` first runs ``_amp_foreach_non_finite_check_and_unscale_``
over every grad (a read *and* a write of each) just to learn ``found_inf``. With a fusedopt
optimizer that pass is redundant: the optimizer's ``grad_norm`` pass reads the grads anyway
(for clipping), and can yield ``found_inf`` at the same time ([note: found_inf from the norm
pass] in ``fusedopt/optim/_base.py``). This scaler hands the scale to the optimizer, asks it
for ``found_inf``, and feeds that flag to torch's own ``update()``: growth and backoff are
torch's (``torch._amp_update_scale_``), bit for bit. A loss-scaled, clipped step then reads
the grads exactly twice and never syncs with the host.

Everything else is torch's: ``scale()``, ``unscale_()`` (after which ``step`` falls back to
torch's protocol, since the grads are already unscaled), ``update()``, ``state_dict()``, and
any optimizer that is not a fusedopt one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.amp.grad_scaler import OptState

from fusedopt.optim._base import FusedOptimizer

__all__ = ["GradScaler"]


class GradScaler(torch.amp.GradScaler):
    """A ``torch.amp.GradScaler`` whose ``step`` takes ``found_inf`` from a fusedopt
    optimizer's own norm pass instead of a separate inf-check pass. Same constructor."""

    def step(self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        """Step ``optimizer`` with the current scale; skip it (on the device) on inf/NaN."""
        if not self._enabled or not isinstance(optimizer, FusedOptimizer):
            return super().step(optimizer, *args, **kwargs)
        if "closure" in kwargs:
            raise RuntimeError("Closure use is not currently supported if GradScaler is enabled.")
        self._check_scale_growth_tracker("step")
        state = self._per_optimizer_states[id(optimizer)]
        if state["stage"] is OptState.STEPPED:
            raise RuntimeError("step() has already been called since the last update().")
        if state["stage"] is OptState.UNSCALED:
            return super().step(optimizer, *args, **kwargs)  # grads already unscaled by torch
        scale = self._get_scale_async()
        assert scale is not None
        # As torch: a grad_scale the user preset (gradient accumulation) multiplies in.
        optimizer.grad_scale = scale * getattr(optimizer, "grad_scale", 1)
        optimizer._fusedopt_detect_inf = True
        try:
            result = optimizer.step(*args, **kwargs)
        finally:
            del optimizer.grad_scale
            del optimizer._fusedopt_detect_inf
            found_inf = optimizer._step_out.pop("found_inf", None)
        if found_inf is None:  # no param had a grad: nothing was stepped, nothing was inf
            found_inf = torch.zeros((), dtype=torch.float32, device=scale.device)
        state["found_inf_per_device"] = {found_inf.device: found_inf.to(scale.device)}
        state["stage"] = OptState.STEPPED
        return result
