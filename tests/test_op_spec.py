"""The op spec (``fusedopt._contract.STEP_OPS``) and what is derived from it."""

from __future__ import annotations

import importlib.util
import inspect
import os
import re

import pytest

from fusedopt import _contract, ops, optim, reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: The step ops' schemas, written by hand: the derived ones must stay identical (they are
#: public API: torch.ops.fusedopt.*). Changed deliberately once, when the per-tensor
#: ``float[]`` hyperparameters became ``Tensor hypers, int[] group_sizes`` ([note: hyper
#: table] in fusedopt/_contract.py; DESIGN.md §3 "Op contract").
# Every step op ends with ``Tensor? sr_key=None`` (stochastic rounding, issue #15; [note:
# stochastic rounding] in csrc/include/fusedopt/dtype.h): a deliberate change of the public
# schemas, last and with a default, so that positional callers of the older schema still fit.
GOLDEN_SCHEMAS = {
    "adamw_": (
        "{name}(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
        "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, "
        "Tensor(g!)[] exp_avg_scales, Tensor(h!)[] exp_avg_sq_scales, "
        "Tensor(e!)[] master_params, Tensor(f!)[] steps, Tensor hypers, int[] group_sizes, "
        "bool decoupled, "
        "bool amsgrad, bool maximize, bool bias_correction, Tensor? lr_tensor, "
        "Tensor? grad_scale, Tensor? clip_coef, Tensor? found_inf, "
        "bool master_sync=True, Tensor? sr_key=None) -> ()"
    ),
    # + the block absmaxes of 8-bit states after the states ([note: 8-bit states] in
    # fusedopt/quant8.py): lamb_, lion_ and sgd_ as adamw_
    "lamb_": (
        "{name}(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
        "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] exp_avg_scales, "
        "Tensor(g!)[] exp_avg_sq_scales, Tensor(e!)[] master_params, Tensor(f!)[] steps, "
        "Tensor hypers, int[] group_sizes, bool grad_averaging, bool bias_correction, "
        "bool trust_clip, bool always_adapt, Tensor? lr_tensor, Tensor? grad_scale, "
        "Tensor? clip_coef, Tensor? found_inf, bool master_sync=True, Tensor? sr_key=None) -> ()"
    ),
    "lion_": (
        "{name}(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
        "Tensor(c!)[] exp_avg_scales, "
        "Tensor(e!)[] master_params, Tensor hypers, int[] group_sizes, bool maximize, "
        "Tensor? lr_tensor, Tensor? grad_scale, Tensor? clip_coef, Tensor? found_inf, "
        "bool master_sync=True, Tensor? sr_key=None) -> ()"
    ),
    # Added through the spec (the first op that was): written here by hand from the official
    # Adan's names, so that the derivation is checked against an independent spelling.
    "adan_": (
        "{name}(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
        "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] exp_avg_diffs, Tensor(g!)[] neg_pre_grads, "
        "Tensor(e!)[] master_params, Tensor(f!)[] steps, Tensor hypers, int[] group_sizes, "
        "bool no_prox, "
        "Tensor? lr_tensor, Tensor? grad_scale, Tensor? clip_coef, Tensor? found_inf, "
        "bool master_sync=True, Tensor? sr_key=None) -> ()"
    ),
    # Written by hand from the schedulefree package's names (state z, exp_avg_sq; its group
    # scalars ckp1 and bias_correction2 as columns); no step counts, no flags.
    "schedulefree_adamw_": (
        "{name}(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] zs, "
        "Tensor(c!)[] exp_avg_sqs, Tensor(e!)[] master_params, Tensor hypers, "
        "int[] group_sizes, "
        "Tensor? lr_tensor, Tensor? grad_scale, Tensor? clip_coef, Tensor? found_inf, "
        "bool master_sync=True, Tensor? sr_key=None) -> ()"
    ),
    "sgd_": (
        "{name}(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
        "Tensor(c!)[] momentum_buffer_scales, "
        "Tensor(e!)[] master_params, Tensor(f!)[] steps, Tensor hypers, int[] group_sizes, "
        "bool nesterov, bool maximize, "
        "Tensor? lr_tensor, Tensor? grad_scale, Tensor? clip_coef, Tensor? found_inf, "
        "bool master_sync=True, Tensor? sr_key=None) -> ()"
    ),
    # Written by hand from torch.optim.Adafactor's state names (row_var, col_var, variance).
    "adafactor_": (
        "{name}(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] row_vars, "
        "Tensor(c!)[] col_vars, Tensor(d!)[] variances, Tensor(e!)[] master_params, "
        "Tensor(f!)[] steps, Tensor hypers, int[] group_sizes, bool maximize, "
        "Tensor? lr_tensor, Tensor? grad_scale, Tensor? clip_coef, Tensor? found_inf, "
        "bool master_sync=True, Tensor? sr_key=None) -> ()"
    ),
    # torch.optim.Muon's names; ns_buffers: the bf16 Newton-Schulz scratch ([note: muon passes]).
    "muon_": (
        "{name}(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
        "Tensor(c!)[] ns_buffers, Tensor(e!)[] master_params, Tensor hypers, "
        "int[] group_sizes, bool nesterov, "
        "Tensor? lr_tensor, Tensor? grad_scale, Tensor? clip_coef, Tensor? found_inf, "
        "bool master_sync=True, Tensor? sr_key=None) -> ()"
    ),
}


