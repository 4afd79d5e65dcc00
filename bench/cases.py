"""Benchmark cases: hyperparameters per optimizer, and the workload tensors of one case.

A case is (model shape list, optimizer, precision mode, device). Every implementation of a case
(fusedopt backends, torch peers) steps the *same* params and grads with its own fresh state,
so the numbers compare like with like. Hyperparameters are the libraries' defaults, except a
non-zero weight decay where the default is zero (Lion), so the decay path is exercised.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from torch import Tensor

from bench.shapes import model_shapes
from bench.traffic import MODES, OPTIMIZER_OPS, bytes_per_param

#: Per-optimizer hyperparameters, in torch.optim / timm / lion-pytorch spelling.
HYPERS: dict[str, dict] = {
    "adamw": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2),
    "adam": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0),
    # timm.optim.Lamb defaults, including its global clip at 1.0.
    "lamb": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=1e-2, max_grad_norm=1.0),
    "lion": dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=1e-2),
    "sgd": dict(lr=1e-2, momentum=0.9, weight_decay=0.0),
    # torch.optim.Muon's defaults (the vectors: AdamW with its defaults, lr and decay shared)
    "muon": dict(lr=1e-3, weight_decay=0.1, momentum=0.95),
    # schedulefree's AdamWScheduleFree defaults, with a warmup and weight decay exercised.
    "schedulefree_adamw": dict(
        lr=2.5e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, warmup_steps=100
    ),
    # torch.optim.Adafactor defaults, with a weight decay so that the decay path runs.
    "adafactor": dict(lr=1e-2, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0, weight_decay=1e-2),
}

#: AMP mode: global-norm clip threshold (clip_grad_norm_'s max_norm) and the loss scale.
MAX_GRAD_NORM = 1.0
LOSS_SCALE = 2.0**16


@dataclasses.dataclass
class Workload:
    """The tensors of one case: leaf params in the mode's dtype and their grads.

    In ``amp`` mode the grads are bf16 and multiplied by :data:`LOSS_SCALE`, as a scaled
    backward pass leaves them; steps divide by the scale on load.
    """

    model: str
    optimizer: str
    mode: str
    device: torch.device
    names: list[str]
    params: list[torch.nn.Parameter]
    grads: list[Tensor]

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    @property
    def op(self) -> str:
        return OPTIMIZER_OPS[self.optimizer]

    @property
    def bytes_per_param(self) -> int:
        return bytes_per_param(self.op, self.mode)

    @property
    def hypers(self) -> dict:
        return HYPERS[self.optimizer]

    @property
    def amp(self) -> bool:
        return MODES[self.mode][2]

    def masters(self) -> list[Tensor]:
        """Fresh fp32 master copies of the params (amp mode)."""
        return [p.detach().float() for p in self.params]


def make_workload(
    model: str,
    optimizer: str,
    mode: str,
    device: torch.device,
    seed: int = 0,
    shapes: list[tuple[str, tuple[int, ...]]] | None = None,
) -> Workload:
    """Params ~ N(0, 0.02) and grads ~ N(0, 1e-3) (times the loss scale in amp) on ``device``.

    ``shapes`` overrides the model's shape list (``model`` then only labels the workload).
    """
    if optimizer not in HYPERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; known: {', '.join(HYPERS)}")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; known: {', '.join(MODES)}")
    dtype, _, scaled = MODES[mode]
    shapes = tuple(shapes if shapes is not None else model_shapes(model))
    names, base_params, base_grads = _random_tensors(shapes, str(device), seed)
    grad_std = 1e-3 * (LOSS_SCALE if scaled else 1.0)
    params = [torch.nn.Parameter(p.to(dtype, copy=True)) for p in base_params]
    grads = [(g * grad_std).to(dtype) for g in base_grads]
    return Workload(model, optimizer, mode, device, names, params, grads)


@functools.lru_cache(maxsize=1)
def _random_tensors(shapes: tuple, device: str, seed: int):
    """fp32 N(0, 0.02) params and N(0, 1) grads, drawn once per shape list (drawing 124M
    normals takes seconds on a small CPU; copying them, a fraction of that)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    names, params, grads = [], [], []
    for name, shape in shapes:
        names.append(name)
        params.append(torch.empty(shape, device=device).normal_(0, 0.02, generator=gen))
        grads.append(torch.empty(shape, device=device).normal_(0, 1.0, generator=gen))
    return names, params, grads
