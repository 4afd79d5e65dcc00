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
// FUSEDOPT_COMMON_FLAGS(X) X(name, Name, index, default): the flags every step op ends
// with, after the common scalars (master_sync).
// FUSEDOPT_STEP_OPS(X) X(op, OP, Stem) lists the ops with one C++ launcher for the step
// (not muon_: its passes have theirs, launch.h); namespace fusedopt::spec::<op> has
// the indices (kExpAvgs, kBeta1, kDecoupled...), the counts (kNumStates...) and each
// state list's shape rule (kStateLayouts: [note: factored layouts] in
// fusedopt/_contract.py) and 8-bit codes (kStateCodes).
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

// lamb_
#define FUSEDOPT_LAMB_STATES(X) X(exp_avgs, ExpAvgs, 0, false, true) X(exp_avg_sqs, ExpAvgSqs, 1, false, true)
#define FUSEDOPT_LAMB_HYPERS(X) X(lr, Lr, 0) X(beta1, Beta1, 1) X(beta2, Beta2, 2) X(eps, Eps, 3) X(weight_decay, WeightDecay, 4)
#define FUSEDOPT_LAMB_FLAGS(X) X(grad_averaging, GradAveraging, 0, true) X(bias_correction, BiasCorrection, 1, true) X(trust_clip, TrustClip, 2, false) X(always_adapt, AlwaysAdapt, 3, false)
#define FUSEDOPT_LAMB_STEPS(X) X(steps)
#define FUSEDOPT_LAMB_STEPS_OPTIONAL false
#define FUSEDOPT_LAMB_STEPS_WITH(X)

// lion_
#define FUSEDOPT_LION_STATES(X) X(exp_avgs, ExpAvgs, 0, false, true)
#define FUSEDOPT_LION_HYPERS(X) X(lr, Lr, 0) X(beta1, Beta1, 1) X(beta2, Beta2, 2) X(weight_decay, WeightDecay, 3)
#define FUSEDOPT_LION_FLAGS(X) X(maximize, Maximize, 0, false)
#define FUSEDOPT_LION_STEPS(X)
#define FUSEDOPT_LION_STEPS_OPTIONAL true
#define FUSEDOPT_LION_STEPS_WITH(X)

// adan_
#define FUSEDOPT_ADAN_STATES(X) X(exp_avgs, ExpAvgs, 0, false, true) X(exp_avg_sqs, ExpAvgSqs, 1, false, true) X(exp_avg_diffs, ExpAvgDiffs, 2, false, true) X(neg_pre_grads, NegPreGrads, 3, false, true)
#define FUSEDOPT_ADAN_HYPERS(X) X(lr, Lr, 0) X(beta1, Beta1, 1) X(beta2, Beta2, 2) X(beta3, Beta3, 3) X(eps, Eps, 4) X(weight_decay, WeightDecay, 5)
#define FUSEDOPT_ADAN_FLAGS(X) X(no_prox, NoProx, 0, false)
#define FUSEDOPT_ADAN_STEPS(X) X(steps)
#define FUSEDOPT_ADAN_STEPS_OPTIONAL false
#define FUSEDOPT_ADAN_STEPS_WITH(X)

// schedulefree_adamw_
#define FUSEDOPT_SCHEDULEFREEADAMW_STATES(X) X(zs, Zs, 0, false, true) X(exp_avg_sqs, ExpAvgSqs, 1, false, true)
#define FUSEDOPT_SCHEDULEFREEADAMW_HYPERS(X) X(lr, Lr, 0) X(beta1, Beta1, 1) X(beta2, Beta2, 2) X(eps, Eps, 3) X(weight_decay, WeightDecay, 4) X(ckp1, Ckp1, 5) X(bias_correction2, BiasCorrection2, 6)
#define FUSEDOPT_SCHEDULEFREEADAMW_FLAGS(X)
#define FUSEDOPT_SCHEDULEFREEADAMW_STEPS(X)
#define FUSEDOPT_SCHEDULEFREEADAMW_STEPS_OPTIONAL true
#define FUSEDOPT_SCHEDULEFREEADAMW_STEPS_WITH(X)

