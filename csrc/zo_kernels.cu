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

template <int OP, int DT, int DIST, bool STOCH>
__global__ void __launch_bounds__(THREADS) zo_kernel(const int64_t* __restrict__ table, int n_tensors,
                                                     OpParams p) {
  const ChunkWork w = chunk_work(table, n_tensors, blockIdx.x, CHUNK_BLOCKS);
  for (int64_t b = w.first + threadIdx.x; b < w.last; b += THREADS)
    process_block<OP, DT, DIST, STOCH>(w.t, p, w.block0 + (uint64_t)b);
}

// Masked ops: the chunk's tensor has one mask format; its threads walk work items [first, last).
template <int OP, int DT, int DIST, bool STOCH>
__global__ void __launch_bounds__(THREADS) zo_masked_kernel(const int64_t* __restrict__ table, int n_tensors,
                                                            OpParams p) {
  const MaskWork w = mask_chunk_work(table, n_tensors, blockIdx.x, MASK_CHUNK_ITEMS);
  for (int64_t i = w.first + threadIdx.x; i < w.last; i += THREADS) process_mask_item<OP, DT, DIST, STOCH>(w.m, p, i);
}

// Quantized-weight ops: QUANT_ITEMS_PER_THREAD work items per thread, THREADS apart; the saturation count is
// summed over the warp and added with one atomic per warp.
__global__ void __launch_bounds__(THREADS) zo_quant_kernel(QuantParams p, int64_t items) {
  unsigned count = 0;
  const int64_t first = (int64_t)blockIdx.x * THREADS * QUANT_ITEMS_PER_THREAD + threadIdx.x;
  for (int r = 0; r < QUANT_ITEMS_PER_THREAD; ++r) {
    const int64_t i = first + (int64_t)r * THREADS;
    if (i < items) count += (unsigned)quant_item(p, i);
  }
  if (p.saturated) {
    count = __reduce_add_sync(0xFFFFFFFFu, count);
    if ((threadIdx.x & 31u) == 0 && count) atomicAdd(p.saturated, (unsigned long long)count);
  }
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
  const OpParams p = op_params(a);
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(a.cuda_stream);
  const dim3 grid((unsigned)a.n_chunks);
  if (a.masked && a.op != PERTURB && a.op != UPDATE) {
    std::snprintf(g_error, sizeof(g_error), "no masked kernel for op %d", a.op);
    return g_error;
  }
  const bool known = dispatch(a.op, a.dtype, a.dist, a.stochastic != 0, [&](auto op, auto dt, auto dist, auto st) {
    constexpr int OP = decltype(op)::value, DT = decltype(dt)::value, DIST = decltype(dist)::value;
    constexpr bool ST = decltype(st)::value;
    if constexpr (OP == PERTURB || OP == UPDATE) {
      if (a.masked) {
        zo_masked_kernel<OP, DT, DIST, ST><<<grid, THREADS, 0, stream>>>(a.table, a.n_tensors, p);
        return;
      }
    }
    zo_kernel<OP, DT, DIST, ST><<<grid, THREADS, 0, stream>>>(a.table, a.n_tensors, p);
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

const char* launch_quant(const QuantParams& p, int device, uintptr_t cuda_stream) {
  const int64_t items = quant_items(p);
  if (items <= 0) return nullptr;
  const int64_t per_block = (int64_t)THREADS * QUANT_ITEMS_PER_THREAD;
  const int64_t blocks = (items + per_block - 1) / per_block;
  if (blocks > 0x7FFFFFFFLL) {
    std::snprintf(g_error, sizeof(g_error), "too many elements in one weight (%lld)", (long long)items);
    return g_error;
  }
  DeviceGuard guard(device);
  if (guard.error() != cudaSuccess) return fail("cudaSetDevice", guard.error());
  zo_quant_kernel<<<(unsigned)blocks, THREADS, 0, reinterpret_cast<cudaStream_t>(cuda_stream)>>>(p, items);
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return fail("zokernels quant kernel launch", e);
  return nullptr;
}

}  // namespace zo
