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

}  // namespace commlib
