"""fusedopt's torch.optim-style optimizers (DESIGN.md §4), all on one base class.

Drop-in use::

    opt = fusedopt.AdamW(model.parameters(), lr=1e-3)        # was torch.optim.AdamW
    opt = fusedopt.LAMB(model.parameters(), lr=1e-3)         # timm's Lamb arguments
    opt = fusedopt.Lion(model.parameters(), lr=1e-4)         # lion-pytorch's arguments
    opt = fusedopt.Adan(model.parameters(), lr=1e-3)         # the official Adan's arguments
    opt = fusedopt.Muon(model.parameters(), lr=2e-2)         # torch.optim.Muon's (+ AdamW)
    opt = fusedopt.ScheduleFreeAdamW(model.parameters())     # schedulefree's AdamWScheduleFree

Everything torch.optim does works: param groups, ``add_param_group``, ``zero_grad``,
``step(closure)``, step hooks, every ``torch.optim.lr_scheduler`` (OneCycleLR/CyclicLR cycle
``betas[0]`` or ``momentum``), ``state_dict`` with torch's keys (a torch AdamW/Adam/SGD state
dict loads, and ours loads into torch; timm's Lamb dicts likewise), complex params of
AdamW/Adam/SGD. README's "Differences from torch.optim" lists what differs. fusedopt adds:

* ``master_weights=True``: fp32 master copies (``state["master_param"]``) for bf16/fp16
  params, updated in the same pass; no effect on fp32/fp64 params (they are their own master).
  A value written into a param between steps is adopted by its master at the next step
  (``master_sync=True``, the default; ``False`` saves 2 bytes per element and loses such
  writes). ``master_weights`` may be switched on or off mid-run.
* ``master_weights="compact"``: bf16 params only; the int16 low halves of the fp32 masters
  (``state["master_remainder"]``) beside the params, 2 bytes per param less, the same step
  bit for bit ([note: compact master] in ``fusedopt/_contract.py``).
* ``master_weights="kahan"``: bf16/fp16 params; a compensation of the param's dtype
  (``state["kahan_comp"]``) beside each param, the master being param + compensation (about
  16 significant bits for bf16), 2 bytes per param ([note: kahan master]).
* ``max_grad_norm=x``: global-norm clipping inside ``step()``; ``opt.last_grad_norm`` holds
  the pre-clip norm on the device (no sync). LAMB has timm's default ``max_grad_norm=1.0``.
* Loss scaling: ``torch.amp.GradScaler`` works unchanged (the optimizer unscales on load, so
  there is no need for ``scaler.unscale_`` before clipping: set ``max_grad_norm``). Better,
  ``fusedopt.GradScaler`` skips torch's separate inf-check pass: the optimizer's norm pass
  finds infs, so a scaled, clipped step reads the grads twice in all and never syncs.
* Gradient accumulation: sum the grads of ``n`` micro-batches and set ``opt.grad_scale = n``
  (with a scaler: before each ``scaler.step(opt)``, which multiplies it in and deletes it;
  without one it stays until deleted). The division happens on load: no extra pass.
* ``capturable=True`` is accepted for torch compatibility; every fusedopt step is capturable:
  step counts and the common scalars are device tensors and nothing syncs. Give a tensor
  ``lr`` so that a scheduler's in-place updates reach a captured CUDA graph.
* Distributed: DDP needs nothing. FSDP2 (DTensor params) steps the local shards, keeps states
  as DTensors (DCP works) and all-reduces global norms and LAMB's per-tensor norms. With
  ``ZeroRedundancyOptimizer(params, optimizer_class=fusedopt.AdamW, max_grad_norm=...,
  grad_norm_group=dist.group.WORLD)`` the clip norm sums over the ranks' partitions.
* ``torch.compile``: ``torch.compile(opt.step, fullgraph=True)`` traces with no graph break
  (the ops are custom ops with fake kernels).
"""

from __future__ import annotations

from fusedopt.optim._base import FusedOptimizer
from fusedopt.optim.adafactor import Adafactor
from fusedopt.optim.adamw import Adam, AdamW
from fusedopt.optim.adan import Adan
from fusedopt.optim.lamb import LAMB
from fusedopt.optim.lion import Lion
from fusedopt.optim.muon import Muon
from fusedopt.optim.schedulefree import ScheduleFreeAdamW
from fusedopt.optim.sgd import SGD

__all__ = [
    "LAMB",
    "SGD",
    "Adafactor",
    "Adam",
    "AdamW",
    "Adan",
    "FusedOptimizer",
    "Lion",
    "Muon",
    "ScheduleFreeAdamW",
]
