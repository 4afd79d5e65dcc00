"""The op spec (``fusedopt._contract.STEP_OPS``) and what is derived from it."""

from __future__ import annotations

from fusedopt import _contract

#: The step ops' schemas as they were written by hand before the spec derived them: the
#: derived ones must stay identical (they are public API: torch.ops.fusedopt.*).
GOLDEN_SCHEMAS = {
    "adamw_": (
        "{name}(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
        "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, "
        "Tensor(e!)[] master_params, Tensor(f!)[] steps, float[] lr, float[] beta1, "
        "float[] beta2, float[] eps, float[] weight_decay, bool decoupled, "
        "bool amsgrad, bool maximize, bool bias_correction, Tensor? lr_tensor, "
        "Tensor? grad_scale, Tensor? clip_coef, Tensor? found_inf) -> ()"
    ),
    "lamb_": (
        "{name}(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
        "Tensor(c!)[] exp_avg_sqs, Tensor(e!)[] master_params, Tensor(f!)[] steps, "
        "float[] lr, float[] beta1, float[] beta2, float[] eps, float[] weight_decay, "
        "bool grad_averaging, bool bias_correction, bool trust_clip, "
        "bool always_adapt, Tensor? lr_tensor, Tensor? grad_scale, Tensor? clip_coef, "
        "Tensor? found_inf) -> ()"
    ),
    "lion_": (
        "{name}(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
        "Tensor(e!)[] master_params, float[] lr, float[] beta1, float[] beta2, "
        "float[] weight_decay, bool maximize, Tensor? lr_tensor, Tensor? grad_scale, "
        "Tensor? clip_coef, Tensor? found_inf) -> ()"
    ),
    "sgd_": (
        "{name}(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
        "Tensor(e!)[] master_params, Tensor(f!)[] steps, float[] lr, float[] momentum, "
        "float[] dampening, float[] weight_decay, bool nesterov, bool maximize, "
        "Tensor? lr_tensor, Tensor? grad_scale, Tensor? clip_coef, "
        "Tensor? found_inf) -> ()"
    ),
}


def test_derived_schemas_equal_the_hand_written_ones():
    for op, schema in GOLDEN_SCHEMAS.items():
        assert _contract.SCHEMAS[op] == schema, op
    assert set(_contract.STEP_OPS) == set(GOLDEN_SCHEMAS)
