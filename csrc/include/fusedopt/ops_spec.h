// Generated from fusedopt/_contract.py (STEP_OPS) by scripts/gen_ops_spec.py: do not
// edit. tests/test_op_spec.py checks that it is up to date.
//
// For each step op OP (its C++ stem in upper case), in schema order:
//   FUSEDOPT_OP_STATES(X)  X(name, Name, index, may_be_empty, when): the state lists;
//                          `when` is the flag that switches the list on (given iff the
//                          flag is set; then required), else true
//   FUSEDOPT_OP_HYPERS(X)  X(name, Name, index): the hyperparameters, columns of the
//                          call's hypers table ([note: hyper table])
//   FUSEDOPT_OP_FLAGS(X)   X(name, Name, index, default): the per-call bools
//   FUSEDOPT_OP_STEPS(X)   X(steps) when the op has step counts, else nothing
//   FUSEDOPT_OP_STEPS_OPTIONAL  whether the steps list may be empty (or is absent)
//   FUSEDOPT_OP_STEPS_WITH(X)   X(list) when the steps are given iff that list is
//   FUSEDOPT_OP_STATE_RULES(X)  X(Layout, Codes) per state list: its shape rule
//                          (StateLayout::kLayout) and 8-bit codes (StateCodes::kCodes)
//   FUSEDOPT_OP_STATE_DTYPES  whether the float states may have a dtype of their own
//                          (fp32, bf16, fp16 whatever the param's: [note: state dtype])
// FUSEDOPT_COMMON_FLAGS(X) X(name, Name, index, default): the flags every step op ends
// with, after the common scalars (master_sync).
// FUSEDOPT_STEP_OPS(X) X(op, OP, Stem) lists the ops with one C++ launcher for the step
// (not muon_: its passes have theirs, launch.h); namespace fusedopt::spec::<op> has
// the indices (kExpAvgs, kBeta1, kDecoupled...), the counts (kNumStates...) and each
// state list's shape rule (kStateLayouts: [note: factored layouts] in
// fusedopt/_contract.py), 8-bit codes (kStateCodes) and kStateDtypes.
#pragma once

#define FUSEDOPT_COMMON_FLAGS(X) X(master_sync, MasterSync, 0, true)
#define FUSEDOPT_STEP_OPS(X) X(adamw, ADAMW, AdamW) X(lamb, LAMB, Lamb) X(lion, LION, Lion) X(adan, ADAN, Adan) X(schedulefree_adamw, SCHEDULEFREEADAMW, ScheduleFreeAdamW) X(sgd, SGD, Sgd) X(adafactor, ADAFACTOR, Adafactor)

// adamw_
#define FUSEDOPT_ADAMW_STATES(X) X(exp_avgs, ExpAvgs, 0, false, true) X(exp_avg_sqs, ExpAvgSqs, 1, false, true) X(max_exp_avg_sqs, MaxExpAvgSqs, 2, false, amsgrad) X(exp_avg_scales, ExpAvgScales, 3, true, true) X(exp_avg_sq_scales, ExpAvgSqScales, 4, true, true)
#define FUSEDOPT_ADAMW_HYPERS(X) X(lr, Lr, 0) X(beta1, Beta1, 1) X(beta2, Beta2, 2) X(eps, Eps, 3) X(weight_decay, WeightDecay, 4)
#define FUSEDOPT_ADAMW_FLAGS(X) X(decoupled, Decoupled, 0, true) X(amsgrad, Amsgrad, 1, false) X(maximize, Maximize, 2, false) X(bias_correction, BiasCorrection, 3, true)
#define FUSEDOPT_ADAMW_STEPS(X) X(steps)
#define FUSEDOPT_ADAMW_STEPS_OPTIONAL false
#define FUSEDOPT_ADAMW_STEPS_WITH(X)
#define FUSEDOPT_ADAMW_STATE_RULES(X) X(Param, Signed) X(Param, Unsigned) X(Param, None) X(BlockScales, None) X(BlockScales, None)
#define FUSEDOPT_ADAMW_STATE_DTYPES true

// lamb_
#define FUSEDOPT_LAMB_STATES(X) X(exp_avgs, ExpAvgs, 0, false, true) X(exp_avg_sqs, ExpAvgSqs, 1, false, true) X(exp_avg_scales, ExpAvgScales, 2, true, true) X(exp_avg_sq_scales, ExpAvgSqScales, 3, true, true)
#define FUSEDOPT_LAMB_HYPERS(X) X(lr, Lr, 0) X(beta1, Beta1, 1) X(beta2, Beta2, 2) X(eps, Eps, 3) X(weight_decay, WeightDecay, 4)
#define FUSEDOPT_LAMB_FLAGS(X) X(grad_averaging, GradAveraging, 0, true) X(bias_correction, BiasCorrection, 1, true) X(trust_clip, TrustClip, 2, false) X(always_adapt, AlwaysAdapt, 3, false)
#define FUSEDOPT_LAMB_STEPS(X) X(steps)
#define FUSEDOPT_LAMB_STEPS_OPTIONAL false
#define FUSEDOPT_LAMB_STEPS_WITH(X)
#define FUSEDOPT_LAMB_STATE_RULES(X) X(Param, Signed) X(Param, Unsigned) X(BlockScales, None) X(BlockScales, None)
#define FUSEDOPT_LAMB_STATE_DTYPES true

