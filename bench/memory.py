"""Bytes per parameter each optimizer holds in each memory mode, and its traffic per step.

    python -m bench.memory [--device cpu|cuda] [--model gpt2|llama1b|tiny] [--out bench/results]

Issue #15's memory table. For every fusedopt optimizer (AdamW, Adam, LAMB, Lion, SGD with
momentum, Adan) and every memory mode of ``bench/modes.py`` it builds the model's params
(``bench/shapes.py``: GPT-2 small by default) in the mode's dtype with grads, takes one step,
and measures what the optimizer holds:

* **state B/param**: the bytes of every tensor the optimizer keeps (its ``state`` and any
  tensor in its ``param_groups``, e.g. LAMB's group step count), each storage counted once
  (``untyped_storage().nbytes()``), over the param count. On a CPU this sum is the
  measurement; it sees only tensors the optimizer exposes (a scratch buffer held elsewhere
  would escape it). On CUDA the table adds ``torch.cuda.memory_allocated`` after the step
  minus before the optimizer was built (everything it allocated and still holds, seen or
  not) and the step's peak above that start (transient scratch).
* **expected**: what the mode should hold by design (``MemoryMode.expected_state_bytes``: each
  state in the mode's state dtype, plus a 4-byte master, 2 for a compact one). ``ok`` when the
  per-element part of the measurement equals it; the rest is per-tensor scalars (step counts:
  4 B per tensor).
* **traffic B/param**: the compulsory bytes one step reads and writes (``bench/traffic.py``,
  the byte table the timed report uses; no clipping, no loss scale).

Beside them: torch.optim measured the same way for the algorithms it has (AdamW and Adam on
fp32 and on bf16 params, SGD with momentum), and the **documented** figures of torchao's and
bitsandbytes's compact optimizers, quoted with their source (:data:`DOCUMENTED`); where a
document gives no number, the table says "not documented".
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import sys
from pathlib import Path

import torch

import fusedopt
from bench.modes import MEMORY_MODES, MemoryMode
from bench.output import ROOT, _triton_version, device_name, git_commit
from bench.shapes import MODELS, model_shapes

#: fusedopt's optimizers: (class, op of bench/traffic.py, hyperparameters beyond defaults).
OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], str, dict]] = {
    "adamw": (fusedopt.AdamW, "adamw_", {}),
    "adam": (fusedopt.Adam, "adamw_", {}),
    "lamb": (fusedopt.LAMB, "lamb_", {}),
    "lion": (fusedopt.Lion, "lion_", {}),
    "sgd": (fusedopt.SGD, "sgd_", {"lr": 1e-2, "momentum": 0.9}),
    "adan": (fusedopt.Adan, "adan_", {}),
    "schedulefree_adamw": (fusedopt.ScheduleFreeAdamW, "schedulefree_adamw_", {}),
}

#: torch.optim's counterparts, measured the same way: (optimizer, mode, class, hypers).
TORCH_ROWS: tuple[tuple[str, str, type[torch.optim.Optimizer], dict], ...] = (
    ("adamw", "fp32", torch.optim.AdamW, {}),
    ("adamw", "bf16", torch.optim.AdamW, {}),
    ("adam", "fp32", torch.optim.Adam, {}),
    ("sgd", "fp32", torch.optim.SGD, {"lr": 1e-2, "momentum": 0.9}),
)


@dataclasses.dataclass(frozen=True)
class Documented:
    """A peer's figure as its documentation states it, with the source."""

    impl: str
    what: str
    state_bytes: str  # bytes per param of optimizer state, as documented, or "not documented"
    source: str


TORCHAO_README = "https://github.com/pytorch/ao/blob/main/torchao/optim/README.md"
BNB_DOCS = "https://huggingface.co/docs/bitsandbytes/v0.43.0/optimizers"
BNB_ADAMW = "https://huggingface.co/docs/bitsandbytes/main/en/reference/optim/adamw"

