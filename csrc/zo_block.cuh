// One Philox block (4 consecutive global elements) of every op, shared by the host entry points and the
// device kernels so that the CPU tests exercise the very code the GPU runs.
#pragma once

#include <stdint.h>

#include <type_traits>
#include <utility>

#include "zo_math.cuh"

namespace zo {

enum Op : int { FILL_Z = 0, FILL_U = 1, SROUND = 2, PERTURB = 3, UPDATE = 4 };

// Row layout of the device tensor table (int64 [T, TABLE_COLS]), built by zokernels/backends/cuda.
enum TableCol : int { COL_PTR = 0, COL_OUT, COL_NUMEL, COL_KEY, COL_OFFSET, COL_CHUNK0, COL_LR_WD, TABLE_COLS = 8 };

struct TensorDesc {
  const void* src;   // input (theta or x); may equal dst
  void* dst;         // output
  int64_t numel;
  uint64_t key;      // contract key of the tensor
  uint64_t offset;   // global index of element 0
  float lr, wd;      // zo_update_ only
};

struct OpParams {
  uint64_t seed;
  float scale;             // perturb: theta + scale * z
  uint32_t query;          // z query (perturb, fills)
  uint32_t stream;         // fills and stochastic_round: the stream drawn
  uint32_t sr_stream;      // perturb / update: stream of the rounding uniforms
  const float* coeffs;     // update: coeffs[q], q < n_coeffs
  int n_coeffs;
  int restore;             // update: theta' = theta + restore_scale * z_{restore_query}
  float restore_scale;
  uint32_t restore_query;
};

// A whole live Philox block at a 4-element-aligned address is accessed as one vector instead of four.
template <class T>
ZO_HD bool aligned4(const void* ptr, int64_t base) {
  return ((uintptr_t)(static_cast<const T*>(ptr) + base) & (4 * sizeof(T) - 1)) == 0;
}

template <class T>
ZO_HD void load_lanes(const void* ptr, int64_t base, const bool live[4], T v[4]) {
  const T* p = static_cast<const T*>(ptr);
  if (live[0] && live[1] && live[2] && live[3] && aligned4<T>(ptr, base)) {
    load4(p + base, v);
    return;
  }
ZO_UNROLL
  for (int l = 0; l < 4; ++l) v[l] = live[l] ? p[base + l] : T(0);
}

template <class T>
ZO_HD void store_lanes(void* ptr, int64_t base, const bool live[4], const T v[4]) {
  T* p = static_cast<T*>(ptr);
  if (live[0] && live[1] && live[2] && live[3] && aligned4<T>(ptr, base)) {  // masked lanes: never stored
    store4(p + base, v);
    return;
  }
ZO_UNROLL
  for (int l = 0; l < 4; ++l)
    if (live[l]) p[base + l] = v[l];
}

template <int DT>
ZO_HD void load_f32_lanes(const void* ptr, int64_t base, const bool live[4], float x[4]) {
  if (DT == F32) {
    load_lanes<float>(ptr, base, live, x);
    return;
  }
  uint16_t h[4];
  load_lanes<uint16_t>(ptr, base, live, h);
ZO_UNROLL
  for (int l = 0; l < 4; ++l) x[l] = DT == BF16 ? bf16_to_f32(h[l]) : f16_to_f32(h[l]);
}

// z of the lanes of Philox block r; SPARSE: a Gaussian pair whose lanes are both dead is not computed
// (masked ops; the live lanes' values are those of the full computation).
template <int DIST, bool SPARSE>
ZO_HD void z_live_lanes(const U4& r, const bool live[4], float z[4]) {
  if (!SPARSE || DIST != GAUSSIAN) {
    z_lanes(r, DIST, z);
    return;
  }
  z[0] = z[1] = z[2] = z[3] = 0.f;
  if (live[0] || live[1]) box_muller(r.x, r.y, &z[0], &z[1]);
  if (live[2] || live[3]) box_muller(r.z, r.w, &z[2], &z[3]);
}

// Lanes `live` of global Philox block `block` of tensor t (base: local index of lane 0, may be < 0): dense ops
// pass the lanes inside the tensor, masked ops the masked lanes. Dead lanes are neither loaded nor stored.
template <int OP, int DT, int DIST, bool STOCH, bool SPARSE = false>
ZO_HD void process_lanes(const TensorDesc& t, const OpParams& p, uint64_t block, int64_t base, const bool live[4]) {
  if (OP == FILL_Z || OP == FILL_U) {
    float val[4];
    U4 r = contract_block(p.seed, t.key, p.query, p.stream, block);
    if (OP == FILL_Z)
      z_lanes(r, DIST, val);
    else
      v_lanes(r, val);
    store_lanes<float>(t.dst, base, live, val);
    return;
  }

  float x[4];
  load_f32_lanes<OP == SROUND ? (int)F32 : DT>(t.src, base, live, x);

  if (OP == PERTURB) {
    float z[4];
    z_live_lanes<DIST, SPARSE>(contract_block(p.seed, t.key, p.query, STREAM_Z, block), live, z);
ZO_UNROLL
    for (int l = 0; l < 4; ++l) x[l] = perturbed(x[l], z[l], p.scale);
  } else if (OP == UPDATE) {
    float z[4], acc[4] = {0.f, 0.f, 0.f, 0.f};
    if (p.restore) {
      z_live_lanes<DIST, SPARSE>(contract_block(p.seed, t.key, p.restore_query, STREAM_Z, block), live, z);
ZO_UNROLL
      for (int l = 0; l < 4; ++l) x[l] = perturbed(x[l], z[l], p.restore_scale);
    }
    for (int q = 0; q < p.n_coeffs; ++q) {
      const float c = p.coeffs[q];
      z_live_lanes<DIST, SPARSE>(contract_block(p.seed, t.key, (uint32_t)q, STREAM_Z, block), live, z);
ZO_UNROLL
      for (int l = 0; l < 4; ++l) acc[l] = q ? f_add(acc[l], f_mul(z[l], c)) : f_mul(z[l], c);
    }
ZO_UNROLL
    for (int l = 0; l < 4; ++l) x[l] = updated(x[l], acc[l], t.lr, t.wd);
  }

  if (DT == F32) {
    store_lanes<float>(t.dst, base, live, x);
    return;
  }
  uint16_t h[4];
  if (STOCH || OP == SROUND) {
    // Rounding uniforms: stochastic_round draws p.stream at p.query; perturb draws sr_stream at the
    // probe's query; the update draws sr_stream at query 0.
    const uint32_t q = OP == UPDATE ? 0u : p.query;
    const uint32_t s = OP == SROUND ? p.stream : p.sr_stream;
    float v[4];
    v_lanes(contract_block(p.seed, t.key, q, s, block), v);
ZO_UNROLL
    for (int l = 0; l < 4; ++l) h[l] = stochastic_round<DT>(x[l], v[l]);
  } else {
ZO_UNROLL
    for (int l = 0; l < 4; ++l) h[l] = round_nearest<DT>(x[l]);
  }
  store_lanes<uint16_t>(t.dst, base, live, h);
}

// Process global Philox block `block` of tensor t: elements j = 4 block + lane with offset <= j < offset + numel.
template <int OP, int DT, int DIST, bool STOCH>
ZO_HD void process_block(const TensorDesc& t, const OpParams& p, uint64_t block) {
  const int64_t base = (int64_t)(block * 4u - t.offset);  // local index of lane 0 (may be < 0)
  bool live[4];
ZO_UNROLL
  for (int l = 0; l < 4; ++l) live[l] = base + l >= 0 && base + l < t.numel;
  process_lanes<OP, DT, DIST, STOCH>(t, p, block, base, live);
}

// Number of Philox blocks covering elements [offset, offset + numel), numel > 0.
ZO_HD int64_t philox_blocks(uint64_t offset, int64_t numel) {
  return (int64_t)(((offset + (uint64_t)numel - 1u) >> 2) - (offset >> 2) + 1u);
}

// What CUDA block `chunk` of a launch works on: tensor t (the last row whose first chunk <= chunk, found by
// binary search over COL_CHUNK0) and its local Philox blocks [first, last), global block = block0 + local.
struct ChunkWork {
  TensorDesc t;
  uint64_t block0;
  int64_t first, last;
};

ZO_HD ChunkWork chunk_work(const int64_t* table, int n_tensors, int64_t chunk, int chunk_blocks) {
  int lo = 0, hi = n_tensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (table[(int64_t)mid * TABLE_COLS + COL_CHUNK0] <= chunk)
      lo = mid;
    else
      hi = mid - 1;
  }
  const int64_t* row = table + (int64_t)lo * TABLE_COLS;
  ChunkWork w;
  w.t.src = reinterpret_cast<const void*>(row[COL_PTR]);
  w.t.dst = reinterpret_cast<void*>(row[COL_OUT]);
  w.t.numel = row[COL_NUMEL];
  w.t.key = (uint64_t)row[COL_KEY];
  w.t.offset = (uint64_t)row[COL_OFFSET];
  const uint64_t lr_wd = (uint64_t)row[COL_LR_WD];
  w.t.lr = u2f((uint32_t)lr_wd);
  w.t.wd = u2f((uint32_t)(lr_wd >> 32));
  const int64_t n_blocks = philox_blocks(w.t.offset, w.t.numel);
  w.block0 = w.t.offset >> 2;
  w.first = (chunk - row[COL_CHUNK0]) * chunk_blocks;
  w.last = w.first + chunk_blocks < n_blocks ? w.first + chunk_blocks : n_blocks;
  return w;
}