// lion_
#define FUSEDOPT_LION_STATES(X) X(exp_avgs, ExpAvgs, 0, false, true) X(exp_avg_scales, ExpAvgScales, 1, true, true)
#define FUSEDOPT_LION_HYPERS(X) X(lr, Lr, 0) X(beta1, Beta1, 1) X(beta2, Beta2, 2) X(weight_decay, WeightDecay, 3)
#define FUSEDOPT_LION_FLAGS(X) X(maximize, Maximize, 0, false)
#define FUSEDOPT_LION_STEPS(X)
#define FUSEDOPT_LION_STEPS_OPTIONAL true
#define FUSEDOPT_LION_STEPS_WITH(X)
#define FUSEDOPT_LION_STATE_RULES(X) X(Param, Signed) X(BlockScales, None)
#define FUSEDOPT_LION_STATE_DTYPES true

// adan_
#define FUSEDOPT_ADAN_STATES(X) X(exp_avgs, ExpAvgs, 0, false, true) X(exp_avg_sqs, ExpAvgSqs, 1, false, true) X(exp_avg_diffs, ExpAvgDiffs, 2, false, true) X(neg_pre_grads, NegPreGrads, 3, false, true)
#define FUSEDOPT_ADAN_HYPERS(X) X(lr, Lr, 0) X(beta1, Beta1, 1) X(beta2, Beta2, 2) X(beta3, Beta3, 3) X(eps, Eps, 4) X(weight_decay, WeightDecay, 5)
#define FUSEDOPT_ADAN_FLAGS(X) X(no_prox, NoProx, 0, false)
#define FUSEDOPT_ADAN_STEPS(X) X(steps)
#define FUSEDOPT_ADAN_STEPS_OPTIONAL false
#define FUSEDOPT_ADAN_STEPS_WITH(X)
#define FUSEDOPT_ADAN_STATE_RULES(X) X(Param, None) X(Param, None) X(Param, None) X(Param, None)
#define FUSEDOPT_ADAN_STATE_DTYPES false

// schedulefree_adamw_
#define FUSEDOPT_SCHEDULEFREEADAMW_STATES(X) X(zs, Zs, 0, false, true) X(exp_avg_sqs, ExpAvgSqs, 1, false, true)
#define FUSEDOPT_SCHEDULEFREEADAMW_HYPERS(X) X(lr, Lr, 0) X(beta1, Beta1, 1) X(beta2, Beta2, 2) X(eps, Eps, 3) X(weight_decay, WeightDecay, 4) X(ckp1, Ckp1, 5) X(bias_correction2, BiasCorrection2, 6)
#define FUSEDOPT_SCHEDULEFREEADAMW_FLAGS(X)
#define FUSEDOPT_SCHEDULEFREEADAMW_STEPS(X)
#define FUSEDOPT_SCHEDULEFREEADAMW_STEPS_OPTIONAL true
#define FUSEDOPT_SCHEDULEFREEADAMW_STEPS_WITH(X)
#define FUSEDOPT_SCHEDULEFREEADAMW_STATE_RULES(X) X(Param, None) X(Param, None)
#define FUSEDOPT_SCHEDULEFREEADAMW_STATE_DTYPES false

// sgd_
#define FUSEDOPT_SGD_STATES(X) X(momentum_buffers, MomentumBuffers, 0, true, true) X(momentum_buffer_scales, MomentumBufferScales, 1, true, true)
#define FUSEDOPT_SGD_HYPERS(X) X(lr, Lr, 0) X(momentum, Momentum, 1) X(dampening, Dampening, 2) X(weight_decay, WeightDecay, 3)
#define FUSEDOPT_SGD_FLAGS(X) X(nesterov, Nesterov, 0, false) X(maximize, Maximize, 1, false)
#define FUSEDOPT_SGD_STEPS(X) X(steps)
#define FUSEDOPT_SGD_STEPS_OPTIONAL true
#define FUSEDOPT_SGD_STEPS_WITH(X) X(momentum_buffers)
#define FUSEDOPT_SGD_STATE_RULES(X) X(Param, Signed) X(BlockScales, None)
#define FUSEDOPT_SGD_STATE_DTYPES true

