// Device-side API of the extension, in plain C++ (no CUDA runtime types) so that the pybind11 module can be
// compiled by g++ without CUDA headers. Every function returns nullptr on success or a static/thread-local
// error message.
#pragma once

#include <stdint.h>

#include "zo_block.cuh"
#include "zo_masked.cuh"
#include "zo_quant.cuh"

namespace zo {

constexpr int THREADS = 256;        // threads per CUDA block
constexpr int CHUNK_BLOCKS = 2048;  // Philox blocks (8192 elements) per CUDA block
constexpr int MASK_CHUNK_ITEMS = 2048;  // masked ops: work items per CUDA block (zo_masked.cuh)
constexpr int QUANT_ITEMS_PER_THREAD = 4;  // quantized-weight ops (zo_quant.cuh)

// Number of CUDA devices visible to this extension's runtime (0 with no driver/GPU); *err set on failure.
int device_count(const char** err);

// nullptr if the kernels can run on `device` (driver new enough, a kernel image for its architecture).
const char* probe_device(int device);

struct LaunchArgs {
  int op, dtype, dist, stochastic;
  int masked;            // 1: masked op, table rows of MASK_COLS (zo_masked.cuh), n_chunks over work items
  const int64_t* table;  // device pointer: int64 [n_tensors, TABLE_COLS or MASK_COLS]
  int n_tensors;
  int64_t n_chunks;      // CUDA blocks: sum over tensors of ceil(philox_blocks / CHUNK_BLOCKS)
  uint64_t seed;
  float scale;
  uint32_t query, stream, sr_stream;
  const float* coeffs;   // device pointer, n_coeffs floats (update)
  int n_coeffs;
  int restore;
  float restore_scale;
  uint32_t restore_query;
  int device;
  uintptr_t cuda_stream;
};

inline OpParams op_params(const LaunchArgs& a) {
  OpParams p{};
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
  return p;
}

// Kernel launch on a.cuda_stream (asynchronous).
const char* launch(const LaunchArgs& a);

// Quantized-weight op (one weight) on cuda_stream (asynchronous); saturation counts added atomically.
const char* launch_quant(const QuantParams& p, int device, uintptr_t cuda_stream);

}  // namespace zo
