// The scheduler and runtime behind csrc/emulation/cuda_runtime.h.
//
// [note: emulated threads] A launch runs its blocks one after another, and the threads of a block
// as cooperative fibers (ucontext), each on its own small stack, switched only where CUDA makes
// threads wait for each other: __syncthreads / __syncthreads_or (all threads of the block) and
// __shfl_down_sync / __shfl_xor_sync (the 32 lanes of a warp). A thread that reaches neither runs
// to completion, and its fiber then starts the next thread, so a kernel without barriers costs one
// switch per block. Threads have a fixed priority (thread index order, or its reverse for
// set_schedule(kReverse)) and the scheduler always runs the first thread that can run, until it
// waits: so a run is deterministic, and a warp runs as far ahead of the others as CUDA allows
// (forward: warp 0 first, reverse: the last warp first). That is the schedule that shows a missing
// barrier: a round-robin one kept the warps in near lockstep and let a block_reduce without its
// first __syncthreads pass; these two make it fail. Blocks that run one after another never
// overlap, which is a legal CUDA schedule; a kernel that needed two blocks to run at once (a
// spin-wait on another block) would deadlock here, and none of fusedopt's does.
//
// Barriers are strict where CUDA leaves the behaviour undefined: a __syncthreads must be
// reached by every thread of the block (none may have exited), __syncthreads and
// __syncthreads_or may not meet at one barrier, and a full-mask shuffle must be reached by all
// 32 lanes. Anything else ends in a fault that names the waiting threads, never in a hang.
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <map>
#include <vector>

#include "cuda_runtime.h"

