// The perturbation contract's element math (zokernels/contract.py), shared by the host entry points
// (compiled by g++, tested bitwise against the reference backend on CPU) and the device kernels.
//
// Rules that make host and device agree with each other and with the reference:
//  * every float operation that could be contracted into an FMA goes through f_add/f_sub/f_mul
//    (__fadd_rn & co. on the device; host code is compiled with -ffp-contract=off);
//  * no approximate intrinsics: precise logf/sinf/cosf and a correctly rounded sqrt;
//  * 16-bit conversions are bit math (bf16 always, fp16 on the host), matching torch's CPU casts.
#pragma once

#include <stdint.h>

#ifdef __CUDACC__
#include <cuda_fp16.h>
#define ZO_HD __host__ __device__ __forceinline__
#define ZO_UNROLL _Pragma("unroll")
#else
#define ZO_UNROLL
#include <cmath>
#include <cstring>
#define ZO_HD inline
#endif

namespace zo {

// ------------------------------------------------------------------ contract constants
constexpr uint32_t PHILOX_M0 = 0xD2511F53u;
constexpr uint32_t PHILOX_M1 = 0xCD9E8D57u;
constexpr uint32_t PHILOX_W0 = 0x9E3779B9u;
constexpr uint32_t PHILOX_W1 = 0xBB67AE85u;
constexpr int PHILOX_ROUNDS = 10;
constexpr float TWO_POW_M24 = 5.9604644775390625e-08f;  // 2^-24, exact
constexpr float TWO_PI_F32 = 6.2831854820251465f;       // float32(2 pi)
constexpr int STREAM_Z = 0;

enum DType : int { F32 = 0, BF16 = 1, F16 = 2 };
enum Dist : int { GAUSSIAN = 0, RADEMACHER = 1 };

// ------------------------------------------------------------------ exact float helpers
ZO_HD float f_add(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
ZO_HD float f_sub(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
ZO_HD float f_mul(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
ZO_HD uint32_t f2u(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}
ZO_HD float u2f(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}
ZO_HD bool is_nan(float x) { return (f2u(x) & 0x7FFFFFFFu) > 0x7F800000u; }

// ------------------------------------------------------------------ Philox4x32-10
ZO_HD uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
#ifdef __CUDA_ARCH__
  *hi = __umulhi(a, b);
  return a * b;
#else
  uint64_t p = (uint64_t)a * (uint64_t)b;
  *hi = (uint32_t)(p >> 32);
  return (uint32_t)p;
#endif
}

struct U4 {
  uint32_t x, y, z, w;
};

ZO_HD U4 philox4x32_10(U4 c, uint32_t k0, uint32_t k1) {
ZO_UNROLL
  for (int r = 0; r < PHILOX_ROUNDS; ++r) {
    if (r) {
      k0 += PHILOX_W0;
      k1 += PHILOX_W1;
    }
    uint32_t hi0, hi1;
    uint32_t lo0 = mulhilo32(PHILOX_M0, c.x, &hi0);
    uint32_t lo1 = mulhilo32(PHILOX_M1, c.z, &hi1);
    c = U4{hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0};
  }
  return c;
}

// Contract mapping: key = (lo32 s, hi32 s); ctr = (lo32 b, hi32 b | q << 16 | stream << 28, lo32 k, hi32 k).
ZO_HD U4 contract_block(uint64_t seed, uint64_t key, uint32_t query, uint32_t stream, uint64_t block) {
  U4 c{(uint32_t)block, ((uint32_t)(block >> 32) & 0xFFFFu) | (query << 16) | (stream << 28), (uint32_t)key,
       (uint32_t)(key >> 32)};
  return philox4x32_10(c, (uint32_t)seed, (uint32_t)(seed >> 32));
}

// ------------------------------------------------------------------ uniforms and distributions
// u = ((r >> 9) * 2 + 1) * 2^-24: exact, in (0, 1).
ZO_HD float open_unit(uint32_t r) { return f_mul((float)((r >> 9) * 2u + 1u), TWO_POW_M24); }
// v = (r >> 8) * 2^-24: exact, in [0, 1).
ZO_HD float half_open_unit(uint32_t r) { return f_mul((float)(r >> 8), TWO_POW_M24); }
// z = 1 - 2 * (r >> 31)
ZO_HD float rademacher(uint32_t r) { return (r >> 31) ? -1.0f : 1.0f; }

// z0 = sqrt(-2 ln u(ra)) cos(2 pi u(rb)), z1 = sqrt(-2 ln u(ra)) sin(2 pi u(rb)).
ZO_HD void box_muller(uint32_t ra, uint32_t rb, float* z0, float* z1) {
#ifdef __CUDA_ARCH__
  float radius = __fsqrt_rn(f_mul(logf(open_unit(ra)), -2.0f));
  float s, c;
  sincosf(f_mul(open_unit(rb), TWO_PI_F32), &s, &c);
#else
  float radius = std::sqrt(f_mul(std::log(open_unit(ra)), -2.0f));
  float theta = f_mul(open_unit(rb), TWO_PI_F32);
  float s = std::sin(theta), c = std::cos(theta);
#endif
  *z0 = f_mul(radius, c);
  *z1 = f_mul(radius, s);
}

// The four z lanes of one Philox block.
ZO_HD void z_lanes(const U4& r, int dist, float z[4]) {
  if (dist == GAUSSIAN) {
    box_muller(r.x, r.y, &z[0], &z[1]);
    box_muller(r.z, r.w, &z[2], &z[3]);
  } else {
    z[0] = rademacher(r.x);
    z[1] = rademacher(r.y);
    z[2] = rademacher(r.z);
    z[3] = rademacher(r.w);
  }
}

ZO_HD void v_lanes(const U4& r, float v[4]) {
  v[0] = half_open_unit(r.x);
  v[1] = half_open_unit(r.y);
  v[2] = half_open_unit(r.z);
  v[3] = half_open_unit(r.w);
}

// ------------------------------------------------------------------ 16-bit conversions
ZO_HD float bf16_to_f32(uint16_t h) { return u2f((uint32_t)h << 16); }

// Round to nearest even, as torch's CPU cast (NaN -> 0x7FC0).
ZO_HD uint16_t f32_to_bf16_rn(float x) {
  uint32_t u = f2u(x);
  if (is_nan(x)) return 0x7FC0u;
  return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

ZO_HD float f16_to_f32(uint16_t h) {
#ifdef __CUDA_ARCH__
  return __half2float(__ushort_as_half(h));
#else
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
  if (e == 0x1Fu) return u2f(sign | 0x7F800000u | (m << 13));
  if (e == 0) {
    float mag = f_mul((float)m, TWO_POW_M24);  // subnormal: m * 2^-24, exact
    return u2f(sign | f2u(mag));
  }
  return u2f(sign | ((e + 112u) << 23) | (m << 13));
#endif
}

// Round to nearest even (NaN -> sign | 0x7E00 on the host, as torch's CPU cast).
ZO_HD uint16_t f32_to_f16_rn(float x) {
#ifdef __CUDA_ARCH__
  return __half_as_ushort(__float2half_rn(x));
#else
  uint32_t u = f2u(x);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t a = u & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return (uint16_t)(sign | 0x7E00u);
  if (a >= 0x477FF000u) return (uint16_t)(sign | 0x7C00u);  // >= 65520 rounds to inf
  if (a >= 0x38800000u) {                                   // normal half: >= 2^-14
    a += 0xFFFu + ((a >> 13) & 1u);
    return (uint16_t)(sign | ((a - (112u << 23)) >> 13));
  }
  uint32_t e = a >> 23;  // subnormal half: round(|x| / 2^-24); float denormals round to 0
  if (e < 102u) return (uint16_t)sign;  // |x| < 2^-25
  uint32_t m = (a & 0x7FFFFFu) | 0x800000u;
  uint32_t shift = 126u - e;  // 14..24
  uint32_t q = m >> shift, rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
  if (rem > half || (rem == half && (q & 1u))) ++q;
  return (uint16_t)(sign | q);
#endif
}

// Four consecutive elements at an address aligned to 4 elements: one 16-byte (float) or 8-byte (16-bit) access.
ZO_HD void load4(const float* p, float v[4]) {
#ifdef __CUDA_ARCH__
  const float4 w = *reinterpret_cast<const float4*>(p);
  v[0] = w.x, v[1] = w.y, v[2] = w.z, v[3] = w.w;
#else
  std::memcpy(v, p, 4 * sizeof(float));
#endif
}
ZO_HD void store4(float* p, const float v[4]) {
#ifdef __CUDA_ARCH__
  *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
#else
  std::memcpy(p, v, 4 * sizeof(float));
#endif
}
ZO_HD void load4(const uint16_t* p, uint16_t v[4]) {
#ifdef __CUDA_ARCH__
  const uint2 w = *reinterpret_cast<const uint2*>(p);
  v[0] = (uint16_t)w.x, v[1] = (uint16_t)(w.x >> 16), v[2] = (uint16_t)w.y, v[3] = (uint16_t)(w.y >> 16);
#else
  std::memcpy(v, p, 4 * sizeof(uint16_t));
#endif
}
ZO_HD void store4(uint16_t* p, const uint16_t v[4]) {
#ifdef __CUDA_ARCH__
  *reinterpret_cast<uint2*>(p) = make_uint2(v[0] | ((uint32_t)v[1] << 16), v[2] | ((uint32_t)v[3] << 16));
#else
  std::memcpy(p, v, 4 * sizeof(uint16_t));
#endif
}

ZO_HD void load4(const uint8_t* p, uint8_t v[4]) {
#ifdef __CUDA_ARCH__
  const uint32_t w = *reinterpret_cast<const uint32_t*>(p);
  v[0] = (uint8_t)w, v[1] = (uint8_t)(w >> 8), v[2] = (uint8_t)(w >> 16), v[3] = (uint8_t)(w >> 24);
#else
  std::memcpy(v, p, 4);
#endif
}
ZO_HD void store4(uint8_t* p, const uint8_t v[4]) {
#ifdef __CUDA_ARCH__
  *reinterpret_cast<uint32_t*>(p) = v[0] | ((uint32_t)v[1] << 8) | ((uint32_t)v[2] << 16) | ((uint32_t)v[3] << 24);
#else
  std::memcpy(p, v, 4);
#endif
}

template <int DT>
ZO_HD uint16_t round_nearest(float x) {
  return DT == BF16 ? f32_to_bf16_rn(x) : f32_to_f16_rn(x);
}

// Stochastic rounding of x with uniform v in [0, 1) (reference philox.stochastic_round):
// lo = largest-magnitude DT value <= |x|, hi = the next; pick hi iff v * (hi - lo) < |x| - lo.
template <int DT>
ZO_HD uint16_t stochastic_round(float x, float v) {
  if (is_nan(x)) return round_nearest<DT>(x);
  float a = u2f(f2u(x) & 0x7FFFFFFFu);
  uint32_t sign16 = (f2u(x) >> 16) & 0x8000u;
  float lo, hi;
  uint32_t lo_bits16;
  if (DT == BF16) {
    uint32_t lo_bits = f2u(a) & 0xFFFF0000u;
    lo = u2f(lo_bits);
    hi = u2f(lo_bits + 0x10000u);
    lo_bits16 = lo_bits >> 16;
  } else {
    uint16_t r16 = f32_to_f16_rn(a);
    lo_bits16 = f16_to_f32(r16) > a ? (uint32_t)r16 - 1u : (uint32_t)r16;
    lo = f16_to_f32((uint16_t)lo_bits16);
    hi = f16_to_f32((uint16_t)(lo_bits16 + 1u));
  }
  bool up = f_mul(v, f_sub(hi, lo)) < f_sub(a, lo);
  return (uint16_t)(sign16 | (lo_bits16 + (up ? 1u : 0u)));
}

// ------------------------------------------------------------------ update formulas (fp32, reference order)
// theta + scale * z
ZO_HD float perturbed(float theta, float z, float scale) { return f_add(theta, f_mul(z, scale)); }

// theta - (acc + theta * wd) * lr
ZO_HD float updated(float theta, float acc, float lr, float wd) {
  return f_sub(theta, f_mul(f_add(acc, f_mul(theta, wd)), lr));
}

}  // namespace zo