#: The passes of multi-pass ops (``_contract.PHASE_OPS``), public API too: lamb_'s arguments,
#: with only what each pass writes annotated; sq_norms returned by the first, taken by the second.
GOLDEN_PHASE_SCHEMAS = {
    "lamb_direction_": (
        "{name}(Tensor[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
        "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] exp_avg_scales, "
        "Tensor(g!)[] exp_avg_sq_scales, Tensor[] master_params, Tensor(f!)[] steps, "
        "Tensor hypers, int[] group_sizes, bool grad_averaging, bool bias_correction, "
        "bool trust_clip, bool always_adapt, Tensor? lr_tensor, Tensor? grad_scale, "
        "Tensor? clip_coef, Tensor? found_inf, bool master_sync=True, "
        "Tensor? sr_key=None) -> (Tensor sq_norms)"
    ),
    "lamb_apply_": (
        "{name}(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
        "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] exp_avg_scales, "
        "Tensor(g!)[] exp_avg_sq_scales, Tensor(e!)[] master_params, Tensor[] steps, "
        "Tensor hypers, int[] group_sizes, bool grad_averaging, bool bias_correction, "
        "bool trust_clip, bool always_adapt, Tensor sq_norms, Tensor? lr_tensor, "
        "Tensor? grad_scale, Tensor? clip_coef, Tensor? found_inf, bool master_sync=True, "
        "Tensor? sr_key=None) -> ()"
    ),
    "adafactor_norms_": (
        "{name}(Tensor[] params, Tensor[] grads, Tensor(b!)[] row_vars, "
        "Tensor(c!)[] col_vars, Tensor(d!)[] variances, Tensor[] master_params, "
        "Tensor(f!)[] steps, Tensor hypers, int[] group_sizes, bool maximize, "
        "Tensor? lr_tensor, Tensor? grad_scale, Tensor? clip_coef, Tensor? found_inf, "
        "bool master_sync=True, Tensor? sr_key=None) -> (Tensor sq_norms)"
    ),
    "adafactor_apply_": (
        "{name}(Tensor(a!)[] params, Tensor[] grads, Tensor[] row_vars, Tensor[] col_vars, "
        "Tensor[] variances, Tensor(e!)[] master_params, Tensor[] steps, Tensor hypers, "
        "int[] group_sizes, bool maximize, Tensor sq_norms, Tensor? lr_tensor, "
        "Tensor? grad_scale, Tensor? clip_coef, Tensor? found_inf, bool master_sync=True, "
        "Tensor? sr_key=None) -> ()"
    ),
    "muon_momentum_": (
        "{name}(Tensor[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
        "Tensor(c!)[] ns_buffers, Tensor[] master_params, Tensor hypers, int[] group_sizes, "
        "bool nesterov, Tensor? lr_tensor, Tensor? grad_scale, Tensor? clip_coef, "
        "Tensor? found_inf, bool master_sync=True, Tensor? sr_key=None) -> ()"
    ),
    "muon_apply_": (
        "{name}(Tensor(a!)[] params, Tensor[] grads, Tensor[] momentum_buffers, "
        "Tensor[] ns_buffers, Tensor(e!)[] master_params, Tensor hypers, int[] group_sizes, "
        "bool nesterov, Tensor? lr_tensor, Tensor? grad_scale, Tensor? clip_coef, "
        "Tensor? found_inf, bool master_sync=True, Tensor? sr_key=None) -> ()"
    ),
}


