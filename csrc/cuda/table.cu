// The device table of every multi-tensor launch ([note: device table], common.cuh): built on
// the host, put in device memory without a host sync, cached across steps; and the step
// counter increment every step op shares.
//
// [note: table upload] The table bytes travel as kernel arguments: write_table copies up to
// kSliceBytes per launch from its (grid-constant) argument into device memory. Unlike a
// cudaMemcpyAsync from host memory this needs no pinned staging buffer whose reuse must wait
// for the copy (a pageable source may even make the driver sync), and under CUDA-graph capture
// the bytes are frozen into the captured kernel node, so a replay rewrites exactly the table
// of the capture. Kernel arguments of up to 32 KB need CUDA >= 12.1 on sm_70+.
//
// Eager calls reuse device tables across steps: a per-(device, stream) cache of the last
// kCachePerStream tables, looked up by content (addresses and sizes; a row holds the address
// of its hyperparameter row, not the values: [note: hyper table] in fusedopt/_contract.py),
// so a training loop whose tensors do not move uploads nothing after its first step, even
// under an lr schedule, and one that alternates several calls per step (a bf16 and an fp32
// group; grad_norm then the step) keeps one table each. A changed table overwrites the least
// recently used entry in stream order, after every kernel that read it on that stream.
// During capture the table goes to ctx.workspace instead (torch's allocator keeps memory
// taken during capture for the graph's lifetime), and the cache is neither read nor written.
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>

#include "common.cuh"

namespace fusedopt::cuda {

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("fusedopt CUDA backend: ") + what + ": " +
                             cudaGetErrorString(err));
  }
}

namespace {

inline constexpr int kSliceBytes = 30 * 1024;  // under the 32764-byte argument limit
inline constexpr int kCachePerStream = 8;

struct Slice {
  alignas(16) unsigned char bytes[kSliceBytes];
};

// dst[0..nbytes) = slice.bytes[0..nbytes), 16 bytes per thread (nbytes is a multiple of 16).
__global__ void __launch_bounds__(kThreads)
    write_table_kernel(const __grid_constant__ Slice slice, uint4* dst, int nvec) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < nvec) dst[i] = reinterpret_cast<const uint4*>(slice.bytes)[i];
}

void write_table(const unsigned char* host, size_t bytes, void* dst, cudaStream_t stream) {
  static Slice slice;  // 30 KB: not on the stack; guarded by the caller's lock
  for (size_t done = 0; done < bytes; done += kSliceBytes) {
    const size_t n = std::min(bytes - done, static_cast<size_t>(kSliceBytes));
    std::memcpy(slice.bytes, host + done, n);
    const int nvec = static_cast<int>(n / 16);
    launch_kernel(write_table_kernel, (nvec + kThreads - 1) / kThreads, kThreads, stream, slice,
                  reinterpret_cast<uint4*>(static_cast<unsigned char*>(dst) + done), nvec);
    check(cudaGetLastError(), "writing the device table");
  }
}

struct CacheEntry {
  int device = -1;
  cudaStream_t stream = nullptr;
  std::vector<unsigned char> content;
  void* memory = nullptr;
  size_t capacity = 0;
  uint64_t last_use = 0;
};

std::mutex g_lock;
// Never freed: entries live until the process exits (freeing at exit races the driver's
// own teardown).
std::vector<CacheEntry>* g_cache = new std::vector<CacheEntry>();
uint64_t g_clock = 0;

void* cached_upload(const std::vector<unsigned char>& blob, cudaStream_t stream) {
  int device = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  const std::lock_guard<std::mutex> lock(g_lock);
  CacheEntry* victim = nullptr;
  int same_stream = 0;
  for (CacheEntry& e : *g_cache) {
    if (e.device != device || e.stream != stream) continue;
    if (e.content == blob) {
      e.last_use = ++g_clock;
      return e.memory;
    }
    ++same_stream;
    if (victim == nullptr || e.last_use < victim->last_use) victim = &e;
  }
  if (same_stream < kCachePerStream) {
    g_cache->push_back(CacheEntry{device, stream});
    victim = &g_cache->back();
  }
  if (victim->capacity < blob.size()) {
    if (victim->memory) check(cudaFreeAsync(victim->memory, stream), "cudaFreeAsync");
    victim->capacity = std::max(blob.size(), 2 * victim->capacity);
    check(cudaMallocAsync(&victim->memory, victim->capacity, stream), "cudaMallocAsync");
  }
  write_table(blob.data(), blob.size(), victim->memory, stream);
  victim->content = blob;
  victim->last_use = ++g_clock;
  return victim->memory;
}

__global__ void __launch_bounds__(kThreads)
    increment_steps_kernel(const Row* rows, int n, const float* found_inf, int skip_if_zero) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n || skip_step(found_inf)) return;
  if (skip_if_zero >= 0 && rows[i].hyper[skip_if_zero] == 0.0) return;
  float* step = rows[i].step;
  if (step) *step += 1.0f;
}

size_t round16(size_t x) { return (x + 15) / 16 * 16; }

}  // namespace

TableBuilder::TableBuilder(int64_t num_tensors, const int64_t* numels) {
  if (num_tensors < 0 || num_tensors > (int64_t{1} << 30)) {
    throw std::invalid_argument("fusedopt CUDA backend: unsupported tensor count " +
                                std::to_string(num_tensors));
  }
  n_ = static_cast<int>(num_tensors);
  rows_offset_ = round16(sizeof(int64_t) * (n_ + 1));
  blob_.assign(rows_offset_ + sizeof(Row) * n_, 0);
  total_chunks_ =
      mt::build_chunk_begin(numels, n_, reinterpret_cast<int64_t*>(blob_.data()));
  for (int i = 0; i < n_; ++i) row(i).numel = numels[i];
}

Table TableBuilder::upload(const ExecContext& ctx) {
  const cudaStream_t stream = stream_of(ctx);
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  check(cudaStreamIsCapturing(stream, &capture), "cudaStreamIsCapturing");
  void* memory = nullptr;
  if (capture == cudaStreamCaptureStatusNone) {
    memory = cached_upload(blob_, stream);
  } else {
    memory = ctx.workspace.get(blob_.size());
    const std::lock_guard<std::mutex> lock(g_lock);  // write_table's static slice
    write_table(blob_.data(), blob_.size(), memory, stream);
  }
  auto* base = static_cast<unsigned char*>(memory);
  return Table{reinterpret_cast<const int64_t*>(base),
               reinterpret_cast<const Row*>(base + rows_offset_), n_};
}

void increment_steps(const Table& table, const float* found_inf, cudaStream_t stream,
                     int skip_if_zero) {
  if (table.n == 0) return;
  launch_kernel(increment_steps_kernel, (table.n + kThreads - 1) / kThreads, kThreads, stream,
                table.rows, table.n, found_inf, skip_if_zero);
  check(cudaGetLastError(), "launching increment_steps");
}

dim3 chunk_grid(int64_t total_chunks) {
  if (total_chunks > 0x7fffffff) {
    throw std::invalid_argument("fusedopt CUDA backend: more than 2^31 - 1 chunks of " +
                                std::to_string(mt::kChunkElems) + " elements in one call");
  }
  return dim3(static_cast<unsigned>(total_chunks));
}

}  // namespace fusedopt::cuda
