"""``fusedopt.triton_kernels``: the Triton backend (multi-tensor kernels, one launch per op)."""

raise ImportError("the Triton backend is not implemented yet")
