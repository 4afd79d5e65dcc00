"""Write csrc/include/fusedopt/ops_spec.h, the C++ view of the step op spec.

The spec lives in ``fusedopt._contract.STEP_OPS``; the C++ side (launch.h's call structs,
bindings.cpp's op implementations, the CUDA table slots, hyperparameter columns and flags)
reads it through the X-macros and constants of the generated header. Run
``python scripts/gen_ops_spec.py`` after changing the spec; tests/test_op_spec.py fails while
the header is out of date.
"""

from __future__ import annotations

import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = os.path.join(ROOT, "csrc", "include", "fusedopt", "ops_spec.h")


def camel(name: str) -> str:
    """``weight_decay`` -> ``WeightDecay``."""
    return "".join(part[:1].upper() + part[1:] for part in name.split("_"))


def _macro(name: str, entries: list[str]) -> list[str]:
    """One line per macro (generated: long lines are fine, and easier to diff)."""
    return [f"#define {name}(X) {' '.join(entries)}".rstrip()]


def _contract():
    """``fusedopt._contract``: the loaded module, or the file alone (not the package, whose
    import loads ``fusedopt._C``, which may be stale while the header is out of date)."""
    if "fusedopt._contract" in sys.modules:
        return sys.modules["fusedopt._contract"]
    path = os.path.join(ROOT, "fusedopt", "_contract.py")
    spec = importlib.util.spec_from_file_location("fusedopt_contract", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def render() -> str:
    """The header's text."""
    contract = _contract()
    COMMON_FLAGS, STEP_OPS = contract.COMMON_FLAGS, contract.STEP_OPS

    out = [
        "// Generated from fusedopt/_contract.py (STEP_OPS) by scripts/gen_ops_spec.py: do not",
        "// edit. tests/test_op_spec.py checks that it is up to date.",
        "//",
        "// For each step op OP (its C++ stem in upper case), in schema order:",
        "//   FUSEDOPT_OP_STATES(X)  X(name, Name, index, may_be_empty, when): the state lists;",
        "//                          `when` is the flag that switches the list on (given iff the",
        "//                          flag is set; then required), else true",
        "//   FUSEDOPT_OP_HYPERS(X)  X(name, Name, index): the hyperparameters, columns of the",
        "//                          call's hypers table ([note: hyper table])",
        "//   FUSEDOPT_OP_FLAGS(X)   X(name, Name, index, default): the per-call bools",
        "//   FUSEDOPT_OP_STEPS(X)   X(steps) when the op has step counts, else nothing",
        "//   FUSEDOPT_OP_STEPS_OPTIONAL  whether the steps list may be empty (or is absent)",
        "//   FUSEDOPT_OP_STEPS_WITH(X)   X(list) when the steps are given iff that list is",
        "// FUSEDOPT_COMMON_FLAGS(X) X(name, Name, index, default): the flags every step op ends",
        "// with, after the common scalars (master_sync).",
        "// FUSEDOPT_STEP_OPS(X) X(op, OP, Stem) lists the ops with one C++ launcher for the step",
        "// (not muon_: its passes have theirs, launch.h); namespace fusedopt::spec::<op> has",
        "// the indices (kExpAvgs, kBeta1, kDecoupled...), the counts (kNumStates...) and each",
        "// state list's shape rule (kStateLayouts: [note: factored layouts] in",
        "// fusedopt/_contract.py) and 8-bit codes (kStateCodes).",
        "#pragma once",
        "",
    ]
    ops = list(STEP_OPS.values())
    out += _macro(
        "FUSEDOPT_COMMON_FLAGS",
        [
            f"X({f.name}, {camel(f.name)}, {k}, {'true' if f.default else 'false'})"
            for k, f in enumerate(COMMON_FLAGS)
        ],
    )
    out += _macro(
        "FUSEDOPT_STEP_OPS",
        [f"X({s.name.rstrip('_')}, {s.cpp.upper()}, {s.cpp})" for s in ops if s.cpp_launcher],
    )
    for s in ops:
        op = s.cpp.upper()
        out += ["", f"// {s.name}"]
        states = [
            f"X({t.name}, {camel(t.name)}, {k}, "
            f"{'true' if t.optional and not t.present_iff else 'false'}, {t.present_iff or 'true'})"
            for k, t in enumerate(s.states)
        ]
        out += _macro(f"FUSEDOPT_{op}_STATES", states)
        out += _macro(
            f"FUSEDOPT_{op}_HYPERS", [f"X({h}, {camel(h)}, {k})" for k, h in enumerate(s.hypers)]
        )
        out += _macro(
            f"FUSEDOPT_{op}_FLAGS",
            [
                f"X({f.name}, {camel(f.name)}, {k}, {'true' if f.default else 'false'})"
                for k, f in enumerate(s.flag_specs)
            ],
        )
        out += _macro(f"FUSEDOPT_{op}_STEPS", ["X(steps)"] if s.steps != "none" else [])
        optional = "false" if s.steps == "required" else "true"
        out += [f"#define FUSEDOPT_{op}_STEPS_OPTIONAL {optional}"]
        out += _macro(f"FUSEDOPT_{op}_STEPS_WITH", [f"X({s.steps_with})"] if s.steps_with else [])
    out += ["", "namespace fusedopt::spec {", ""]
    layouts = [camel(name) for name in contract.STATE_LAYOUTS]
    out += [
        "/// The shape rule of a state list (fusedopt/_contract.py STATE_LAYOUTS).",
        f"enum class StateLayout {{ {', '.join(f'k{name}' for name in layouts)} }};",
        "/// The codes a state holds when its call's states are 8-bit (its block_scales list",
        "/// given): int8 (signed), uint8 (unsigned), or none (never 8-bit). [note: 8-bit",
        "/// states] in fusedopt/quant8.py.",
        "enum class StateCodes { kNone, kSigned, kUnsigned };",
        "",
    ]
    for s in ops:
        out.append(f"namespace {s.name.rstrip('_')} {{")
        rules = ", ".join(f"StateLayout::k{camel(t.layout)}" for t in s.states)
        out.append(f"inline constexpr StateLayout kStateLayouts[] = {{{rules}}};")
        codes = ", ".join(f"StateCodes::k{camel(t.quantized or 'none')}" for t in s.states)
        out.append(f"inline constexpr StateCodes kStateCodes[] = {{{codes}}};")
        free = "true" if s.state_dtypes else "false"
        out.append(f"inline constexpr bool kStateDtypes = {free};  // [note: state dtype]")
        for kind, names in (
            ("States", [t.name for t in s.states]),
            ("Hypers", list(s.hypers)),
            ("Flags", s.flags),
        ):
            values = [f"k{camel(n)} = {k}" for k, n in enumerate(names)]
            out.append(
                f"inline constexpr int {', '.join([*values, f'kNum{kind} = {len(names)}'])};"
            )
        out += [f"}}  // namespace {s.name.rstrip('_')}", ""]
    for kind, count in (
        ("States", lambda s: len(s.states)),
        ("Hypers", lambda s: len(s.hypers)),
        ("Flags", lambda s: len(s.flags)),
    ):
        out.append(f"inline constexpr int kMax{kind} = {max(count(s) for s in ops)};")
    out += ["", "}  // namespace fusedopt::spec", ""]
    return "\n".join(out)


def main() -> None:
    with open(HEADER, "w") as f:
        f.write(render())
    print(f"wrote {os.path.relpath(HEADER, ROOT)}")


if __name__ == "__main__":
    main()
