// Element-level logic shared by the CPU (C++/OpenMP) and CUDA kernels.
//
// Every function here is the single definition of "what happens to one value"; the Python
// references in commlib/ops/{sign,qsgd,sparse}.py compute exactly the same float32 operations in the same
// order, so kernels and references agree bit for bit. Build with -ffp-contract=off (host) and
// --fmad=false (device): a fused multiply-add would round differently from the reference.
#pragma once

#if defined(__CUDACC_RTC__)
// NVRTC has no C++ standard headers: the fixed-width integers the kernels use, by their LP64 types
typedef signed char int8_t;
typedef unsigned char uint8_t;
typedef int int32_t;
typedef unsigned int uint32_t;
typedef long long int64_t;
typedef unsigned long long uint64_t;
#else
#include <cmath>
#include <cstdint>
#include <cstring>
#endif

#if defined(__CUDACC__)
#define COMMLIB_HD __host__ __device__ __forceinline__
#else
#define COMMLIB_HD inline
#endif

namespace commlib {

// ---------------------------------------------------------------------------------------------
// Counter-based randomness: a 32-bit avalanche hash ("lowbias32", C. Wellons), applied to
// (seed, element index). Same numbers on every rank and every backend, no generator state.
COMMLIB_HD uint32_t hash32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

// Per-stream key from a 64-bit seed: mixes both halves so seeds differing anywhere differ here.
COMMLIB_HD uint32_t seed_key(int64_t seed) {
  const uint64_t s = static_cast<uint64_t>(seed);
  return hash32(hash32(static_cast<uint32_t>(s) ^ 0x9e3779b9U) ^ static_cast<uint32_t>(s >> 32));
}

// The part of an element's stream key that depends on the high word of its index only; constant
// over any 2^32-aligned range, so block loops hoist it.
COMMLIB_HD uint32_t index_high_key(uint32_t key, int64_t index) {
  return hash32(key ^ static_cast<uint32_t>(static_cast<uint64_t>(index) >> 32));
}

COMMLIB_HD float uniform24_low(uint32_t high_key, uint32_t index_low) {
  return static_cast<float>(hash32(index_low ^ high_key) >> 8) * (1.0f / 16777216.0f);
}

// Uniform float in [0, 1) with 24 random bits (exact in float32) for element `index`.
COMMLIB_HD float uniform24(uint32_t key, int64_t index) {
  return uniform24_low(index_high_key(key, index), static_cast<uint32_t>(index));
}

// ---------------------------------------------------------------------------------------------
// QSGD-style stochastic quantization on the symmetric uniform grid of 2^bits levels spanning
// [-scale, scale]: level c in [0, L] (L = 2^bits - 1) stands for scale * (2c - L) / L.
// Stochastic rounding between the two neighbouring levels makes it unbiased: E[value] = x.
COMMLIB_HD uint32_t qsgd_code(float x, float inv_scale, float half_levels, uint32_t levels, float u) {
  // t = position of x on the grid; x = -scale -> 0, x = +scale -> L. Clamped to [0, L] (NaN -> 0,
  // and inf from a subnormal scale -> L), so truncation is floor. Branch-free: the CPU block
  // loop vectorizes.
  const float top = static_cast<float>(levels);
  const float t = (x * inv_scale + 1.0f) * half_levels;
  const float ts = t > 0.0f ? (t < top ? t : top) : 0.0f;
  const int32_t lower = static_cast<int32_t>(ts);
  const uint32_t c = static_cast<uint32_t>(lower) + (u < ts - static_cast<float>(lower) ? 1u : 0u);
  return c > levels ? levels : c;
}

// The grid point of code c before scaling: (2c - L) / L. qsgd_value == scale * qsgd_unit, so a
// table of units per bit width dequantizes bit-identically.
COMMLIB_HD float qsgd_unit(uint32_t code, float inv_levels, uint32_t levels) {
  return (2.0f * static_cast<float>(code) - static_cast<float>(levels)) * inv_levels;
}

COMMLIB_HD float qsgd_value(uint32_t code, float scale, float inv_levels, uint32_t levels) {
  return scale * qsgd_unit(code, inv_levels, levels);
}

// max(|a|, |b|)-style maximum in which NaN is sticky: the scale of a bucket holding NaN is NaN.
COMMLIB_HD float nan_max(float m, float a) {
  if (m != m || a != a) return m != m ? m : a;
  return a > m ? a : m;
}

// 1 / scale shared by both backends. An all-zero bucket (scale 0) gets inv_scale 0: every code
// lands next to the grid's middle and dequantizes to scale * (...) = 0 exactly.
COMMLIB_HD float safe_inverse(float scale) { return scale > 0.0f ? 1.0f / scale : 0.0f; }

// The IEEE-754 bit pattern of a float32.
COMMLIB_HD uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t b;
  std::memcpy(&b, &x, sizeof(b));
  return b;
#endif
}

// ---------------------------------------------------------------------------------------------
// Sign packing: bit j of word w is the sign bit of element 32*w + j (1 = negative, -0.0 included).
COMMLIB_HD uint32_t sign_bit(float x) { return float_bits(x) >> 31; }

COMMLIB_HD float signed_scale(uint32_t word, int bit, float scale) {
  return ((word >> bit) & 1u) ? -scale : scale;
}

// ---------------------------------------------------------------------------------------------
// Top-k ordering key: the bit pattern of |x| as float32. For non-negative floats the integer
// order equals the magnitude order, +inf ranks above every finite value and NaN above +inf, so
// non-finite values are always selected and propagate.
COMMLIB_HD uint32_t magnitude_key(float x) { return float_bits(x) & 0x7fffffffU; }

// Sample position j (of m) for the threshold estimate of top-k: hashed, so structured gradients
// (rows of a weight matrix) are not sampled in lockstep.
COMMLIB_HD int64_t sample_position(int64_t j, int64_t n) {
  return static_cast<int64_t>(hash32(static_cast<uint32_t>(j) ^ 0x5bd1e995U) % static_cast<uint64_t>(n));
}

// ---------------------------------------------------------------------------------------------
// Error feedback (EF-SGD, Karimireddy et al. 2019, Alg. 2): the corrected value v = g + e and the
// new residual e' = v - decompress(C(v)), each rounded to the gradient's dtype exactly as the
// reference's tensor ops round them (float32 arithmetic, one rounding to T per operation).
template <typename T>
COMMLIB_HD T corrected_value(T grad, T residual) {
  return static_cast<T>(static_cast<float>(grad) + static_cast<float>(residual));
}

// `hat` is the decompressed value in float32 before its cast to T (decompress returns T).
template <typename T>
COMMLIB_HD T residual_value(T corrected, float hat) {
  return static_cast<T>(static_cast<float>(corrected) - static_cast<float>(static_cast<T>(hat)));
}

}  // namespace commlib
