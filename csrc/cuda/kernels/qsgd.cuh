// QSGD-style b-bit stochastic quantization (CUDA). Same layout and element logic as
// csrc/cpu/qsgd.cpp: one block per bucket (max-reduce, then one thread per group of 8 codes).
// Device code only (no torch headers): compiled by nvcc inside qsgd.cu and by NVRTC at run
// time (commlib/ops/_cupy.py), the same source either way.
#pragma once

#include "device.cuh"

namespace commlib {
namespace kernels {

// One block quantizes bucket blockIdx.x of `numel` values; `value(i)` loads element i as float
// (a plain tensor here, g + e in the fused error-feedback kernel of ef.cuh).
template <typename Load>
__device__ __forceinline__ void qsgd_quantize_bucket(const Load& value, int64_t numel, int bits, int64_t bucket_size,
                                                     uint32_t key, uint8_t* __restrict__ codes,
                                                     float* __restrict__ scales) {
  __shared__ float partial[kThreads];
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * bucket_size;
  const int64_t count = min(bucket_size, numel - begin);
  float m = 0.0f;
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) m = nan_max(m, fabsf(value(begin + i)));
  partial[threadIdx.x] = m;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) partial[threadIdx.x] = nan_max(partial[threadIdx.x], partial[threadIdx.x + stride]);
    __syncthreads();
  }
  const float scale = partial[0];
  if (threadIdx.x == 0) scales[blockIdx.x] = scale;
  const uint32_t levels = (1u << bits) - 1u;
  const float half_levels = static_cast<float>(levels) * 0.5f;
  const float inv_scale = safe_inverse(scale);
  const int64_t groups = (count + 7) / 8;
  for (int64_t g = threadIdx.x; g < groups; g += blockDim.x) {
    uint64_t group = 0;
    const int64_t first = begin + g * 8;
    const int in_group = count - g * 8 < 8 ? static_cast<int>(count - g * 8) : 8;
    for (int j = 0; j < in_group; ++j) {
      const float u = uniform24(key, first + j);
      group |= static_cast<uint64_t>(qsgd_code(value(first + j), inv_scale, half_levels, levels, u)) << (bits * j);
    }
    uint8_t* dst = codes + first / 8 * bits;
    for (int b = 0; b < bits; ++b) dst[b] = static_cast<uint8_t>(group >> (8 * b));
  }
}

template <typename T>
struct LoadValue {
  const T* __restrict__ x;
  __device__ __forceinline__ float operator()(int64_t i) const { return to_float(x[i]); }
};

template <typename T>
__global__ void qsgd_quantize_kernel(const T* __restrict__ x, int64_t n, int bits, int64_t bucket_size,
                                     uint32_t key, uint8_t* __restrict__ codes, float* __restrict__ scales) {
  qsgd_quantize_bucket(LoadValue<T>{x}, n, bits, bucket_size, key, codes, scales);
}

template <typename T>
__global__ void qsgd_dequantize_kernel(const uint8_t* __restrict__ codes, const float* __restrict__ scales, int bits,
                                       int64_t bucket_size, int64_t n, T* __restrict__ out) {
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g * 8 >= n) return;
  const uint8_t* src = codes + g * bits;
  uint64_t group = 0;
  for (int b = 0; b < bits; ++b) group |= static_cast<uint64_t>(src[b]) << (8 * b);
  const uint32_t levels = (1u << bits) - 1u;
  const float inv_levels = 1.0f / static_cast<float>(levels);
  const float scale = scales[g * 8 / bucket_size];
  const int in_group = n - g * 8 < 8 ? static_cast<int>(n - g * 8) : 8;
  for (int j = 0; j < in_group; ++j) {
    const uint32_t c = static_cast<uint32_t>((group >> (bits * j)) & levels);
    out[g * 8 + j] = from_float<T>(qsgd_value(c, scale, inv_levels, levels));
  }
}

}  // namespace kernels
}  // namespace commlib