#: Documented figures (AdamW's two states). torchao's README: 8-bit and FP8 (float8_e4m3fn)
#: states quantized in blocks of 256 values, 4-bit in blocks of 128 (the scale's dtype is not
#: stated); ``bf16_stochastic_round``: bf16 weights without an FP32 copy. bitsandbytes: 8-bit
#: instead of 32-bit state, "75% less memory", block-wise quantization (block size not stated
#: in the docs), tensors under ``min_8bit_size`` = 4096 elements keep 32-bit state.
DOCUMENTED: tuple[Documented, ...] = (
    Documented("torchao AdamW8bit", "2 states x 8 bit, blockwise (256)",
               "2 + one scale per 256 values per state (scale dtype not documented)",
               TORCHAO_README),
    Documented("torchao AdamW4bit", "2 states x 4 bit, blockwise (128)",
               "1 + one scale per 128 values per state (scale dtype not documented)",
               TORCHAO_README),
    Documented("torchao AdamWFp8", "2 states in float8_e4m3fn, blockwise (256)",
               "2 + one scale per 256 values per state (scale dtype not documented)",
               TORCHAO_README),
    Documented("torchao _AdamW(bf16_stochastic_round=True)",
               "bf16 weights, no FP32 master copy; stochastic rounding on the FP32->BF16 write",
               "master: 0; state dtype not documented", TORCHAO_README),
    Documented("bitsandbytes Adam8bit / AdamW8bit",
               "8-bit instead of 32-bit states, block-wise quantization (block size not in "
               "the docs); tensors < 4096 elements (min_8bit_size) keep 32-bit states",
               "2 + block constants (75% less than 32-bit states' 8)",
               f"{BNB_DOCS}; {BNB_ADAMW}"),
)  # fmt: skip


@dataclasses.dataclass
class MemoryRow:
    """One optimizer in one mode: what it holds per param, measured."""

    optimizer: str
    mode: str
    impl: str
    params: int
    tensors: int
    param_bytes: int  # per param: the param and its grad, each in the mode's dtype
    state_bytes: float  # measured: every tensor the optimizer holds, per param
    element_bytes: float  # of which: tensors with one value per param element
    scalar_bytes: float  # of which: per-tensor scalars (step counts), per param
    expected_bytes: int | None = None  # the mode's design (fusedopt rows)
    traffic_bytes: int | None = None  # compulsory bytes of one step (fusedopt rows)
    cuda_held_bytes: float | None = None  # CUDA: allocated after the step - before the optimizer
    cuda_peak_bytes: float | None = None  # CUDA: the step's peak above that start

    @property
    def matches(self) -> bool | None:
        if self.expected_bytes is None:
            return None
        return self.element_bytes == self.expected_bytes


def held_tensors(opt: torch.optim.Optimizer) -> list[tuple[torch.Tensor, bool]]:
    """Every tensor the optimizer keeps, and whether it has one value per param element (a
    state or master of its param's shape) rather than a per-tensor or per-group scalar."""
    found = [
        (v, v.dim() > 0 and v.shape == p.shape)
        for p, state in opt.state.items()
        for v in state.values()
        if torch.is_tensor(v)
    ]
    for group in opt.param_groups:
        found += [(v, False) for k, v in group.items() if k != "params" and torch.is_tensor(v)]
    return found


def measure(
    make: type[torch.optim.Optimizer],
    kwargs: dict,
    shapes: list,
    dtype: torch.dtype,
    device: torch.device,
) -> dict:
    """One step of ``make(params, **kwargs)`` on fresh params; what the optimizer then holds."""
    params = [torch.nn.Parameter(torch.zeros(s, dtype=dtype, device=device)) for _, s in shapes]
    for p in params:
        p.grad = torch.full_like(p, 1e-3)
    n = sum(p.numel() for p in params)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
    opt = make(params, **kwargs)
    opt.step()
    seen: set[int] = set()
    element = scalar = 0
    for t, per_element in held_tensors(opt):
        storage = t.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() == 0:
            continue
        seen.add(storage.data_ptr())
        if per_element:
            element += storage.nbytes()
        else:
            scalar += storage.nbytes()
    out = {"params": n, "tensors": len(params), "element": element / n, "scalar": scalar / n}
    if cuda:
        torch.cuda.synchronize(device)
        out["cuda_held"] = (torch.cuda.memory_allocated(device) - start) / n
        out["cuda_peak"] = (torch.cuda.max_memory_allocated(device) - start) / n
    del opt, params
    if cuda:
        torch.cuda.empty_cache()
    return out


def _row(optimizer: str, mode: MemoryMode, impl: str, m: dict, op: str | None) -> MemoryRow:
    size = torch.empty((), dtype=mode.param_dtype).element_size()
    return MemoryRow(
        optimizer, mode.name, impl, m["params"], m["tensors"], 2 * size,
        m["element"] + m["scalar"], m["element"], m["scalar"],
        mode.expected_state_bytes(op) if op else None, mode.traffic(op) if op else None,
        m.get("cuda_held"), m.get("cuda_peak"),
    )  # fmt: skip


