// Host emulation of the part of the CUDA runtime and device language that csrc/cuda uses, so
// that the real kernel sources run on the CPU in ctest (csrc/tests/test_cuda_emulated.cpp)
// and are compared bit for bit with the CPU launchers. Test-only: never part of fusedopt._C.
//
// The kernels are compiled as C++ by g++ with -DFUSEDOPT_CUDA_EMULATION and this directory
// first on the include path, so `#include <cuda_runtime.h>` lands here. What it provides:
//   * the function and variable qualifiers, as nothing (or `inline` / `static thread_local`);
//   * dim3, uint3, uint4, threadIdx / blockIdx / blockDim / gridDim;
//   * launches (fusedopt::emulation::launch, which csrc/cuda's launch_kernel calls instead of
//     `<<<>>>`): run synchronously on the calling thread, as a single stream would order them,
//     one block after another, the threads of a block as cooperative fibers
//     ([note: emulated threads] in emulator.cpp) so that __syncthreads, __syncthreads_or,
//     __shfl_down_sync and __shfl_xor_sync have CUDA's semantics;
//   * device memory = host memory; streams are accepted and ignored; no stream is capturing
//     unless a test says so (set_capturing), which is how the capture path is reached.
// Where the GPU would fault or the kernel has undefined behaviour (a misaligned vector access,
// an access outside a registered tensor, a barrier not every thread reaches, a shuffle some
// lane of the warp misses) the emulator prints what and where, and aborts.
#pragma once

#ifndef FUSEDOPT_CUDA_EMULATION
#error "csrc/emulation is the host emulation of CUDA for tests: define FUSEDOPT_CUDA_EMULATION"
#endif

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

// ---------------------------------------------------------------------------------------
// Qualifiers. Functions are plain host functions; __forceinline__ keeps its meaning.
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __grid_constant__
// Blocks run one after another on the launching host thread, so one copy per host thread is
// the block's shared memory.
#define __shared__ static thread_local
// gcc 12 has no __builtin_assume. A false assumption is undefined behaviour: check it.
#define __builtin_assume(cond) \
  ((cond) ? (void)0 : ::fusedopt::emulation::fault("__builtin_assume(" #cond ") is false"))

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

// The built-in variables of the running emulated thread (set by the scheduler before it
// switches to a thread; the kernel only reads them).
inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim{1, 1, 1};
inline thread_local dim3 gridDim{1, 1, 1};

// ---------------------------------------------------------------------------------------
// Runtime API: the calls csrc/cuda makes, with the real names and error codes.

typedef struct CUstream_st* cudaStream_t;

enum cudaError {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
};
typedef enum cudaError cudaError_t;

enum cudaStreamCaptureStatus {
  cudaStreamCaptureStatusNone = 0,
  cudaStreamCaptureStatusActive = 1,
  cudaStreamCaptureStatusInvalidated = 2,
};

enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4,
};

cudaError_t cudaGetLastError();
const char* cudaGetErrorString(cudaError_t err);
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaMallocAsync(void** ptr, size_t bytes, cudaStream_t stream);
cudaError_t cudaFreeAsync(void* ptr, cudaStream_t stream);
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind,
                            cudaStream_t stream);
cudaError_t cudaStreamIsCapturing(cudaStream_t stream, cudaStreamCaptureStatus* status);

// ---------------------------------------------------------------------------------------
// Device functions.

void __syncthreads();
int __syncthreads_or(int predicate);
/// True unless p is in an emulated thread's stack (CUDA local memory).
bool __isGlobal(const void* p);

namespace fusedopt::emulation {

/// Prints "emulated CUDA fault: <what>" with the running block and thread, and aborts.
[[noreturn]] void fault(const char* what);

/// The warp-synchronous exchange behind the __shfl_*_sync functions: every lane of the warp
/// must call it with the full mask and the same kind; lane l gets the `bits` of lane
/// l + delta (its own when l + delta >= 32) or, with xor_lanes, of lane l ^ delta.
uint64_t shuffle(unsigned mask, uint64_t bits, unsigned delta, int width, bool xor_lanes);

template <class T>
T shuffle_value(unsigned mask, T var, unsigned delta, int width, bool xor_lanes) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "a shuffle moves 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &var, sizeof(T));
  bits = shuffle(mask, bits, delta, width, xor_lanes);
  std::memcpy(&var, &bits, sizeof(T));
  return var;
}

}  // namespace fusedopt::emulation

template <class T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  return fusedopt::emulation::shuffle_value(mask, var, delta, width, false);
}

template <class T>
T __shfl_xor_sync(unsigned mask, T var, unsigned lane_mask, int width = 32) {
  return fusedopt::emulation::shuffle_value(mask, var, lane_mask, width, true);
}

namespace fusedopt::emulation {

// ---------------------------------------------------------------------------------------
// Launches.

/// Runs thread_main(closure) for every thread of every block of the grid (the scheduler of
/// emulator.cpp). Sets cudaGetLastError's error instead when the configuration is invalid.
void run_grid(dim3 grid, dim3 block, void (*thread_main)(void*), void* closure);

/// kernel<<<grid, block, 0, stream>>>(args...): the arguments are converted to the kernel's
/// parameter types once, as into CUDA's parameter buffer, and every thread receives its own
/// by-value copy of them.
template <class... Params, class... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t /*stream*/,
            Args&&... args) {
  struct Closure {
    void (*kernel)(Params...);
    std::tuple<std::decay_t<Params>...> params;
  };
  Closure closure{kernel, std::tuple<std::decay_t<Params>...>(std::forward<Args>(args)...)};
  run_grid(
      grid, block,
      [](void* p) {
        auto* c = static_cast<Closure*>(p);
        std::apply(c->kernel, c->params);
      },
      &closure);
}

// ---------------------------------------------------------------------------------------
// Checks and knobs for tests.

/// Faults unless [p, p + bytes) is aligned to `align` and lies inside one range of device
/// memory (cudaMallocAsync's or registered). csrc/cuda calls it for every tensor access.
void check_access(const void* p, size_t bytes, size_t align);

/// Registers [p, p + bytes) as device memory for check_access (cudaMallocAsync registers its
/// blocks itself). A test registers each tensor's exact extent, so that a kernel touching an
/// element past a tensor's end faults even where another tensor's memory follows.
/// Registering an address again replaces its range.
void register_memory(const void* p, size_t bytes);
void unregister_memory(const void* p);

/// The order of the blocks, and the priority of the threads of a block: the scheduler always
/// runs the first thread that can run ([note: emulated threads] in emulator.cpp). A correct
/// kernel gives the same bits under both; a race (a missing barrier) usually does not.
enum class Schedule { kForward, kReverse };
void set_schedule(Schedule s);

/// What cudaStreamIsCapturing reports (cudaStreamCaptureStatusNone unless set).
void set_capturing(bool capturing);

/// Counters since the start of the process, for a test's summary line.
struct Stats {
  uint64_t launches, blocks, threads, switches;
};
Stats stats();

}  // namespace fusedopt::emulation
