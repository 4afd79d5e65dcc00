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
        "//   FUSEDOPT_OP_STATE_RULES(X)  X(Layout, Codes) per state list: its shape rule",
        "//                          (StateLayout::kLayout) and 8-bit codes (StateCodes::kCodes)",
        "//   FUSEDOPT_OP_STATE_DTYPES  whether the float states may have a dtype of their own",
        "//                          (fp32, bf16, fp16 whatever the param's: [note: state dtype])",
        "// FUSEDOPT_COMMON_FLAGS(X) X(name, Name, index, default): the flags every step op ends",
        "// with, after the common scalars (master_sync).",
        "// FUSEDOPT_STEP_OPS(X) X(op, OP, Stem) lists the ops with one C++ launcher for the step",
        "// (not muon_: its passes have theirs, launch.h); namespace fusedopt::spec::<op> has",
        "// the indices (kExpAvgs, kBeta1, kDecoupled...), the counts (kNumStates...) and each",
        "// state list's shape rule (kStateLayouts: [note: factored layouts] in",
        "// fusedopt/_contract.py), 8-bit codes (kStateCodes) and kStateDtypes.",
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
        out += _macro(
            f"FUSEDOPT_{op}_STATE_RULES",
            [f"X({camel(t.layout)}, {camel(t.quantized or 'none')})" for t in s.states],
        )
        free = "true" if s.state_dtypes else "false"
        out += [f"#define FUSEDOPT_{op}_STATE_DTYPES {free}"]
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
    # Each op's namespace, from its X-macros (one macro, so that the header states once how
    # the constants follow from the spec).
    namespace_macro = [
        "#define FUSEDOPT_SPEC_NAMESPACE(op, OP, Stem)",
        "  namespace op {",
        "  inline constexpr StateLayout kStateLayouts[] = {",
        "      FUSEDOPT_##OP##_STATE_RULES(FUSEDOPT_SPEC_LAYOUT)};",
        "  inline constexpr StateCodes kStateCodes[] = {",
        "      FUSEDOPT_##OP##_STATE_RULES(FUSEDOPT_SPEC_CODES)};",
        "  inline constexpr bool kStateDtypes = FUSEDOPT_##OP##_STATE_DTYPES;",
    ]
    for kind in ("STATES", "HYPERS", "FLAGS"):
        namespace_macro += [
            f"  inline constexpr int FUSEDOPT_##OP##_{kind}(FUSEDOPT_SPEC_INDEX)",
            f"      kNum{kind.title()} = 0 FUSEDOPT_##OP##_{kind}(FUSEDOPT_SPEC_ONE);",
        ]
    width = max(len(line) for line in namespace_macro) + 1
    out += [
        "// namespace fusedopt::spec::<op>: kStateLayouts, kStateCodes (one per state list),",
        "// kStateDtypes, then k<Name> = index of each state, hyperparameter and flag, and",
        "// their counts.",
        "#define FUSEDOPT_SPEC_LAYOUT(layout, codes) StateLayout::k##layout,",
        "#define FUSEDOPT_SPEC_CODES(layout, codes) StateCodes::k##codes,",
        "#define FUSEDOPT_SPEC_INDEX(name, Name, index, ...) k##Name = index,",
        "#define FUSEDOPT_SPEC_ONE(...) +1",
        *(line.ljust(width) + "\\" for line in namespace_macro),
        "  }",
        "FUSEDOPT_STEP_OPS(FUSEDOPT_SPEC_NAMESPACE)",
    ]
    out += [
        f"FUSEDOPT_SPEC_NAMESPACE({s.name.rstrip('_')}, {s.cpp.upper()}, {s.cpp})"
        for s in ops
        if not s.cpp_launcher
    ]
    out.append("")
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