namespace fusedopt::emulation {
namespace {

constexpr int kMaxThreads = 1024;  // per block, as on every CUDA GPU since sm_20
constexpr int kWarpSize = 32;
// Kernel frames are small, but a by-value kernel argument is copied onto each thread's stack
// (table.cu's Slice: 30 KB); pages are only committed when touched.
constexpr size_t kStackBytes = 256 * 1024;

enum class State : uint8_t { kNotStarted, kRunning, kBarrier, kShuffle, kReady, kDone };

struct Thread {
  State state;
  int fiber;           // the fiber running it, once started
  unsigned shfl_delta;
  bool shfl_xor;  // __shfl_xor_sync (else __shfl_down_sync)
  uint64_t shfl_in, shfl_out;
};

struct Fiber {
  ucontext_t context;
  char* stack;
};

/// The emulated device of one host thread.
struct Device {
  Device() {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    const size_t slot = kStackBytes + page;  // a guard page under every stack
    pool_bytes = slot * kMaxThreads;
    void* pool = mmap(nullptr, pool_bytes, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (pool == MAP_FAILED) fault("cannot map the fiber stacks");
    stack_pool = static_cast<char*>(pool);
    for (int i = 0; i < kMaxThreads; ++i) {
      fibers[i].stack = stack_pool + i * slot + page;
      mprotect(stack_pool + i * slot, page, PROT_NONE);
    }
    threads.resize(kMaxThreads);
  }

  // The launch.
  void (*thread_main)(void*) = nullptr;
  void* closure = nullptr;
  bool in_kernel = false;
  int nthreads = 0;
  std::vector<int> order;     // thread indices in schedule (priority) order
  std::vector<int> position;  // the inverse of `order`
  int current = -1;           // the running thread

  // The block.
  std::vector<Thread> threads;
  uint64_t runnable[kMaxThreads / 64] = {};  // by position: not started, or released
  int done = 0;
  int barrier_arrived = 0;
  bool barrier_is_or = false;
  int barrier_acc = 0, barrier_result = 0;
  int warp_arrived[kMaxThreads / kWarpSize] = {};

  Fiber fibers[kMaxThreads];
  std::vector<int> free_fibers;
  ucontext_t scheduler;
  char* stack_pool = nullptr;
  size_t pool_bytes = 0;

  cudaError_t last_error = cudaSuccess;
  Schedule schedule = Schedule::kForward;
  bool capturing = false;
  std::map<uintptr_t, uintptr_t> memory;  // registered [begin, end)
  Stats stats{};
};

thread_local Device* g_device = nullptr;

Device& device() {
  if (g_device == nullptr) g_device = new Device();  // lives as long as the process
  return *g_device;
}

void set_builtins(int t) {
  const unsigned bx = blockDim.x, by = blockDim.y, u = static_cast<unsigned>(t);
  threadIdx = uint3{u % bx, (u / bx) % by, u / (bx * by)};
}

void mark_runnable(Device& d, int t) {
  const int pos = d.position[t];
  d.runnable[pos / 64] |= uint64_t{1} << (pos % 64);
}

/// The position of the first runnable thread, or -1.
int first_runnable(const Device& d) {
  for (int w = 0; w * 64 < d.nthreads; ++w)
    if (d.runnable[w]) return w * 64 + __builtin_ctzll(d.runnable[w]);
  return -1;
}

Device& in_kernel(const char* what) {
  Device& d = device();
  if (!d.in_kernel) {
    std::fprintf(stderr, "emulated CUDA fault: %s called outside a kernel\n", what);
    std::abort();
  }
  return d;
}

/// Suspends the running thread in state `s` until the scheduler resumes it.
void suspend(Device& d, State s) {
  Thread& t = d.threads[d.current];
  t.state = s;
  ++d.stats.switches;
  swapcontext(&d.fibers[t.fiber].context, &d.scheduler);
}

/// Makes thread `t` the running one, in the fiber `fiber`.
void enter(Device& d, int t, int fiber) {
  d.current = t;
  d.threads[t].state = State::kRunning;
  d.threads[t].fiber = fiber;
  set_builtins(t);
}

// A fiber runs its thread, then, while the first runnable thread is one that never started,
// that one ([note: emulated threads]); otherwise it goes back to the scheduler (uc_link).
void fiber_main() {
  Device& d = device();
  const int fiber = d.threads[d.current].fiber;
  for (;;) {
    d.thread_main(d.closure);
    d.threads[d.current].state = State::kDone;
    ++d.done;
    const int pos = first_runnable(d);
    if (pos < 0 || d.threads[d.order[pos]].state != State::kNotStarted) break;
    d.runnable[pos / 64] &= ~(uint64_t{1} << (pos % 64));
    enter(d, d.order[pos], fiber);
  }
  d.free_fibers.push_back(fiber);
  ++d.stats.switches;
}

[[noreturn]] void deadlock(Device& d) {
  char what[256];
  int at_barrier = 0, at_shuffle = 0, first_shuffle = -1;
  for (int t = 0; t < d.nthreads; ++t) {
    at_barrier += d.threads[t].state == State::kBarrier;
    if (d.threads[t].state == State::kShuffle && at_shuffle++ == 0) first_shuffle = t;
  }
  std::snprintf(what, sizeof what,
                "deadlock: %d of %d threads wait at __syncthreads, %d at a shuffle (first: "
                "thread %d), %d exited; CUDA needs every thread at a barrier and every lane "
                "at a full-mask shuffle",
                at_barrier, d.nthreads, at_shuffle, first_shuffle, d.done);
  d.current = -1;
  fault(what);
}

void run_block(Device& d) {
  for (int t = 0; t < d.nthreads; ++t) {
    d.threads[t] = Thread{State::kNotStarted, -1, 0, 0, 0};
    mark_runnable(d, t);
  }
  d.done = 0;
  d.barrier_arrived = 0;
  d.barrier_acc = 0;
  for (int& w : d.warp_arrived) w = 0;
  d.free_fibers.clear();
  for (int f = kMaxThreads - 1; f >= 0; --f) d.free_fibers.push_back(f);
  while (d.done < d.nthreads) {
    const int pos = first_runnable(d);
    if (pos < 0) deadlock(d);
    d.runnable[pos / 64] &= ~(uint64_t{1} << (pos % 64));
    const int t = d.order[pos];
    if (d.threads[t].state == State::kNotStarted) {
      const int fiber = d.free_fibers.back();
      d.free_fibers.pop_back();
      Fiber& f = d.fibers[fiber];
      getcontext(&f.context);
      f.context.uc_stack.ss_sp = f.stack;
      f.context.uc_stack.ss_size = kStackBytes;
      f.context.uc_link = &d.scheduler;
      makecontext(&f.context, fiber_main, 0);
      enter(d, t, fiber);
    } else {
      enter(d, t, d.threads[t].fiber);
    }
    ++d.stats.switches;
    swapcontext(&d.scheduler, &d.fibers[d.threads[t].fiber].context);
  }
  d.current = -1;
  ++d.stats.blocks;
  d.stats.threads += static_cast<uint64_t>(d.nthreads);
}

bool valid(dim3 grid, dim3 block) {
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  return grid.x >= 1 && grid.y >= 1 && grid.z >= 1 && grid.x <= 0x7fffffffu &&
         grid.y <= 65535 && grid.z <= 65535 && block.x >= 1 && block.y >= 1 && block.z >= 1 &&
         block.z <= 64 && threads <= kMaxThreads;
}

}  // namespace

void fault(const char* what) {
  const Device* d = g_device;
  if (d != nullptr && d->in_kernel && d->current >= 0) {
    std::fprintf(stderr,
                 "emulated CUDA fault: %s (block (%u, %u, %u), thread (%u, %u, %u))\n", what,
                 blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x, threadIdx.y, threadIdx.z);
  } else {
    std::fprintf(stderr, "emulated CUDA fault: %s\n", what);
  }
  std::abort();
}

void run_grid(dim3 grid, dim3 block, void (*thread_main)(void*), void* closure) {
  Device& d = device();
  if (d.in_kernel) fault("a kernel launched a kernel (dynamic parallelism is not emulated)");
  if (!valid(grid, block)) {
    d.last_error = cudaErrorInvalidConfiguration;
    return;
  }
  ++d.stats.launches;
  d.thread_main = thread_main;
  d.closure = closure;
  d.nthreads = static_cast<int>(block.x * block.y * block.z);
  d.order.resize(d.nthreads);
  d.position.resize(d.nthreads);
  const bool reverse = d.schedule == Schedule::kReverse;
  for (int i = 0; i < d.nthreads; ++i) {
    d.order[i] = reverse ? d.nthreads - 1 - i : i;
    d.position[d.order[i]] = i;
  }
  blockDim = block;
  gridDim = grid;
  d.in_kernel = true;
  const uint64_t blocks = uint64_t{grid.x} * grid.y * grid.z;
  for (uint64_t i = 0; i < blocks; ++i) {
    const uint64_t b = reverse ? blocks - 1 - i : i;
    blockIdx = uint3{static_cast<unsigned>(b % grid.x),
                     static_cast<unsigned>((b / grid.x) % grid.y),
                     static_cast<unsigned>(b / (uint64_t{grid.x} * grid.y))};
    run_block(d);
  }
  d.in_kernel = false;
}

uint64_t shuffle(unsigned mask, uint64_t bits, unsigned delta, int width, bool xor_lanes) {
  Device& d = in_kernel(xor_lanes ? "__shfl_xor_sync" : "__shfl_down_sync");
  if (mask != 0xffffffffu || width != kWarpSize || d.nthreads % kWarpSize != 0) {
    fault("only full-warp shuffles (mask 0xffffffff, width 32, whole warps) are emulated");
  }
  const int t = d.current, warp = t / kWarpSize, lane = t % kWarpSize;
  Thread& self = d.threads[t];
  self.shfl_in = bits;
  self.shfl_delta = delta;
  self.shfl_xor = xor_lanes;
  if (++d.warp_arrived[warp] < kWarpSize) {
    suspend(d, State::kShuffle);
    return d.threads[t].shfl_out;
  }
  // The last lane to arrive exchanges for the whole warp; the others read shfl_out when
  // resumed, before any of them can reach the warp's next shuffle.
  d.warp_arrived[warp] = 0;
  Thread* lanes = &d.threads[warp * kWarpSize];
  for (int l = 0; l < kWarpSize; ++l) {
    if (lanes[l].shfl_xor != xor_lanes)
      fault("__shfl_down_sync and __shfl_xor_sync meet at one shuffle");
    const unsigned src = xor_lanes ? static_cast<unsigned>(l) ^ lanes[l].shfl_delta
                                   : static_cast<unsigned>(l) + lanes[l].shfl_delta;
    lanes[l].shfl_out = src < kWarpSize ? lanes[src].shfl_in : lanes[l].shfl_in;
    if (l != lane) {
      lanes[l].state = State::kReady;
      mark_runnable(d, warp * kWarpSize + l);
    }
  }
  return self.shfl_out;
}

namespace {

int barrier(bool is_or, int predicate) {
  Device& d = in_kernel("__syncthreads");
  if (d.barrier_arrived == 0) {
    d.barrier_is_or = is_or;
  } else if (d.barrier_is_or != is_or) {
    fault("__syncthreads and __syncthreads_or meet at one barrier");
  }
  d.barrier_acc |= predicate != 0;
  if (++d.barrier_arrived < d.nthreads) {
    suspend(d, State::kBarrier);
    return d.barrier_result;
  }
  // The last thread releases the others; they read barrier_result before any of them can
  // complete the next barrier.
  d.barrier_result = d.barrier_acc;
  d.barrier_acc = 0;
  d.barrier_arrived = 0;
  for (int t = 0; t < d.nthreads; ++t) {
    if (d.threads[t].state == State::kBarrier) {
      d.threads[t].state = State::kReady;
      mark_runnable(d, t);
    }
  }
  return d.barrier_result;
}

}  // namespace

void check_access(const void* p, size_t bytes, size_t align) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  char what[160];
  if (a % align != 0) {
    std::snprintf(what, sizeof what, "misaligned %zu-byte access at %p (needs %zu-byte alignment)",
                  bytes, p, align);
    fault(what);
  }
  const Device& d = device();
  auto it = d.memory.upper_bound(a);
  if (it == d.memory.begin() || (--it, a + bytes > it->second)) {
    std::snprintf(what, sizeof what,
                  "%zu-byte access at %p outside every registered device allocation", bytes, p);
    fault(what);
  }
}

void register_memory(const void* p, size_t bytes) {
  if (bytes == 0) return;
  const auto a = reinterpret_cast<uintptr_t>(p);
  device().memory[a] = a + bytes;
}

void unregister_memory(const void* p) { device().memory.erase(reinterpret_cast<uintptr_t>(p)); }

void set_schedule(Schedule s) { device().schedule = s; }
void set_capturing(bool capturing) { device().capturing = capturing; }
Stats stats() { return device().stats; }

}  // namespace fusedopt::emulation

