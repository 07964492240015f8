// 1-bit sign packing with per-chunk mean-|x| scales (CUDA). Element logic: elementwise.h.
// One thread per 32-value word; per-chunk |x| sums accumulate in float64 atomics.
// Device code only (no torch headers): compiled by nvcc inside sign.cu and by NVRTC at run
// time (commlib/ops/_cupy.py), the same source either way.
#pragma once

#include "device.cuh"

namespace commlib {
namespace kernels {

template <typename T>
__global__ void sign_pack_kernel(const T* __restrict__ x, int64_t n, int64_t words_per_chunk,
                                 uint32_t* __restrict__ packed, double* __restrict__ chunk_abs_sum) {
  const int64_t w = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t words = (n + 31) / 32;
  if (w >= words) return;
  const int64_t base = w * 32;
  const int count = n - base < 32 ? static_cast<int>(n - base) : 32;
  uint32_t word = 0;
  double abs_sum = 0.0;  // double like the reference: 32 values near FLT_MAX must not overflow
  for (int j = 0; j < count; ++j) {
    const float v = to_float(x[base + j]);
    word |= sign_bit(v) << j;
    abs_sum += fabs(static_cast<double>(v));
  }
  packed[w] = word;
  atomicAdd(&chunk_abs_sum[w / words_per_chunk], abs_sum);
}

__global__ void finish_scales_kernel(const double* __restrict__ sums, int64_t chunks, int64_t chunk, int64_t n,
                                     float* __restrict__ scales) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= chunks) return;
  const int64_t count = min(n, (c + 1) * chunk) - c * chunk;
  scales[c] = static_cast<float>(sums[c] / static_cast<double>(count));
}

template <typename T>
__global__ void sign_unpack_kernel(const uint32_t* __restrict__ packed, const float* __restrict__ scales,
                                   int64_t n, int64_t chunk, T* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  out[i] = from_float<T>(signed_scale(packed[i / 32], static_cast<int>(i % 32), scales[i / chunk]));
}

}  // namespace kernels
}  // namespace commlib
