// What every CUDA kernel header needs, for both compilers: nvcc (the torch extension, where
// common.cuh has already defined to_float/from_float for c10::Half and c10::BFloat16) and NVRTC
// (commlib/ops/_cupy.py, no torch headers: the kernels are instantiated with __half and
// __nv_bfloat16, which have the same layout).
#pragma once

#if defined(__CUDACC_RTC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#include "commlib/elementwise.h"

namespace commlib {

#if defined(__CUDACC_RTC__)
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v) {
  return static_cast<T>(v);
}
#endif

namespace kernels {
constexpr int kThreads = 256;  // threads per block of the element-wise kernels
}  // namespace kernels

}  // namespace commlib