using fusedopt::emulation::device;

void __syncthreads() { fusedopt::emulation::barrier(false, 0); }
int __syncthreads_or(int predicate) { return fusedopt::emulation::barrier(true, predicate); }

bool __isGlobal(const void* p) {
  const auto& d = device();
  const char* c = static_cast<const char*>(p);
  return !(c >= d.stack_pool && c < d.stack_pool + d.pool_bytes);
}

cudaError_t cudaGetLastError() {
  auto& d = device();
  const cudaError_t err = d.last_error;
  d.last_error = cudaSuccess;
  return err;
}

const char* cudaGetErrorString(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
  }
  return "unrecognized error code";
}

cudaError_t cudaGetDevice(int* dev) {
  *dev = 0;
  return cudaSuccess;
}

cudaError_t cudaMallocAsync(void** ptr, size_t bytes, cudaStream_t) {
  // 256-byte aligned, as cudaMalloc's blocks; aligned_alloc needs a multiple of the alignment.
  const size_t rounded = (bytes + 255) / 256 * 256;
  *ptr = std::aligned_alloc(256, rounded == 0 ? 256 : rounded);
  if (*ptr == nullptr) return cudaErrorMemoryAllocation;
  fusedopt::emulation::register_memory(*ptr, bytes == 0 ? 1 : bytes);
  return cudaSuccess;
}

cudaError_t cudaFreeAsync(void* ptr, cudaStream_t) {
  if (ptr == nullptr) return cudaSuccess;
  auto& memory = device().memory;
  if (memory.erase(reinterpret_cast<uintptr_t>(ptr)) == 0) return cudaErrorInvalidValue;
  std::free(ptr);
  return cudaSuccess;
}

cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind,
                            cudaStream_t) {
  // Stream order is program order here, and every kind of memory is host memory.
  std::memmove(dst, src, bytes);
  return cudaSuccess;
}

cudaError_t cudaStreamIsCapturing(cudaStream_t, cudaStreamCaptureStatus* status) {
  *status = device().capturing ? cudaStreamCaptureStatusActive : cudaStreamCaptureStatusNone;
  return cudaSuccess;
}
