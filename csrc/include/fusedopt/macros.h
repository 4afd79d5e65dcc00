// Portability macros shared by the host (g++) and device (nvcc) builds of the math headers.
#pragma once

#if defined(__CUDACC__)
#define FUSEDOPT_HD __host__ __device__
#define FUSEDOPT_INLINE __forceinline__
#else
#define FUSEDOPT_HD
#define FUSEDOPT_INLINE inline __attribute__((always_inline))
#endif

// [note: pinned contraction] setup.py compiles host code with -ffp-contract=off and device
// code with -fmad=false, so `a * b + c` rounds twice on both. Where an FMA is meant the math
// headers call fusedopt::fma explicitly, which rounds once on both. The update math below
// follows fusedopt/reference/ops.py operation by operation and uses no FMA, so the CPU build
// matches the fp32 reference backend bit for bit and the GPU build matches the CPU build.