// sgd_
#define FUSEDOPT_SGD_STATES(X) X(momentum_buffers, MomentumBuffers, 0, true, true)
#define FUSEDOPT_SGD_HYPERS(X) X(lr, Lr, 0) X(momentum, Momentum, 1) X(dampening, Dampening, 2) X(weight_decay, WeightDecay, 3)
#define FUSEDOPT_SGD_FLAGS(X) X(nesterov, Nesterov, 0, false) X(maximize, Maximize, 1, false)
#define FUSEDOPT_SGD_STEPS(X) X(steps)
#define FUSEDOPT_SGD_STEPS_OPTIONAL true
#define FUSEDOPT_SGD_STEPS_WITH(X) X(momentum_buffers)

// adafactor_
#define FUSEDOPT_ADAFACTOR_STATES(X) X(row_vars, RowVars, 0, false, true) X(col_vars, ColVars, 1, false, true) X(variances, Variances, 2, false, true)
#define FUSEDOPT_ADAFACTOR_HYPERS(X) X(lr, Lr, 0) X(beta2_decay, Beta2Decay, 1) X(eps1, Eps1, 2) X(eps2, Eps2, 3) X(d, D, 4) X(weight_decay, WeightDecay, 5)
#define FUSEDOPT_ADAFACTOR_FLAGS(X) X(maximize, Maximize, 0, false)
#define FUSEDOPT_ADAFACTOR_STEPS(X) X(steps)
#define FUSEDOPT_ADAFACTOR_STEPS_OPTIONAL false
#define FUSEDOPT_ADAFACTOR_STEPS_WITH(X)

// muon_
#define FUSEDOPT_MUON_STATES(X) X(momentum_buffers, MomentumBuffers, 0, false, true) X(ns_buffers, NsBuffers, 1, false, true)
#define FUSEDOPT_MUON_HYPERS(X) X(lr, Lr, 0) X(momentum, Momentum, 1) X(weight_decay, WeightDecay, 2) X(lr_ratio, LrRatio, 3) X(ns_a, NsA, 4) X(ns_b, NsB, 5) X(ns_c, NsC, 6) X(ns_eps, NsEps, 7) X(ns_steps, NsSteps, 8)
#define FUSEDOPT_MUON_FLAGS(X) X(nesterov, Nesterov, 0, true)
#define FUSEDOPT_MUON_STEPS(X)
#define FUSEDOPT_MUON_STEPS_OPTIONAL true
#define FUSEDOPT_MUON_STEPS_WITH(X)

