// QuZO element math on quantized weights (zokernels/backends/reference/quant.py, reproduced bitwise), shared
// by the host entry points and the device kernel. Formats: int8 [N, K]; int4 uint8 [N, Kp/2] (element 2i of a
// row in the low nibble of byte i, padding nibbles k >= K are 0); fp8 e4m3fn bits [N, K]. Element (n, k) has
// contract index j = n * K + k and scale s = scale[n, 0] (int8, fp8) or scale[n, k / group] (int4).
//
// Work items: one Philox block = 4 consecutive elements j (probe; int8/fp8 quantize and update), sharing its
// Philox calls and Box-Muller pairs, or one int4 storage byte (int4 quantize and update: a thread owns both
// nibbles, so no two threads write one byte; each nibble draws its own Philox lane).
#pragma once

#include <stdint.h>

#include "zo_block.cuh"

namespace zo {

enum QuantOp : int { Q_QUANTIZE = 0, Q_PROBE = 1, Q_UPDATE = 2 };
enum QuantFmt : int { QF_INT8 = 0, QF_INT4 = 1, QF_FP8 = 2 };
// probe output: float (dequantized), grid values, or int4 packed like the storage (uint8 [N, Kp/2], padding 0)
enum QuantOut : int { QO_F32 = 0, QO_BF16 = 1, QO_F16 = 2, QO_GRID = 3, QO_PACKED = 4 };
constexpr uint32_t STREAM_UPDATE_SR = 3, STREAM_QUANT_SR = 4, STREAM_QUZO_PROBE = 5, STREAM_QUZO_UPDATE = 6;
constexpr float SR_CLAMP = 1073741824.0f;  // 2^30
constexpr float E4M3_MAX = 448.0f;
constexpr uint32_t E4M3_MAX_BITS = 0x7E;

struct QuantParams {
  int op, fmt, dist, out_kind, in_dtype;  // in_dtype: quantize's w (F32, BF16, F16)
  int stochastic;                         // quantize: SR (else nearest)
  int paper;                              // update form
  int64_t n, k, kb;                       // logical [n, k]; int4: storage bytes per row
  int64_t scale_cols, group;              // scale [n, scale_cols]; int4 group size (else 1)
  const void* w;                          // quantize input
  void* q;                                // storage (quantize: output; update: in place)
  const float* scale;
  void* out;                              // probe output [n, k]
  unsigned long long* saturated;          // int64 [1] counter
  uint64_t seed, key;
  uint32_t query;
  float eps, lr;
  int sign;
  const float* coeffs;
  int n_coeffs;
};

ZO_HD float f_div(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
ZO_HD float f_floor(float x) {
#ifdef __CUDA_ARCH__
  return floorf(x);
#else
  return std::floor(x);
#endif
}
ZO_HD float f_rint(float x) {  // round half to even (torch.round)
#ifdef __CUDA_ARCH__
  return rintf(x);
#else
  return std::nearbyint(x);
#endif
}
ZO_HD float f_abs(float x) { return u2f(f2u(x) & 0x7FFFFFFFu); }
// torch.clamp: NaN stays NaN
ZO_HD float f_clamp(float x, float lo, float hi) { return x < lo ? lo : (x > hi ? hi : x); }

// ------------------------------------------------------------------ random numbers of a Philox block
// z lanes of (query, STREAM_Z) at Philox block `block`; a Gaussian pair without a live lane is not computed.
ZO_HD void z_block(const QuantParams& p, uint32_t query, uint64_t block, const bool live[4], float z[4]) {
  const U4 r = contract_block(p.seed, p.key, query, STREAM_Z, block);
  if (p.dist == GAUSSIAN)
    z_live_lanes<GAUSSIAN, true>(r, live, z);
  else
    z_live_lanes<RADEMACHER, true>(r, live, z);
}

ZO_HD void v_block(const QuantParams& p, uint32_t query, uint32_t stream, uint64_t block, float v[4]) {
  v_lanes(contract_block(p.seed, p.key, query, stream, block), v);
}

// ------------------------------------------------------------------ grids
// SRI(x, v) = floor(x) + [v < x - floor(x)] (float32 ops, then int32)
ZO_HD int32_t sr_int(float x, float v) {
  const float lo = f_floor(x);
  return (int32_t)f_add(lo, v < f_sub(x, lo) ? 1.0f : 0.0f);
}

ZO_HD float e4m3_value(uint32_t b) {  // bits 0..0xFF -> float32 (0x7F / 0xFF: NaN)
  const uint32_t sign = (b & 0x80u) << 24, e = (b >> 3) & 0xFu, m = b & 7u;
  if (e == 0xFu && m == 7u) return u2f(sign | 0x7FC00000u);
  if (e == 0) return u2f(sign | f2u(f_mul((float)m, 0.001953125f)));  // m * 2^-9, exact
  return u2f(sign | ((e + 120u) << 23) | (m << 20));
}

// Round to nearest even onto e4m3fn, as torch's cast (c10 fp8e4m3fn_from_fp32_value): |x| >= 480 and NaN -> 0x7F.
ZO_HD uint32_t e4m3_rn(float f) {
  uint32_t bits = f2u(f);
  const uint32_t sign = bits & 0x80000000u;
  bits ^= sign;
  uint32_t r;
  if (bits >= (1087u << 20)) {
    r = 0x7Fu;
  } else if (bits < (121u << 23)) {  // below 2^-6: subnormal, rounded by a float add of 2^14
    r = f2u(f_add(u2f(bits), u2f(141u << 23))) - (141u << 23);
  } else {
    const uint32_t odd = (bits >> 20) & 1u;
    bits += (uint32_t)(7 - 127) * (1u << 23) + 0x7FFFFu + odd;
    r = bits >> 20;
  }
  return (r & 0xFFu) | (sign >> 24);
}

// SR8 (quant.reference.sr_to_e4m3): lo = largest e4m3 <= min(|x|, 448), hi = next (<= 448); hi iff
// v (hi - lo) < |x| - lo; sign of x kept; NaN -> NaN.
ZO_HD uint32_t e4m3_sr(float x, float v) {
  const uint32_t sign8 = (f2u(x) >> 24) & 0x80u;
  if (is_nan(x)) return 0x7Fu | sign8;
  const float a = f_abs(x);
  const float ac = a < E4M3_MAX ? a : E4M3_MAX;
  const uint32_t r = e4m3_rn(ac);
  const uint32_t lo_bits = e4m3_value(r) > ac ? r - 1u : r;
  const uint32_t hi_bits = lo_bits + 1u < E4M3_MAX_BITS ? lo_bits + 1u : E4M3_MAX_BITS;
  const float lo = e4m3_value(lo_bits), hi = e4m3_value(hi_bits);
  const bool up = f_mul(v, f_sub(hi, lo)) < f_sub(a, lo) && hi_bits > lo_bits;
  return (up ? hi_bits : lo_bits) | sign8;
}

// ------------------------------------------------------------------ storage access
ZO_HD float scale_of(const QuantParams& p, int64_t n, int64_t k) {
  return p.scale[n * p.scale_cols + (p.fmt == QF_INT4 ? k / p.group : 0)];
}

// Grid value of element (n, k): int32 in *iv (int formats) or e4m3 bits in *bits (fp8).
ZO_HD void load_q(const QuantParams& p, int64_t n, int64_t k, int32_t* iv, uint32_t* bits) {
  if (p.fmt == QF_INT8) {
    *iv = static_cast<const int8_t*>(p.q)[n * p.k + k];
  } else if (p.fmt == QF_INT4) {
    const uint32_t byte = static_cast<const uint8_t*>(p.q)[n * p.kb + (k >> 1)];
    const int32_t nib = (int32_t)((k & 1) ? byte >> 4 : byte & 0xFu);
    *iv = nib >= 8 ? nib - 16 : nib;
  } else {
    *bits = static_cast<const uint8_t*>(p.q)[n * p.k + k];
  }
}

ZO_HD float load_w(const QuantParams& p, int64_t i) {
  if (p.in_dtype == BF16) return bf16_to_f32(static_cast<const uint16_t*>(p.w)[i]);
  if (p.in_dtype == F16) return f16_to_f32(static_cast<const uint16_t*>(p.w)[i]);
  return static_cast<const float*>(p.w)[i];
}

ZO_HD int32_t clamp_int(int32_t x, int32_t qmax) { return x < -qmax ? -qmax : (x > qmax ? qmax : x); }
ZO_HD int32_t qmax_int(const QuantParams& p) { return p.fmt == QF_INT4 ? 7 : 127; }

// ------------------------------------------------------------------ the three ops on the live lanes of a Philox block
// Lane l of block b is element j = 4 b + l = n * K + k (a block may straddle rows).
struct LaneCoords {
  int64_t n[4], k[4];
};

ZO_HD LaneCoords lane_coords(const QuantParams& p, uint64_t block) {
  LaneCoords c;
  const int64_t j0 = (int64_t)(block * 4u);
  int64_t n = j0 / p.k, k = j0 - n * p.k;
ZO_UNROLL
  for (int l = 0; l < 4; ++l) {
    c.n[l] = n;
    c.k[l] = k;
    if (++k == p.k) k = 0, ++n;
  }
  return c;
}

// Grid values of the live lanes; int8 / fp8 storage index = j, so a whole aligned block is one 4-byte load.
ZO_HD void load_q_lanes(const QuantParams& p, uint64_t block, const bool live[4], const LaneCoords& c, int32_t iv[4],
                        uint32_t bits[4]) {
  if (p.fmt == QF_INT4) {
ZO_UNROLL
    for (int l = 0; l < 4; ++l) {
      iv[l] = 0, bits[l] = 0;
      if (live[l]) load_q(p, c.n[l], c.k[l], &iv[l], &bits[l]);
    }
    return;
  }
  uint8_t b[4];
  load_lanes<uint8_t>(p.q, (int64_t)(block * 4u), live, b);
ZO_UNROLL
  for (int l = 0; l < 4; ++l) {
    iv[l] = (int32_t)(int8_t)b[l];
    bits[l] = b[l];
  }
}

// Quantized values of the live lanes: int value (int formats) or e4m3 bits (fp8).
ZO_HD void quantize_lanes(const QuantParams& p, uint64_t block, const bool live[4], const LaneCoords& c,
                          uint32_t val[4]) {
  float v[4] = {0.f, 0.f, 0.f, 0.f};
  if (p.stochastic) v_block(p, 0, STREAM_QUANT_SR, block, v);
ZO_UNROLL
  for (int l = 0; l < 4; ++l) {
    if (!live[l]) continue;
    const float x = f_div(load_w(p, c.n[l] * p.k + c.k[l]), scale_of(p, c.n[l], c.k[l]));
    if (p.fmt == QF_FP8) {
      val[l] = p.stochastic ? e4m3_sr(x, v[l]) : e4m3_rn(f_clamp(x, -E4M3_MAX, E4M3_MAX));
    } else {
      const float qm = (float)qmax_int(p), xc = f_clamp(x, -qm, qm);
      val[l] = (uint32_t)(p.stochastic ? sr_int(xc, v[l]) : (int32_t)f_rint(xc));
    }
  }
}

// Probe weights of the live lanes: grid values gv (int8 two's complement or e4m3 bits) and dequantized
// values wv; returns how many saturated.
ZO_HD int probe_values(const QuantParams& p, uint64_t block, const bool live[4], const LaneCoords& c, uint8_t gv[4],
                       float wv[4]) {
  float z[4], v[4];
ZO_UNROLL
  for (int l = 0; l < 4; ++l) gv[l] = 0, wv[l] = 0.f;
  int32_t ivs[4];
  uint32_t bitss[4];
  load_q_lanes(p, block, live, c, ivs, bitss);
  z_block(p, p.query, block, live, z);
  v_block(p, p.query, STREAM_QUZO_PROBE, block, v);
  int hits = 0;
ZO_UNROLL
  for (int l = 0; l < 4; ++l) {
    if (!live[l]) continue;
    const int64_t n = c.n[l], k = c.k[l];
    const float s = scale_of(p, n, k);
    const float d = f_div(f_mul(z[l], p.eps), s);
    const int32_t iv = ivs[l];
    const uint32_t bits = bitss[l];
    float val;  // the probe weight's grid value as float32
    uint8_t grid;
    if (p.fmt == QF_FP8) {
      const float x = f_add(e4m3_value(bits), f_mul(d, (float)p.sign));
      const uint32_t pb = e4m3_sr(x, v[l]);
      hits += f_abs(x) > E4M3_MAX;
      val = e4m3_value(pb);
      grid = (uint8_t)pb;
    } else {
      const int32_t raw = iv + sr_int(f_clamp(d, -SR_CLAMP, SR_CLAMP), v[l]) * p.sign;
      const int32_t pv = clamp_int(raw, qmax_int(p));
      hits += pv != raw;
      val = (float)pv;
      grid = (uint8_t)(int8_t)pv;
    }
    gv[l] = grid;
    wv[l] = f_mul(val, s);
  }
  return hits;
}

// Probe weights of the live lanes, written to out (index j); returns how many saturated.
ZO_HD int probe_lanes(const QuantParams& p, uint64_t block, const bool live[4], const LaneCoords& c) {
  uint8_t gv[4];
  float wv[4];
  const int hits = probe_values(p, block, live, c, gv, wv);
  const int64_t i0 = (int64_t)(block * 4u);  // output index of lane 0: j
  if (p.out_kind == QO_GRID) {
    store_lanes<uint8_t>(p.out, i0, live, gv);
  } else if (p.out_kind == QO_F32) {
    store_lanes<float>(p.out, i0, live, wv);
  } else {
    uint16_t h[4];
ZO_UNROLL
    for (int l = 0; l < 4; ++l) h[l] = p.out_kind == QO_BF16 ? f32_to_bf16_rn(wv[l]) : f32_to_f16_rn(wv[l]);
    store_lanes<uint16_t>(p.out, i0, live, h);
  }
  return hits;
}

// Updated grid values of the live lanes (int value or e4m3 bits); returns how many saturated.
ZO_HD int update_lanes(const QuantParams& p, uint64_t block, const bool live[4], const LaneCoords& c,
                       uint32_t val[4]) {
  float s[4], acc[4] = {0.f, 0.f, 0.f, 0.f}, z[4], v[4];
ZO_UNROLL
  for (int l = 0; l < 4; ++l) s[l] = live[l] ? scale_of(p, c.n[l], c.k[l]) : 1.f;
  for (int qi = 0; qi < p.n_coeffs; ++qi) {
    const float cq = p.coeffs[qi];
    z_block(p, (uint32_t)qi, block, live, z);
    if (p.paper) v_block(p, (uint32_t)qi, STREAM_QUZO_UPDATE, block, v);
ZO_UNROLL
    for (int l = 0; l < 4; ++l) {
      float term;
      if (!p.paper) {
        term = f_mul(z[l], cq);
      } else {
        const float d = f_div(f_mul(z[l], p.eps), s[l]);
        const float d2 =
            p.fmt == QF_FP8 ? e4m3_value(e4m3_sr(d, v[l])) : (float)sr_int(f_clamp(d, -SR_CLAMP, SR_CLAMP), v[l]);
        term = f_mul(d2, cq);
      }
      acc[l] = qi ? f_add(acc[l], term) : term;
    }
  }
  v_block(p, 0, STREAM_UPDATE_SR, block, v);
  int32_t ivs[4];
  uint32_t bitss[4];
  load_q_lanes(p, block, live, c, ivs, bitss);
  int hits = 0;
ZO_UNROLL
  for (int l = 0; l < 4; ++l) {
    if (!live[l]) continue;
    const float x = p.n_coeffs == 0 ? 0.f : f_div(f_mul(acc[l], p.lr), p.paper ? p.eps : s[l]);
    const int32_t iv = ivs[l];
    const uint32_t bits = bitss[l];
    if (p.fmt == QF_FP8) {
      const float y = f_sub(e4m3_value(bits), x);
      hits += f_abs(y) > E4M3_MAX;
      val[l] = e4m3_sr(y, v[l]);
    } else {
      const int32_t raw = iv - sr_int(f_clamp(x, -SR_CLAMP, SR_CLAMP), v[l]);
      const int32_t nv = clamp_int(raw, qmax_int(p));
      hits += nv != raw;
      val[l] = (uint32_t)nv;
    }
  }
  return hits;
}

// Work items: Philox blocks of the logical weight (4 elements each), except for the ops that write int4
// storage (quantize, update, probe into packed int4), where an item is one storage byte (both nibbles owned by
// one thread, padding nibbles written 0).
ZO_HD bool byte_items(const QuantParams& p) {
  return p.fmt == QF_INT4 && (p.op != Q_PROBE || p.out_kind == QO_PACKED);
}
ZO_HD int64_t quant_items(const QuantParams& p) { return byte_items(p) ? p.n * p.kb : (p.n * p.k + 3) / 4; }

// Work item i; returns the number of saturated elements.
ZO_HD int quant_item(const QuantParams& p, int64_t i) {
  if (byte_items(p)) {
    const int64_t n = i / p.kb, k0 = (i - n * p.kb) * 2;
    uint32_t nib[2] = {0u, 0u};
    int hits = 0;
    for (int h = 0; h < 2 && k0 + h < p.k; ++h) {  // one live lane per nibble
      const uint64_t j = (uint64_t)(n * p.k + k0 + h);
      const int lane = (int)(j & 3u);
      bool live[4] = {lane == 0, lane == 1, lane == 2, lane == 3};
      LaneCoords c;
      c.n[lane] = n;
      c.k[lane] = k0 + h;
      uint32_t val[4] = {0u, 0u, 0u, 0u};
      if (p.op == Q_QUANTIZE) {
        quantize_lanes(p, j >> 2, live, c, val);
      } else if (p.op == Q_UPDATE) {
        hits += update_lanes(p, j >> 2, live, c, val);
      } else {
        uint8_t gv[4];
        float wv[4];
        hits += probe_values(p, j >> 2, live, c, gv, wv);
        val[lane] = gv[lane];
      }
      nib[h] = val[lane] & 0xFu;
    }
    static_cast<uint8_t*>(p.op == Q_PROBE ? p.out : p.q)[i] = (uint8_t)(nib[0] | (nib[1] << 4));
    return hits;
  }
  const uint64_t block = (uint64_t)i;
  const int64_t numel = p.n * p.k;
  bool live[4];
ZO_UNROLL
  for (int l = 0; l < 4; ++l) live[l] = i * 4 + l < numel;
  const LaneCoords c = lane_coords(p, block);
  if (p.op == Q_PROBE) return probe_lanes(p, block, live, c);
  uint32_t val[4] = {0u, 0u, 0u, 0u};
  const int hits = p.op == Q_QUANTIZE ? (quantize_lanes(p, block, live, c, val), 0) : update_lanes(p, block, live, c, val);
  uint8_t b[4];  // int8 two's complement or e4m3 bits; storage index = j
ZO_UNROLL
  for (int l = 0; l < 4; ++l) b[l] = (uint8_t)val[l];
  store_lanes<uint8_t>(p.q, i * 4, live, b);
  return hits;
}

}  // namespace zo
