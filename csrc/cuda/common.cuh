// Helpers shared by the CUDA kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include "commlib/elementwise.h"

namespace commlib {

// Element loads/stores as float for the three supported dtypes.
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(c10::Half v) { return __half2float(static_cast<__half>(v)); }
__device__ __forceinline__ float to_float(c10::BFloat16 v) { return static_cast<float>(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v) {
  return static_cast<T>(v);
}

template <typename F>
void dispatch_floats_cuda(at::ScalarType type, const char* op, F&& f) {
  switch (type) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    case at::kHalf: f(c10::Half{}); break;
    default: TORCH_CHECK(false, op, ": expected float32, bfloat16 or float16, got ", type);
  }
}

inline int64_t blocks_for(int64_t work, int threads) { return (work + threads - 1) / threads; }

}  // namespace commlib
