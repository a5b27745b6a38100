// Multi-tensor device kernels: one launch per (op, dtype) group. CUDA block c finds its tensor by binary
// search over the table's first-chunk column, then its threads walk Philox blocks
// [c' * CHUNK_BLOCKS, (c' + 1) * CHUNK_BLOCKS) of that tensor (c' = c - first chunk), one whole block each.
#include <cuda_runtime.h>

#include <cstdio>
#include <cstring>

#include "zo_block.cuh"
#include "zo_launch.h"

namespace zo {
namespace {

thread_local char g_error[512];

const char* fail(const char* what, cudaError_t e) {
  std::snprintf(g_error, sizeof(g_error), "%s: %s (%s)", what, cudaGetErrorString(e), cudaGetErrorName(e));
  return g_error;
}

__device__ __forceinline__ TensorDesc load_desc(const int64_t* __restrict__ row) {
  TensorDesc t;
  t.src = reinterpret_cast<const void*>(row[COL_PTR]);
  t.dst = reinterpret_cast<void*>(row[COL_OUT]);
  t.numel = row[COL_NUMEL];
  t.key = (uint64_t)row[COL_KEY];
  t.offset = (uint64_t)row[COL_OFFSET];
  const uint64_t lr_wd = (uint64_t)row[COL_LR_WD];
  t.lr = __uint_as_float((uint32_t)lr_wd);
  t.wd = __uint_as_float((uint32_t)(lr_wd >> 32));
  return t;
}

template <int OP, int DT, int DIST, bool STOCH>
__global__ void __launch_bounds__(THREADS) zo_kernel(const int64_t* __restrict__ table, int n_tensors,
                                                     OpParams p) {
  const int64_t chunk = blockIdx.x;
  int lo = 0, hi = n_tensors - 1;  // last tensor whose first chunk <= this chunk
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (table[(int64_t)mid * TABLE_COLS + COL_CHUNK0] <= chunk)
      lo = mid;
    else
      hi = mid - 1;
  }
  const int64_t* row = table + (int64_t)lo * TABLE_COLS;
  const TensorDesc t = load_desc(row);
  const int64_t n_blocks = philox_blocks(t.offset, t.numel);
  const int64_t first = (chunk - row[COL_CHUNK0]) * CHUNK_BLOCKS;
  const int64_t last = first + CHUNK_BLOCKS < n_blocks ? first + CHUNK_BLOCKS : n_blocks;
  const uint64_t block0 = t.offset >> 2;
  for (int64_t b = first + threadIdx.x; b < last; b += THREADS)
    process_block<OP, DT, DIST, STOCH>(t, p, block0 + (uint64_t)b);
}

class DeviceGuard {  // this runtime's current device is per thread: set it, and put it back
 public:
  explicit DeviceGuard(int device) {
    if (cudaGetDevice(&prev_) != cudaSuccess) prev_ = -1;
    if (prev_ != device) err_ = cudaSetDevice(device);
  }
  ~DeviceGuard() {
    if (prev_ >= 0) cudaSetDevice(prev_);
  }
  cudaError_t error() const { return err_; }

 private:
  int prev_ = -1;
  cudaError_t err_ = cudaSuccess;
};

}  // namespace

int device_count(const char** err) {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    *err = fail("cudaGetDeviceCount", e);
    cudaGetLastError();
    return 0;
  }
  *err = nullptr;
  return n;
}

const char* probe_device(int device) {
  DeviceGuard guard(device);
  if (guard.error() != cudaSuccess) return fail("cudaSetDevice", guard.error());
  cudaFuncAttributes attr;
  const cudaError_t e = cudaFuncGetAttributes(&attr, zo_kernel<PERTURB, BF16, GAUSSIAN, true>);
  if (e != cudaSuccess) {
    cudaGetLastError();
    return fail("loading the zokernels CUDA kernels", e);
  }
  return nullptr;
}

const char* launch(const LaunchArgs& a) {
  if (a.n_chunks <= 0 || a.n_tensors <= 0) return nullptr;
  if (a.n_chunks > 0x7FFFFFFFLL) {
    std::snprintf(g_error, sizeof(g_error), "too many elements in one launch (%lld chunks)", (long long)a.n_chunks);
    return g_error;
  }
  DeviceGuard guard(a.device);
  if (guard.error() != cudaSuccess) return fail("cudaSetDevice", guard.error());
  OpParams p;
  p.seed = a.seed;
  p.scale = a.scale;
  p.query = a.query;
  p.stream = a.stream;
  p.sr_stream = a.sr_stream;
  p.coeffs = a.coeffs;
  p.n_coeffs = a.n_coeffs;
  p.restore = a.restore;
  p.restore_scale = a.restore_scale;
  p.restore_query = a.restore_query;
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(a.cuda_stream);
  const dim3 grid((unsigned)a.n_chunks);
  const bool known = dispatch(a.op, a.dtype, a.dist, a.stochastic != 0, [&](auto op, auto dt, auto dist, auto st) {
    zo_kernel<decltype(op)::value, decltype(dt)::value, decltype(dist)::value, decltype(st)::value>
        <<<grid, THREADS, 0, stream>>>(a.table, a.n_tensors, p);
  });
  if (!known) {
    std::snprintf(g_error, sizeof(g_error), "no kernel for op %d, dtype %d, dist %d, stochastic %d", a.op,
                  a.dtype, a.dist, a.stochastic);
    return g_error;
  }
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return fail("zokernels kernel launch", e);
  return nullptr;
}

}  // namespace zo
