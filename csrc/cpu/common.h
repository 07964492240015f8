// Helpers shared by the CPU kernels: input checks and float conversion of fp32/bf16/fp16.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "commlib/elementwise.h"

#include <algorithm>
#include <cstring>
#include <limits>

// Hot block loops get an AVX2 clone beside the baseline x86-64 one, chosen at load time.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define COMMLIB_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define COMMLIB_CPU_CLONES
#endif

#if defined(_OPENMP)
#include <omp.h>
#endif

#define COMMLIB_CHECK_FLOAT_INPUT(op, x)                                                          \
  TORCH_CHECK((x).device().is_cpu(), op ": expected a CPU tensor, got ", (x).device());          \
  TORCH_CHECK((x).scalar_type() == at::kFloat || (x).scalar_type() == at::kBFloat16 ||            \
                  (x).scalar_type() == at::kHalf,                                                 \
              op ": expected float32, bfloat16 or float16, got ", (x).scalar_type())

namespace commlib {

inline int kernel_threads() { return at::get_num_threads(); }

// Calls f(T{}) with T = float, c10::BFloat16 or c10::Half. A generic lambda, not a macro
// argument, so the kernels inside may carry OpenMP pragmas.
template <typename F>
void dispatch_floats(at::ScalarType type, const char* op, F&& f) {
  switch (type) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    case at::kHalf: f(c10::Half{}); break;
    default: TORCH_CHECK(false, op, ": expected float32, bfloat16 or float16, got ", type);
  }
}

// The error-feedback input of the fused kernels: v_i = g_i + e_i rounded to the gradient's dtype
// (g_i alone without a residual), and zero at i >= n (the zero padding of two-phase chunks), so a
// kernel reading it compresses exactly what the reference's materialized pad(g + e) holds.
template <typename scalar_t>
struct CorrectedSource {
  const scalar_t* grad;
  const scalar_t* residual;  // nullptr: no residual yet
  int64_t n;

  inline scalar_t at(int64_t i) const {
    if (i >= n) return static_cast<scalar_t>(0.0f);
    return residual != nullptr ? corrected_value(grad[i], residual[i]) : grad[i];
  }

  // `count` values from index `first` as float32 (a view of grad when nothing needs computing).
  inline const float* floats(int64_t first, int64_t count, float* buffer) const {
    const int64_t real = std::clamp<int64_t>(n - first, 0, count);
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (residual == nullptr && real == count) return grad + first;
    }
    const scalar_t* g = grad + first;
    if (residual != nullptr) {
      const scalar_t* e = residual + first;
      for (int64_t j = 0; j < real; ++j) buffer[j] = static_cast<float>(corrected_value(g[j], e[j]));
    } else {
      for (int64_t j = 0; j < real; ++j) buffer[j] = static_cast<float>(g[j]);
    }
    for (int64_t j = real; j < count; ++j) buffer[j] = 0.0f;
    return buffer;
  }
};

// Checks shared by the fused error-feedback ops: gradient and residual alike, contiguous.
inline void check_ef_pair(const char* op, const at::Tensor& grad, const at::Tensor* residual) {
  TORCH_CHECK(grad.device().is_cpu(), op, ": expected a CPU tensor, got ", grad.device());
  TORCH_CHECK(grad.scalar_type() == at::kFloat || grad.scalar_type() == at::kBFloat16 ||
                  grad.scalar_type() == at::kHalf,
              op, ": expected float32, bfloat16 or float16, got ", grad.scalar_type());
  TORCH_CHECK(grad.is_contiguous(), op, ": grad must be contiguous");
  if (residual != nullptr) {
    TORCH_CHECK(residual->scalar_type() == grad.scalar_type(), op, ": residual dtype ", residual->scalar_type(),
                " differs from grad dtype ", grad.scalar_type());
    TORCH_CHECK(residual->numel() == grad.numel(), op, ": residual has ", residual->numel(), " elements, grad ",
                grad.numel());
    TORCH_CHECK(residual->is_contiguous() && residual->device() == grad.device(), op,
                ": residual must be contiguous and on grad's device");
  }
}

// out_j <- (out_j +) hat_j for a block of decompressed float32 values, with the roundings of the
// reference ``out.add_(decompress(p).to(out.dtype))``: hat to the payload's dtype P, then to out's
// dtype O, then the sum rounded to O. Float32 throughout vectorizes.
template <typename O, typename P>
inline void store_decompressed(const float* hat, int64_t count, bool accumulate, O* out) {
  if (accumulate) {
    for (int64_t j = 0; j < count; ++j) {
      const O v = static_cast<O>(static_cast<float>(static_cast<P>(hat[j])));
      out[j] = static_cast<O>(static_cast<float>(out[j]) + static_cast<float>(v));
    }
  } else {
    for (int64_t j = 0; j < count; ++j) out[j] = static_cast<O>(static_cast<float>(static_cast<P>(hat[j])));
  }
}

// Calls f(O{}, P{}) for out's and the payload's float dtypes.
template <typename F>
void dispatch_float_pair(at::ScalarType out_type, at::ScalarType payload_type, const char* op, F&& f) {
  dispatch_floats(out_type, op, [&](auto o) { dispatch_floats(payload_type, op, [&](auto p) { f(o, p); }); });
}

// e_j <- (g_j + e_j) - hat_j (or g_j - hat_j), branch-free inner loops that vectorize for float32.
template <typename scalar_t>
inline void residual_block(const scalar_t* g, scalar_t* e, const float* hat, int64_t count, bool accumulate) {
  if (accumulate) {
    for (int64_t j = 0; j < count; ++j) e[j] = residual_value(corrected_value(g[j], e[j]), hat[j]);
  } else {
    for (int64_t j = 0; j < count; ++j) e[j] = residual_value(g[j], hat[j]);
  }
}

}  // namespace commlib
