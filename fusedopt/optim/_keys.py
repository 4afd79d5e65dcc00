"""State and group keys every fusedopt optimizer shares."""

#: The state key of a 0-d step count; every other state tensor pairs with its param.
STEP_KEY = "step"
#: The state key of a bf16/fp16 param's fp32 master copy.
MASTER_KEY = "master_param"
#: The state key of a bf16 param's compact master: the int16 low halves of its fp32 master
#: (``master_weights="compact"``; [note: compact master] in fusedopt/_contract.py).
REMAINDER_KEY = "master_remainder"
#: The ``master_weights`` value of compact masters.
COMPACT = "compact"
#: The state key of a bf16/fp16 param's Kahan compensation, in the param's dtype
#: (``master_weights="kahan"``; [note: kahan master] in fusedopt/_contract.py).
KAHAN_KEY = "kahan_comp"
#: The ``master_weights`` value of Kahan masters.
KAHAN = "kahan"
#: The state keys of the three kinds of master (fp32, compact, Kahan).
MASTER_KEYS = (MASTER_KEY, REMAINDER_KEY, KAHAN_KEY)
#: torch group keys that mean nothing to fusedopt (always fused): dropped on load.
TORCH_ONLY_KEYS = ("foreach", "fused", "differentiable")
#: The group key of stochastic rounding, and the state dict's entry of its seed and counter
#: ([note: stochastic rounding] in csrc/include/fusedopt/dtype.h).
SR_GROUP_KEY = "stochastic_rounding"
#: The group key of the moments' storage dtype ([note: state dtype] in
#: csrc/include/fusedopt/dtype.h): None (fp32 with master weights, else the param's dtype),
#: torch.float32, torch.bfloat16 or torch.float16, for the ops that declare ``state_dtypes``.
STATE_DTYPE_KEY = "state_dtype"
#: The SR seed and counter as written into each stochastic-rounding group of a state dict
#: (beside the top-level ``"stochastic_rounding"`` entry): DCP's ``get_optimizer_state_dict``
#: keeps only ``state`` and ``param_groups`` ([note: stochastic rounding] in
#: csrc/include/fusedopt/dtype.h). ``load_state_dict`` takes them out of the groups.
SR_SEED_KEY = "sr_seed"
SR_COUNTER_KEY = "sr_counter"
