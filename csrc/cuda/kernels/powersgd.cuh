// PowerSGD's two passes over a gradient matrix, fused (CUDA twin of csrc/cpu/powersgd.cpp):
// project (M = G + E with P = M Q) and backproject_ (out = P Q^T, M <- M - P Q^T). Float32 only.
// Device code only (no torch headers): compiled by nvcc inside powersgd.cu and by NVRTC at run
// time (commlib/ops/_cupy.py), the same source either way.
#pragma once

#include "device.cuh"

namespace commlib {
namespace kernels {

// One block per row: each thread forms its columns of M and keeps r partial dot products in
// shared memory, reduced per column of Q at the end.
__global__ void powersgd_project_kernel(const float* __restrict__ g, const float* __restrict__ e,
                                        const float* __restrict__ q, int64_t cols, int64_t r, float* __restrict__ m,
                                        float* __restrict__ p) {
  extern __shared__ float partial[];  // r x blockDim
  const int64_t row = blockIdx.x;
  for (int64_t k = 0; k < r; ++k) partial[k * blockDim.x + threadIdx.x] = 0.0f;
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
    const int64_t at = row * cols + j;
    const float v = e != nullptr ? g[at] + e[at] : g[at];
    m[at] = v;
    for (int64_t k = 0; k < r; ++k) partial[k * blockDim.x + threadIdx.x] += v * q[j * r + k];
  }
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride)
      for (int64_t k = 0; k < r; ++k) partial[k * blockDim.x + threadIdx.x] += partial[k * blockDim.x + threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0)
    for (int64_t k = 0; k < r; ++k) p[row * r + k] = partial[k * blockDim.x];
}

__global__ void powersgd_backproject_kernel(float* __restrict__ m, const float* __restrict__ p,
                                            const float* __restrict__ q, int64_t rows, int64_t cols, int64_t r,
                                            float* __restrict__ out) {
  const int64_t at = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (at >= rows * cols) return;
  const int64_t i = at / cols, j = at % cols;
  float hat = p[i * r] * q[j * r];
  for (int64_t k = 1; k < r; ++k) hat += p[i * r + k] * q[j * r + k];
  out[at] = hat;
  m[at] -= hat;
}

}  // namespace kernels
}  // namespace commlib