// adafactor_
#define FUSEDOPT_ADAFACTOR_STATES(X) X(row_vars, RowVars, 0, false, true) X(col_vars, ColVars, 1, false, true) X(variances, Variances, 2, false, true)
#define FUSEDOPT_ADAFACTOR_HYPERS(X) X(lr, Lr, 0) X(beta2_decay, Beta2Decay, 1) X(eps1, Eps1, 2) X(eps2, Eps2, 3) X(d, D, 4) X(weight_decay, WeightDecay, 5)
#define FUSEDOPT_ADAFACTOR_FLAGS(X) X(maximize, Maximize, 0, false)
#define FUSEDOPT_ADAFACTOR_STEPS(X) X(steps)
#define FUSEDOPT_ADAFACTOR_STEPS_OPTIONAL false
#define FUSEDOPT_ADAFACTOR_STEPS_WITH(X)
#define FUSEDOPT_ADAFACTOR_STATE_RULES(X) X(Row, None) X(Col, None) X(Unfactored, None)
#define FUSEDOPT_ADAFACTOR_STATE_DTYPES false

// muon_
#define FUSEDOPT_MUON_STATES(X) X(momentum_buffers, MomentumBuffers, 0, false, true) X(ns_buffers, NsBuffers, 1, false, true)
#define FUSEDOPT_MUON_HYPERS(X) X(lr, Lr, 0) X(momentum, Momentum, 1) X(weight_decay, WeightDecay, 2) X(lr_ratio, LrRatio, 3) X(ns_a, NsA, 4) X(ns_b, NsB, 5) X(ns_c, NsC, 6) X(ns_eps, NsEps, 7) X(ns_steps, NsSteps, 8)
#define FUSEDOPT_MUON_FLAGS(X) X(nesterov, Nesterov, 0, true)
#define FUSEDOPT_MUON_STEPS(X)
#define FUSEDOPT_MUON_STEPS_OPTIONAL true
#define FUSEDOPT_MUON_STEPS_WITH(X)
#define FUSEDOPT_MUON_STATE_RULES(X) X(Param, None) X(Bf16, None)
#define FUSEDOPT_MUON_STATE_DTYPES false

namespace fusedopt::spec {

/// The shape rule of a state list (fusedopt/_contract.py STATE_LAYOUTS).
enum class StateLayout { kParam, kRow, kCol, kUnfactored, kBf16, kBlockScales };
/// The codes a state holds when its call's states are 8-bit (its block_scales list
/// given): int8 (signed), uint8 (unsigned), or none (never 8-bit). [note: 8-bit
/// states] in fusedopt/quant8.py.
enum class StateCodes { kNone, kSigned, kUnsigned };

// namespace fusedopt::spec::<op>: kStateLayouts, kStateCodes (one per state list),
// kStateDtypes, then k<Name> = index of each state, hyperparameter and flag, and
// their counts.
#define FUSEDOPT_SPEC_LAYOUT(layout, codes) StateLayout::k##layout,
#define FUSEDOPT_SPEC_CODES(layout, codes) StateCodes::k##codes,
#define FUSEDOPT_SPEC_INDEX(name, Name, index, ...) k##Name = index,
#define FUSEDOPT_SPEC_ONE(...) +1
#define FUSEDOPT_SPEC_NAMESPACE(op, OP, Stem)                        \
  namespace op {                                                     \
  inline constexpr StateLayout kStateLayouts[] = {                   \
      FUSEDOPT_##OP##_STATE_RULES(FUSEDOPT_SPEC_LAYOUT)};            \
  inline constexpr StateCodes kStateCodes[] = {                      \
      FUSEDOPT_##OP##_STATE_RULES(FUSEDOPT_SPEC_CODES)};             \
  inline constexpr bool kStateDtypes = FUSEDOPT_##OP##_STATE_DTYPES; \
  inline constexpr int FUSEDOPT_##OP##_STATES(FUSEDOPT_SPEC_INDEX)   \
      kNumStates = 0 FUSEDOPT_##OP##_STATES(FUSEDOPT_SPEC_ONE);      \
  inline constexpr int FUSEDOPT_##OP##_HYPERS(FUSEDOPT_SPEC_INDEX)   \
      kNumHypers = 0 FUSEDOPT_##OP##_HYPERS(FUSEDOPT_SPEC_ONE);      \
  inline constexpr int FUSEDOPT_##OP##_FLAGS(FUSEDOPT_SPEC_INDEX)    \
      kNumFlags = 0 FUSEDOPT_##OP##_FLAGS(FUSEDOPT_SPEC_ONE);        \
  }
FUSEDOPT_STEP_OPS(FUSEDOPT_SPEC_NAMESPACE)
FUSEDOPT_SPEC_NAMESPACE(muon, MUON, Muon)

inline constexpr int kMaxStates = 5;
inline constexpr int kMaxHypers = 9;
inline constexpr int kMaxFlags = 4;

}  // namespace fusedopt::spec