@pytest.mark.parametrize(
    "golden,derived_ops",
    [(GOLDEN_SCHEMAS, _contract.STEP_OPS), (GOLDEN_PHASE_SCHEMAS, _contract.PHASE_OPS)],
    ids=["step_ops", "phase_ops"],
)
def test_derived_schemas_equal_the_hand_written_ones(golden, derived_ops):
    for op, schema in golden.items():
        assert _contract.SCHEMAS[op] == schema, op
    assert set(derived_ops) == set(golden)


@pytest.mark.parametrize("op", sorted(_contract.PHASE_OPS))
def test_phase_reference_and_wrapper_follow_the_schema(op):
    """A pass's reference spells its schema's arguments in order; its public wrapper takes
    the step op's positional lists, then its inputs, and the step op's keywords (bound by the
    step op's signature, so its defaults are the ones the previous test checks)."""
    spec = _contract.PHASE_OPS[op]
    order = _schema_order(spec.step_op)
    k = spec.input_index
    order[k:k] = spec.inputs
    assert list(inspect.signature(getattr(reference, op)).parameters) == order
    kinds = {n: p.kind for n, p in inspect.signature(getattr(ops, op)).parameters.items()}
    step_params = inspect.signature(getattr(ops, spec.step_op)).parameters.values()
    positional = [p.name for p in step_params if p.kind == p.POSITIONAL_OR_KEYWORD]
    assert list(kinds) == [*positional, *spec.inputs, "keywords"]
    assert kinds["keywords"] == inspect.Parameter.VAR_KEYWORD


#: torch's state keys of each optimizer, as torch.optim names them.
TORCH_STATE_KEYS = {
    # + the block absmaxes of 8-bit states ([note: 8-bit states] in fusedopt/quant8.py)
    "adamw_": {
        "step",
        "exp_avg",
        "exp_avg_sq",
        "max_exp_avg_sq",
        "exp_avg_scale",
        "exp_avg_sq_scale",
    },
    "lamb_": {"step", "exp_avg", "exp_avg_sq", "exp_avg_scale", "exp_avg_sq_scale"},
    "lion_": {"exp_avg", "exp_avg_scale"},
    "adan_": {"step", "exp_avg", "exp_avg_sq", "exp_avg_diff", "neg_pre_grad"},  # official Adan's
    "schedulefree_adamw_": {"z", "exp_avg_sq"},  # schedulefree's AdamWScheduleFree
    "sgd_": {"step", "momentum_buffer", "momentum_buffer_scale"},
    "adafactor_": {"step", "row_var", "col_var", "variance"},
    "muon_": {"momentum_buffer"},  # torch.optim.Muon's
}


def test_optimizers_state_lists_come_from_the_spec():
    for cls in (optim.AdamW, optim.Adam, optim.LAMB, optim.Lion, optim.Adan,
                optim.ScheduleFreeAdamW, optim.SGD, optim.Adafactor):  # fmt: skip
        spec = _contract.STEP_OPS[cls.OP]
        assert spec.state_keys == cls.STATE_LISTS
        assert set(cls.STATE_LISTS) == TORCH_STATE_KEYS[cls.OP]
        assert set(cls.STATE_LISTS.values()) <= set(spec.lists)


def test_muon_keeps_torchs_muon_and_adamw_state_keys():
    """fusedopt.Muon steps its non-matrix params with adamw_: both ops' keys, from the spec."""
    muon, adamw = _contract.STEP_OPS["muon_"], _contract.STEP_OPS["adamw_"]
    assert {**adamw.state_keys, **muon.state_keys} == optim.Muon.STATE_LISTS
    assert set(muon.state_keys) == TORCH_STATE_KEYS["muon_"]


