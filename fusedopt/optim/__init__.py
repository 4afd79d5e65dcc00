"""fusedopt's torch.optim-style optimizers (DESIGN.md §4), all on one base class."""

from __future__ import annotations

from fusedopt.optim._base import FusedOptimizer
from fusedopt.optim.adamw import Adam, AdamW
from fusedopt.optim.lamb import LAMB
from fusedopt.optim.lion import Lion
from fusedopt.optim.sgd import SGD

__all__ = ["LAMB", "SGD", "Adam", "AdamW", "FusedOptimizer", "Lion"]