namespace fusedopt::spec {

/// The shape rule of a state list (fusedopt/_contract.py STATE_LAYOUTS).
enum class StateLayout { kParam, kRow, kCol, kUnfactored, kBf16, kBlockScales };
/// The codes a state holds when its call's states are 8-bit (its block_scales list
/// given): int8 (signed), uint8 (unsigned), or none (never 8-bit). [note: 8-bit
/// states] in fusedopt/quant8.py.
enum class StateCodes { kNone, kSigned, kUnsigned };

namespace adamw {
inline constexpr StateLayout kStateLayouts[] = {StateLayout::kParam, StateLayout::kParam, StateLayout::kParam, StateLayout::kBlockScales, StateLayout::kBlockScales};
inline constexpr StateCodes kStateCodes[] = {StateCodes::kSigned, StateCodes::kUnsigned, StateCodes::kNone, StateCodes::kNone, StateCodes::kNone};
inline constexpr bool kStateDtypes = true;  // [note: state dtype]
inline constexpr int kExpAvgs = 0, kExpAvgSqs = 1, kMaxExpAvgSqs = 2, kExpAvgScales = 3, kExpAvgSqScales = 4, kNumStates = 5;
inline constexpr int kLr = 0, kBeta1 = 1, kBeta2 = 2, kEps = 3, kWeightDecay = 4, kNumHypers = 5;
inline constexpr int kDecoupled = 0, kAmsgrad = 1, kMaximize = 2, kBiasCorrection = 3, kNumFlags = 4;
}  // namespace adamw

namespace lamb {
inline constexpr StateLayout kStateLayouts[] = {StateLayout::kParam, StateLayout::kParam};
inline constexpr StateCodes kStateCodes[] = {StateCodes::kNone, StateCodes::kNone};
inline constexpr bool kStateDtypes = false;  // [note: state dtype]
inline constexpr int kExpAvgs = 0, kExpAvgSqs = 1, kNumStates = 2;
inline constexpr int kLr = 0, kBeta1 = 1, kBeta2 = 2, kEps = 3, kWeightDecay = 4, kNumHypers = 5;
inline constexpr int kGradAveraging = 0, kBiasCorrection = 1, kTrustClip = 2, kAlwaysAdapt = 3, kNumFlags = 4;
}  // namespace lamb

namespace lion {
inline constexpr StateLayout kStateLayouts[] = {StateLayout::kParam};
inline constexpr StateCodes kStateCodes[] = {StateCodes::kNone};
inline constexpr bool kStateDtypes = false;  // [note: state dtype]
inline constexpr int kExpAvgs = 0, kNumStates = 1;
inline constexpr int kLr = 0, kBeta1 = 1, kBeta2 = 2, kWeightDecay = 3, kNumHypers = 4;
inline constexpr int kMaximize = 0, kNumFlags = 1;
}  // namespace lion

namespace adan {
inline constexpr StateLayout kStateLayouts[] = {StateLayout::kParam, StateLayout::kParam, StateLayout::kParam, StateLayout::kParam};
inline constexpr StateCodes kStateCodes[] = {StateCodes::kNone, StateCodes::kNone, StateCodes::kNone, StateCodes::kNone};
inline constexpr bool kStateDtypes = false;  // [note: state dtype]
inline constexpr int kExpAvgs = 0, kExpAvgSqs = 1, kExpAvgDiffs = 2, kNegPreGrads = 3, kNumStates = 4;
inline constexpr int kLr = 0, kBeta1 = 1, kBeta2 = 2, kBeta3 = 3, kEps = 4, kWeightDecay = 5, kNumHypers = 6;
inline constexpr int kNoProx = 0, kNumFlags = 1;
}  // namespace adan

namespace schedulefree_adamw {
inline constexpr StateLayout kStateLayouts[] = {StateLayout::kParam, StateLayout::kParam};
inline constexpr StateCodes kStateCodes[] = {StateCodes::kNone, StateCodes::kNone};
inline constexpr bool kStateDtypes = false;  // [note: state dtype]
inline constexpr int kZs = 0, kExpAvgSqs = 1, kNumStates = 2;
inline constexpr int kLr = 0, kBeta1 = 1, kBeta2 = 2, kEps = 3, kWeightDecay = 4, kCkp1 = 5, kBiasCorrection2 = 6, kNumHypers = 7;
inline constexpr int kNumFlags = 0;
}  // namespace schedulefree_adamw

namespace sgd {
inline constexpr StateLayout kStateLayouts[] = {StateLayout::kParam};
inline constexpr StateCodes kStateCodes[] = {StateCodes::kNone};
inline constexpr bool kStateDtypes = false;  // [note: state dtype]
inline constexpr int kMomentumBuffers = 0, kNumStates = 1;
inline constexpr int kLr = 0, kMomentum = 1, kDampening = 2, kWeightDecay = 3, kNumHypers = 4;
inline constexpr int kNesterov = 0, kMaximize = 1, kNumFlags = 2;
}  // namespace sgd

namespace adafactor {
inline constexpr StateLayout kStateLayouts[] = {StateLayout::kRow, StateLayout::kCol, StateLayout::kUnfactored};
inline constexpr StateCodes kStateCodes[] = {StateCodes::kNone, StateCodes::kNone, StateCodes::kNone};
inline constexpr bool kStateDtypes = false;  // [note: state dtype]
inline constexpr int kRowVars = 0, kColVars = 1, kVariances = 2, kNumStates = 3;
inline constexpr int kLr = 0, kBeta2Decay = 1, kEps1 = 2, kEps2 = 3, kD = 4, kWeightDecay = 5, kNumHypers = 6;
inline constexpr int kMaximize = 0, kNumFlags = 1;
}  // namespace adafactor

namespace muon {
inline constexpr StateLayout kStateLayouts[] = {StateLayout::kParam, StateLayout::kBf16};
inline constexpr StateCodes kStateCodes[] = {StateCodes::kNone, StateCodes::kNone};
inline constexpr bool kStateDtypes = false;  // [note: state dtype]
inline constexpr int kMomentumBuffers = 0, kNsBuffers = 1, kNumStates = 2;
inline constexpr int kLr = 0, kMomentum = 1, kWeightDecay = 2, kLrRatio = 3, kNsA = 4, kNsB = 5, kNsC = 6, kNsEps = 7, kNsSteps = 8, kNumHypers = 9;
inline constexpr int kNesterov = 0, kNumFlags = 1;
}  // namespace muon

inline constexpr int kMaxStates = 5;
inline constexpr int kMaxHypers = 9;
inline constexpr int kMaxFlags = 4;

}  // namespace fusedopt::spec