def memory_rows(model: str, device: torch.device, optimizers=None, modes=None) -> list[MemoryRow]:
    """Every fusedopt (optimizer, mode) of the registries, then torch's counterparts."""
    shapes = model_shapes(model)
    rows = []
    for name in optimizers or OPTIMIZERS:
        cls, op, hypers = OPTIMIZERS[name]
        for mode_name in modes or MEMORY_MODES:
            mode = MEMORY_MODES[mode_name]
            if not mode.applies(op):
                continue
            m = measure(cls, {**hypers, **mode.kwargs}, shapes, mode.param_dtype, device)
            rows.append(_row(name, mode, "fusedopt", m, op))
    for name, mode_name, cls, hypers in TORCH_ROWS:
        if (optimizers and name not in optimizers) or (modes and mode_name not in modes):
            continue
        mode = MEMORY_MODES[mode_name]
        m = measure(cls, hypers, shapes, mode.param_dtype, device)
        rows.append(_row(name, mode, "torch", m, None))
    return rows


def _b(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}".rstrip("0").rstrip(".")


def markdown(rows: list[MemoryRow], meta: dict, model: str) -> str:
    cuda = meta["device"] == "cuda"
    head = ["optimizer", "mode", "implementation", "state B/param (measured)",
            "of which per element", "expected", "ok", "param+grad B/param",
            "total B/param", "traffic B/param/step"]  # fmt: skip
    if cuda:
        head += ["CUDA held B/param", "CUDA step peak B/param"]
    r0 = rows[0]
    lines = [
        f"# Optimizer memory per parameter, {model} ({r0.params:,} params, {r0.tensors} tensors)",
        "",
        f"{meta['device_name']}, torch {meta['torch']}, Triton {meta['triton']}, {meta['date']}, "
        f"commit {meta['commit']}, fusedopt backend `{meta['backend']}`.",
        "",
        "State B/param: the storages of every tensor the optimizer holds after one step, each "
        "counted once, over the param count"
        + (
            "; CUDA held: `memory_allocated` after the step minus before the optimizer."
            if cuda
            else " (on a CPU this sum is the measurement: it sees the tensors the optimizer "
            "exposes in `state` and `param_groups`)."
        )
        + " Expected: the mode's design (states in its state dtype + a 4 B master, 2 B for a "
        "compact one); ok: the per-element part of the measurement equals it (the rest are "
        "4-byte step counts). "
        "Traffic: compulsory bytes read + written by one step (`bench/traffic.py`; no "
        "clipping, no loss scale). Modes: "
        + "; ".join(f"`{m.name}` {m.what}" for m in MEMORY_MODES.values())
        + ".",
        "",
        "| " + " | ".join(head) + " |",
        "|" + " --- |" * len(head),
    ]
    for r in rows:
        ok = "-" if r.matches is None else ("yes" if r.matches else "**no**")
        cells = [r.optimizer, r.mode, r.impl, _b(r.state_bytes), _b(r.element_bytes),
                 _b(r.expected_bytes), ok, str(r.param_bytes), _b(r.param_bytes + r.state_bytes),
                 _b(r.traffic_bytes)]  # fmt: skip
        if cuda:
            cells += [_b(r.cuda_held_bytes), _b(r.cuda_peak_bytes)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Documented figures of compact optimizers (AdamW; not measured here)",
        "",
        "| implementation | what it keeps | state B/param, as documented | source |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| {d.impl} | {d.what} | {d.state_bytes} | {d.source} |" for d in DOCUMENTED]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="gpt2", choices=list(MODELS))
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    parser.add_argument("--modes", default=",".join(MEMORY_MODES))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    optimizers = [o for o in args.optimizers.split(",") if o]
    modes = [m for m in args.modes.split(",") if m]
    for given, known in ((optimizers, OPTIMIZERS), (modes, MEMORY_MODES)):
        if set(given) - set(known):
            parser.error(f"unknown {sorted(set(given) - set(known))}; known: {', '.join(known)}")
    meta = {
        "device": device.type, "device_name": device_name(device), "torch": torch.__version__,
        "triton": _triton_version(), "fusedopt": fusedopt.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": git_commit(), "backend": fusedopt.resolve("auto", device), "model": args.model,
    }  # fmt: skip
    rows = memory_rows(args.model, device, optimizers, modes)
    text = markdown(rows, meta, args.model)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"memory-{device.type}-{args.model}-{meta['date'].replace(':', '')}"
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        fields = [*meta, *(f.name for f in dataclasses.fields(MemoryRow)), "matches"]
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            writer.writerow({**meta, **dataclasses.asdict(r), "matches": r.matches})
    stem.with_suffix(".md").write_text(text)
    print(f"wrote {stem}.{{csv,md}}")
    return 1 if any(r.matches is False for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
