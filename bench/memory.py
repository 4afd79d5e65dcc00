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
import contextlib
import csv
import dataclasses
import datetime
import importlib.util
import math
import sys
import unittest.mock
from collections.abc import Callable
from pathlib import Path

import torch

import fusedopt
from bench.modes import MEMORY_MODES, MemoryMode
from bench.output import ROOT, _triton_version, device_name, git_commit, load_average
from bench.shapes import MODELS, model_shapes
from bench.timing import Ceiling, ceiling_array_bytes, stream_ceiling, time_steps

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
#: AdamW and Adam fused (torch's fastest; the same states as its foreach path), SGD foreach.
TORCH_ROWS: tuple[tuple[str, str, type[torch.optim.Optimizer], dict], ...] = (
    ("adamw", "fp32", torch.optim.AdamW, {"fused": True}),
    ("adamw", "bf16", torch.optim.AdamW, {"fused": True}),
    ("adam", "fp32", torch.optim.Adam, {"fused": True}),
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


@dataclasses.dataclass(frozen=True)
class Peer:
    """A compact optimizer of another library, measured here when it is installed.

    ``make(params)`` builds it over ``params`` of ``param_dtype``; ``mode``: what it keeps,
    in words (the fusedopt mode nearest to it in brackets); ``package``: what must import.
    """

    optimizer: str
    mode: str
    impl: str
    package: str
    param_dtype: torch.dtype
    make: Callable[[list[torch.Tensor]], torch.optim.Optimizer]
    note: str = ""


def _torchao(name: str, **kwargs) -> Callable[[list[torch.Tensor]], torch.optim.Optimizer]:
    def make(params: list[torch.Tensor]) -> torch.optim.Optimizer:
        import torchao.optim

        return getattr(torchao.optim, name)(params, **kwargs)

    return make


def _optimi(name: str, **kwargs) -> Callable[[list[torch.Tensor]], torch.optim.Optimizer]:
    def make(params: list[torch.Tensor]) -> torch.optim.Optimizer:
        import optimi

        return getattr(optimi, name)(params, **kwargs)

    return make


TORCHAO_EAGER = (
    "torchao's step makes each param's states, then updates them in place through a "
    "`torch.compile`d function; the memory step runs torchao's own step with that function "
    "replaced by a no-op (`torch.compile` patched): the same state tensors, allocated by "
    "torchao, without the update's compile (60 s for one shape here) or eager run (~10 min of "
    "a loaded core for GPT-2's 4-bit states)"
)


def _no_update(*args, **kwargs) -> None:
    """torchao's compiled per-param update, skipped when only its states are measured."""


#: The peers measured where installed (``bench.memory`` says which were not, and quotes
#: :data:`DOCUMENTED` for them instead).
PEERS: tuple[Peer, ...] = (
    Peer("adamw", "fp32 params, 8-bit states, 256-blocks (~ bf16+master+8-bit states)",
         "torchao AdamW8bit", "torchao", torch.float32, _torchao("AdamW8bit"), TORCHAO_EAGER),
    Peer("adamw", "fp32 params, 4-bit states, 128-blocks", "torchao AdamW4bit", "torchao",
         torch.float32, _torchao("AdamW4bit"), TORCHAO_EAGER),
    Peer("adamw", "bf16 params and states, SR writes (~ bf16+SR)",
         "torchao _AdamW(bf16_stochastic_round=True)", "torchao", torch.bfloat16,
         _torchao("_AdamW", bf16_stochastic_round=True), TORCHAO_EAGER),
    Peer("adamw", "bf16 params and states, bf16 Kahan compensation (~ bf16+kahan)",
         "torch-optimi AdamW(kahan_sum=True)", "optimi", torch.bfloat16,
         _optimi("AdamW", lr=1e-3, kahan_sum=True)),
    Peer("lion", "bf16 params and state, bf16 Kahan compensation (~ bf16+kahan)",
         "torch-optimi Lion(kahan_sum=True)", "optimi", torch.bfloat16,
         _optimi("Lion", lr=1e-4, kahan_sum=True)),
    Peer("sgd", "bf16 params and momentum, bf16 Kahan compensation (~ bf16+kahan)",
         "torch-optimi SGD(momentum=0.9, kahan_sum=True)", "optimi", torch.bfloat16,
         _optimi("SGD", lr=1e-2, momentum=0.9, kahan_sum=True)),
    Peer("adan", "bf16 params and states, bf16 Kahan compensation (~ bf16+kahan)",
         "torch-optimi Adan(kahan_sum=True)", "optimi", torch.bfloat16,
         _optimi("Adan", lr=1e-3, kahan_sum=True)),
)  # fmt: skip

BNB_OPTIMIZER_PY = (
    "bitsandbytes/optim/optimizer.py (Optimizer1State/Optimizer2State.init_state: a uint8 "
    "state per moment and, block-wise, one fp32 absmax per 256 elements; a param under "
    "min_8bit_size = 4096 elements keeps fp32 states)"
)

#: bitsandbytes' 8-bit optimizers: (optimizer, class, states). Not installed here (a CUDA
#: library); their bytes are *computed* on the model's shapes by the rule of
#: :data:`BNB_OPTIMIZER_PY` (:func:`bnb_state_bytes`).
BNB_ROWS: tuple[tuple[str, str, int], ...] = (
    ("adamw", "bitsandbytes AdamW8bit / Adam8bit", 2),
    ("lion", "bitsandbytes Lion8bit", 1),
    ("sgd", "bitsandbytes SGD8bit (momentum)", 1),
)


def bnb_state_bytes(shapes: list, states: int) -> float:
    """Bytes per param of bitsandbytes' block-wise 8-bit states on ``shapes`` (its code map,
    256 fp32 values per optimizer, left out: nothing per param)."""
    total = n_all = 0
    for _, shape in shapes:
        n = math.prod(shape)
        n_all += n
        total += states * (n + 4 * -(-n // 256) if n >= 4096 else 4 * n)
    return total / n_all


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
    element_bytes: float | None  # of which: plain tensors with one value per param element
    scalar_bytes: float | None  # the rest: per-tensor scalars (step counts), block scales
    expected_bytes: int | None = None  # the mode's design (fusedopt rows)
    traffic_bytes: int | None = None  # compulsory bytes of one step (fusedopt rows)
    cuda_held_bytes: float | None = None  # CUDA: allocated after the step - before the optimizer
    cuda_peak_bytes: float | None = None  # CUDA: the step's peak above that start
    step_ms: float | None = None  # median step time (--repeats)
    achieved_gbps: float | None = None  # traffic_bytes x params / step time
    pct_ceiling: float | None = None  # of the bandwidth ceiling measured in the same run

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


def _storages(t: torch.Tensor) -> list[torch.UntypedStorage]:
    """The storages behind ``t``: its own, or for a tensor subclass that keeps its data in
    inner tensors (torchao's quantized states: codes, scales, the code map) theirs."""
    if type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return [s for name in names for s in _storages(getattr(t, name))]
    return [t.untyped_storage()]


def measure(
    make: type[torch.optim.Optimizer],
    kwargs: dict,
    shapes: list,
    dtype: torch.dtype,
    device: torch.device,
    repeats: int = 0,
) -> dict:
    """One step of ``make(params, **kwargs)`` on fresh params; what the optimizer then holds,
    and with ``repeats`` the step time (``bench/timing.py``: one more warm-up step, then the
    median of ``repeats``)."""
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
        for storage in _storages(t):
            if storage.data_ptr() in seen or storage.nbytes() == 0:
                continue
            seen.add(storage.data_ptr())
            if per_element and type(t) in (torch.Tensor, torch.nn.Parameter):
                element += storage.nbytes()
            else:  # per-tensor scalars, and a quantized state's codes + scales together
                scalar += storage.nbytes()
    out = {"params": n, "tensors": len(params), "element": element / n, "scalar": scalar / n}
    if repeats:
        out["step_s"] = time_steps(opt.step, device, warmup=1, repeats=repeats).median
    if cuda:
        torch.cuda.synchronize(device)
        out["cuda_held"] = (torch.cuda.memory_allocated(device) - start) / n
        out["cuda_peak"] = (torch.cuda.max_memory_allocated(device) - start) / n
    del opt, params
    if cuda:
        torch.cuda.empty_cache()
    return out


def _row(
    optimizer: str, mode: MemoryMode, impl: str, m: dict, op: str | None, traffic: int | None
) -> MemoryRow:
    size = torch.empty((), dtype=mode.param_dtype).element_size()
    return MemoryRow(
        optimizer, mode.name, impl, m["params"], m["tensors"], 2 * size,
        m["element"] + m["scalar"], m["element"], m["scalar"],
        mode.expected_state_bytes(op) if op else None, traffic,
        m.get("cuda_held"), m.get("cuda_peak"),
        None if "step_s" not in m else m["step_s"] * 1e3,
        None if "step_s" not in m else traffic * m["params"] / m["step_s"] / 1e9,
    )  # fmt: skip


def memory_rows(
    model: str, device: torch.device, optimizers=None, modes=None, repeats: int = 0
) -> list[MemoryRow]:
    """Every fusedopt (optimizer, mode) of the registries where the mode applies ([note: mode
    applicability] in bench/modes.py), then torch's counterparts, each timed over ``repeats``
    steps (0: not timed); torch's rows at the traffic of fusedopt's in the same mode."""
    shapes = model_shapes(model)
    rows = []
    for name in optimizers or OPTIMIZERS:
        cls, op, hypers = OPTIMIZERS[name]
        for mode_name in modes or MEMORY_MODES:
            mode = MEMORY_MODES[mode_name]
            if not mode.applies(cls):
                continue
            kwargs = {**hypers, **mode.kwargs}
            m = measure(cls, kwargs, shapes, mode.param_dtype, device, repeats)
            rows.append(_row(name, mode, "fusedopt", m, op, mode.traffic(op)))
    for name, mode_name, cls, hypers in TORCH_ROWS:
        if (optimizers and name not in optimizers) or (modes and mode_name not in modes):
            continue
        if hypers.get("fused") and device.type not in ("cpu", "cuda"):
            hypers = {k: v for k, v in hypers.items() if k != "fused"}
        mode = MEMORY_MODES[mode_name]
        m = measure(cls, hypers, shapes, mode.param_dtype, device, repeats)
        rows.append(_row(name, mode, "torch", m, None, mode.traffic(OPTIMIZERS[name][1])))
    return rows


def peer_rows(model: str, device: torch.device, optimizers=None) -> tuple[list[MemoryRow], list]:
    """The installed :data:`PEERS` measured like fusedopt (one step, untimed), and the
    :data:`BNB_ROWS` computed; and the peers' packages that are not installed."""
    shapes = model_shapes(model)
    rows, missing = [], []
    for peer in PEERS:
        if optimizers and peer.optimizer not in optimizers:
            continue
        if importlib.util.find_spec(peer.package) is None:
            missing.append(peer.package)
            continue
        eager = contextlib.nullcontext()
        if peer.package == "torchao":  # its step calls torch.compile(fn, ...) per param
            eager = unittest.mock.patch.object(torch, "compile", lambda fn, **_: _no_update)
        with eager:
            m = measure(lambda ps, make=peer.make: make(ps), {}, shapes, peer.param_dtype, device)
        size = torch.empty((), dtype=peer.param_dtype).element_size()
        rows.append(MemoryRow(peer.optimizer, peer.mode, f"{peer.impl} (measured)", m["params"],
                              m["tensors"], 2 * size, m["element"] + m["scalar"], m["element"],
                              m["scalar"]))  # fmt: skip
    n = sum(math.prod(s) for _, s in shapes)
    for name, impl, states in BNB_ROWS:
        if optimizers and name not in optimizers:
            continue
        b = bnb_state_bytes(shapes, states)
        rows.append(MemoryRow(name, "fp32 params, 8-bit states, 256-blocks", f"{impl} (computed)",
                              n, len(shapes), 8, b, None, None))  # fmt: skip
    return rows, sorted(set(missing))


def _b(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}".rstrip("0").rstrip(".")


def markdown(
    rows: list[MemoryRow], meta: dict, model: str, peers: list[MemoryRow] = (), missing=()
) -> str:
    cuda = meta["device"] == "cuda"
    timed = any(r.step_ms is not None for r in rows)
    head = ["optimizer", "mode", "implementation", "state B/param (measured)",
            "of which per element", "expected", "ok", "param+grad B/param",
            "total B/param", "traffic B/param/step"]  # fmt: skip
    if timed:
        head += ["ms/step", "GB/s", "% of ceiling"]
    if cuda:
        head += ["CUDA held B/param", "CUDA step peak B/param"]
    r0 = (rows or peers)[0]
    ceiling = meta.get("ceiling")
    lines = [
        f"# Optimizer memory per parameter, {model} ({r0.params:,} params, {r0.tensors} tensors)",
        "",
        f"{meta['device_name']}, torch {meta['torch']}, Triton {meta['triton']}, {meta['date']}, "
        f"commit {meta['commit']}, fusedopt backend `{meta['backend']}`"
        + (f", {meta['threads']} threads, load average {meta['load']:.1f}" if timed else "")
        + ".",
        "",
        "State B/param: the storages of every tensor the optimizer holds after one step, each "
        "counted once, over the param count"
        + (
            "; CUDA held: `memory_allocated` after the step minus before the optimizer."
            if cuda
            else " (on a CPU this sum is the measurement: it sees the tensors the optimizer "
            "exposes in `state` and `param_groups`)."
        )
        + " Expected: the mode's design (states in its state dtype, 1 B where 8-bit, + a 4 B "
        "master, 2 B for a compact or Kahan one); ok: the per-element part of the measurement "
        "equals it (the rest are 4-byte step counts and 8-bit block absmaxes). "
        "Traffic: compulsory bytes read + written by one step (`bench/traffic.py`; no "
        "clipping, no loss scale; an 8-bit state's absmaxes, 4 B per 256 elements read and "
        "written, left out)"
        + (
            f"; GB/s = traffic x params / the median step time of {meta['repeats']} steps; "
            f"% of ceiling: of {ceiling}. torch's rows are counted at the traffic of "
            "fusedopt's in the same mode (an effective bandwidth)."
            if timed
            else "."
        )
        + " Modes: "
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
        if timed:
            cells += [_f(r.step_ms, 1), _f(r.achieved_gbps, 1), _f(r.pct_ceiling, 0)]
        if cuda:
            cells += [_b(r.cuda_held_bytes), _b(r.cuda_peak_bytes)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [] if not peers else [
        "",
        "## Peers: other libraries' compact optimizers, on the same params",
        "",
        "Measured: built over the same params in the dtype named, one step, the tensors it "
        "then holds counted as above (a tensor subclass through its inner tensors: codes, "
        "block scales and the code map, counted once). Computed: the library's own "
        "allocation rule applied to the same shapes, where it is not installed here ("
        + BNB_OPTIMIZER_PY
        + "). "
        + (f"Not installed here: {', '.join(missing)} (their documented figures below). "
           if missing else "")
        + TORCHAO_EAGER
        + ".",
        "",
        "| optimizer | what it keeps | implementation | state B/param | of which plain "
        "per-element tensors | param+grad B/param | total B/param |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]  # fmt: skip
    for r in peers:
        lines.append(
            f"| {r.optimizer} | {r.mode} | {r.impl} | {_b(r.state_bytes)} | "
            f"{_b(r.element_bytes)} | {r.param_bytes} | {_b(r.param_bytes + r.state_bytes)} |"
        )
    lines += [
        "",
        "## Documented figures of compact optimizers (AdamW)",
        "",
        "| implementation | what it keeps | state B/param, as documented | source |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| {d.impl} | {d.what} | {d.state_bytes} | {d.source} |" for d in DOCUMENTED]
    return "\n".join(lines) + "\n"


def _f(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="gpt2", choices=list(MODELS))
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    parser.add_argument("--modes", default=",".join(MEMORY_MODES))
    parser.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="timed steps per row for GB/s and %% of the ceiling (0: no timing)",
    )
    parser.add_argument("--no-peers", action="store_true", help="skip the peers' rows")
    parser.add_argument("--peers-only", action="store_true", help="only the peers' rows")
    # On the shared 2-core VM under load ~25, two OpenMP threads got ~12% of a core between
    # them (a GPT-2 run had not finished in 18 min); one thread per step is the fair measure
    # there, and the ceiling is measured on the same threads.
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: keep)")
    parser.add_argument(
        "--quick-ceiling", action="store_true", help="smaller STREAM arrays (the smoke test)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)  # fmt: skip
    device = torch.device(args.device)
    optimizers = [o for o in args.optimizers.split(",") if o]
    modes = [m for m in args.modes.split(",") if m]
    for given, known in ((optimizers, OPTIMIZERS), (modes, MEMORY_MODES)):
        if set(given) - set(known):
            parser.error(f"unknown {sorted(set(given) - set(known))}; known: {', '.join(known)}")
    if args.threads:
        torch.set_num_threads(args.threads)  # fusedopt's cpu backend follows torch's setting
    meta = {
        "device": device.type, "device_name": device_name(device), "torch": torch.__version__,
        "triton": _triton_version(), "fusedopt": fusedopt.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": git_commit(), "backend": fusedopt.resolve("auto", device), "model": args.model,
        "threads": torch.get_num_threads(), "repeats": args.repeats, "load": load_average(),
    }  # fmt: skip
    ceiling: Ceiling | None = None
    if args.repeats and not args.peers_only:
        # The ceiling as the timed report measures it (bench/timing.py: STREAM's kernels,
        # bus bytes), before and after the rows, each kernel's best of the two.
        nbytes = ceiling_array_bytes(device, args.quick_ceiling)
        ceiling = stream_ceiling(device, nbytes)
    rows = (
        [] if args.peers_only else memory_rows(args.model, device, optimizers, modes, args.repeats)
    )
    if ceiling is not None:
        ceiling = ceiling.merged(stream_ceiling(device, nbytes))
        meta["ceiling"] = ceiling.describe()
        meta["ceiling_gbps"] = ceiling.gbps
        for r in rows:
            if r.achieved_gbps is not None:
                r.pct_ceiling = 100 * r.achieved_gbps / ceiling.gbps
    peers, missing = ([], []) if args.no_peers else peer_rows(args.model, device, optimizers)
    meta["load"] = max(meta["load"], load_average())
    text = markdown(rows, meta, args.model, peers, missing)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"memory-{device.type}-{args.model}-{meta['date'].replace(':', '')}"
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        fields = [*meta, *(f.name for f in dataclasses.fields(MemoryRow)), "matches"]
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in [*rows, *peers]:
            writer.writerow({**meta, **dataclasses.asdict(r), "matches": r.matches})
    stem.with_suffix(".md").write_text(text)
    print(f"wrote {stem}.{{csv,md}}")
    return 1 if any(r.matches is False for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