// Calls f(std::integral_constant<int, OP>, ..<DT>, ..<DIST>, ..<STOCH>) for the runtime values, over the
// combinations the ops use; returns false for a combination that does not exist.
template <class F>
bool dispatch(int op, int dt, int dist, bool stoch, F&& f) {
  using std::integral_constant;
  auto with_dist = [&](auto op_c, auto dt_c, auto st_c) {
    if (dist == GAUSSIAN)
      f(op_c, dt_c, integral_constant<int, GAUSSIAN>{}, st_c);
    else
      f(op_c, dt_c, integral_constant<int, RADEMACHER>{}, st_c);
    return true;
  };
  auto with_dtype = [&](auto op_c) {
    if (dt == F32) return with_dist(op_c, integral_constant<int, F32>{}, std::false_type{});
    if (dt == BF16)
      return stoch ? with_dist(op_c, integral_constant<int, BF16>{}, std::true_type{})
                   : with_dist(op_c, integral_constant<int, BF16>{}, std::false_type{});
    if (dt == F16)
      return stoch ? with_dist(op_c, integral_constant<int, F16>{}, std::true_type{})
                   : with_dist(op_c, integral_constant<int, F16>{}, std::false_type{});
    return false;
  };
  switch (op) {
    case FILL_Z:
      return dt == F32 && with_dist(integral_constant<int, FILL_Z>{}, integral_constant<int, F32>{},
                                    std::false_type{});
    case FILL_U:
      if (dt != F32) return false;
      f(integral_constant<int, FILL_U>{}, integral_constant<int, F32>{}, integral_constant<int, GAUSSIAN>{},
        std::false_type{});
      return true;
    case SROUND:
      if (dt == BF16)
        f(integral_constant<int, SROUND>{}, integral_constant<int, BF16>{}, integral_constant<int, GAUSSIAN>{},
          std::true_type{});
      else if (dt == F16)
        f(integral_constant<int, SROUND>{}, integral_constant<int, F16>{}, integral_constant<int, GAUSSIAN>{},
          std::true_type{});
      else
        return false;
      return true;
    case PERTURB:
      return with_dtype(integral_constant<int, PERTURB>{});
    case UPDATE:
      return with_dtype(integral_constant<int, UPDATE>{});
    default:
      return false;
  }
}

}  // namespace zo