def _schema_order(op: str) -> list[str]:
    spec = _contract.STEP_OPS[op]
    common_flags = [f.name for f in _contract.COMMON_FLAGS]
    hypers = ["hypers", "group_sizes"]  # [note: hyper table]
    return [
        *spec.lists, *hypers, *spec.flags, *_contract.COMMON_SCALARS, *common_flags,
        _contract.SR_KEY,
    ]  # fmt: skip


@pytest.mark.parametrize("op", sorted(_contract.STEP_OPS))
def test_reference_signature_is_the_schema_order(op):
    """The reference spells its arguments out (it is the readable semantics): in the spec's
    order, with the spec's names."""
    params = list(inspect.signature(getattr(reference, op)).parameters)
    assert params == _schema_order(op)


@pytest.mark.parametrize("op", sorted(_contract.STEP_OPS))
def test_public_wrapper_defaults_agree_with_the_spec(op):
    """Every list, hyperparameter and flag of the spec is a parameter of ``fusedopt.ops.<op>``
    or one of the :class:`~fusedopt.ops.StepOptions` every wrapper ends with (the wrapper
    passes them by name), and the flags default as the C++ call structs do."""
    signature = inspect.signature(getattr(ops, op)).parameters
    assert signature["options"].kind is inspect.Parameter.VAR_KEYWORD
    defaults = {name: p.default for name, p in signature.items() if name != "options"}
    assert set(ops.StepOptions.__annotations__) == set(ops.STEP_OPTION_DEFAULTS)
    defaults.update(ops.STEP_OPTION_DEFAULTS)
    spec = _contract.STEP_OPS[op]
    assert set(spec.lists) | set(spec.hypers) <= set(defaults)
    for flag in (*spec.flag_specs, *_contract.COMMON_FLAGS):
        assert defaults[flag.name] is flag.default, flag.name


def test_cpp_header_is_up_to_date():
    """csrc/include/fusedopt/ops_spec.h is what scripts/gen_ops_spec.py writes from the spec;
    launch.h's call structs, bindings.cpp's op implementations and the CUDA slots, hyper
    columns and flags are all expanded from it."""
    path = os.path.join(ROOT, "scripts", "gen_ops_spec.py")
    module_spec = importlib.util.spec_from_file_location("gen_ops_spec", path)
    gen = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(gen)
    with open(gen.HEADER) as f:
        assert f.read() == gen.render(), "run: python scripts/gen_ops_spec.py"


def test_cpp_uses_the_spec_not_hand_written_indices():
    """The C++ side names no slot, hyperparameter or flag index by hand: the CUDA step ops
    take them from fusedopt::spec, the call structs and bindings from the X-macros."""
    for op in _contract.STEP_OPS:
        stem = op.rstrip("_")
        with open(os.path.join(ROOT, "csrc", "cuda", f"{stem}.cu")) as f:
            source = f.read()
        # FUSEDOPT_STEP_LAUNCHER expands FUSEDOPT_STEP_HOST, which expands
        # FUSEDOPT_FILL_STEP_CALL (csrc/cuda/step.cuh).
        macro = _contract.STEP_OPS[op].cpp.upper()
        assert re.search(
            rf"FUSEDOPT_(FILL_STEP_CALL|STEP_HOST)\({macro}\)"
            rf"|FUSEDOPT_STEP_LAUNCHER\(\w+, \w+, {macro},",
            source,
        ), stem
        spec = _contract.STEP_OPS[op]
        names = [*spec.hypers, *spec.flags]
        for name in names:
            camel = "".join(part.capitalize() for part in name.split("_"))
            assert not re.search(rf"\bk{camel} = \d", source), (stem, name)
        assert "kState0" not in source, stem  # state slots: state_slot(spec index)
        assert not re.search(r"args\.flag\[\w+\] =", source), stem  # set by the spec's fill
    with open(os.path.join(ROOT, "csrc", "bindings.cpp")) as f:
        bindings = f.read()
    assert "FUSEDOPT_STEP_OPS(FUSEDOPT_STEP_IMPL)" in bindings
    assert not re.search(
        r"void (adamw|lamb|lion|adan|schedulefree_adamw|sgd|adafactor)_impl\(", bindings
    )
