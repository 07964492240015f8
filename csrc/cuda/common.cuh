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

// Every tensor an op reads or writes must be on `like`'s device: a host tensor (a state loaded with
// map_location="cpu") or another GPU's would hand the kernel a pointer it cannot use.
inline void check_device(const char* op, const at::Tensor& like, std::initializer_list<const at::Tensor*> others) {
  for (const at::Tensor* t : others)
    if (t != nullptr)
      TORCH_CHECK(t->device() == like.device(), op, ": every tensor must be on ", like.device(), ", got one on ",
                  t->device());
}

// The float32 scales of a sign payload (one per chunk) or a QSGD payload (one per bucket).
inline int64_t sign_chunk(int64_t chunk_size, int64_t numel) {
  return (chunk_size == 0 || chunk_size >= numel) ? std::max<int64_t>(numel, 1) : chunk_size;
}
inline int64_t sign_scale_count(int64_t chunk_size, int64_t numel) {
  return numel == 0 ? 0 : (numel + sign_chunk(chunk_size, numel) - 1) / sign_chunk(chunk_size, numel);
}
inline void check_scales(const char* op, const at::Tensor& scales, int64_t expected) {
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.numel() == expected, op, ": expected ", expected,
              " float32 scales, got ", scales.numel(), " of ", scales.scalar_type());
}

}  // namespace commlib
