// Fused error feedback and decompression in place (CUDA twins of the EF ops in csrc/cpu/sign.cpp,
// qsgd.cpp and ef_sparse.cpp). Element logic: elementwise.h (corrected_value, residual_value,
// signed_scale, qsgd_code/qsgd_value), shared with the CPU kernels. ef_topk_abs has no CUDA kernel
// (neither has topk_abs): the reference composite serves CUDA tensors.
// Device code only (no torch headers): compiled by nvcc inside ef.cu and by NVRTC at run
// time (commlib/ops/_cupy.py), the same source either way.
#pragma once

#include "device.cuh"
#include "qsgd.cuh"

namespace commlib {
namespace kernels {

// v_i = g_i + e_i rounded to T (g_i without a residual), zero past the gradient (padding).
template <typename T>
__device__ __forceinline__ float corrected_at(const T* __restrict__ g, const T* __restrict__ e, int64_t n,
                                              int64_t i) {
  if (i >= n) return 0.0f;
  return e != nullptr ? static_cast<float>(corrected_value(g[i], e[i])) : static_cast<float>(g[i]);
}

// ------------------------------------------------------------------------------------------ sign
template <typename T>
__global__ void ef_sign_pack_kernel(const T* __restrict__ g, const T* __restrict__ e, int64_t n, int64_t numel,
                                    int64_t words_per_chunk, uint32_t* __restrict__ packed,
                                    double* __restrict__ chunk_abs_sum) {
  const int64_t w = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (w >= (numel + 31) / 32) return;
  const int64_t base = w * 32;
  const int count = numel - base < 32 ? static_cast<int>(numel - base) : 32;
  uint32_t word = 0;
  double abs_sum = 0.0;
  for (int j = 0; j < count; ++j) {
    const float v = corrected_at(g, e, n, base + j);
    word |= sign_bit(v) << j;
    abs_sum += fabs(static_cast<double>(v));
  }
  packed[w] = word;
  atomicAdd(&chunk_abs_sum[w / words_per_chunk], abs_sum);
}

__global__ void ef_finish_scales_kernel(const double* __restrict__ sums, int64_t chunks, int64_t chunk,
                                        int64_t numel, float* __restrict__ scales) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= chunks) return;
  const int64_t count = min(numel, (c + 1) * chunk) - c * chunk;
  scales[c] = static_cast<float>(sums[c] / static_cast<double>(count));
}

template <typename T>
__global__ void ef_sign_residual_kernel(T* __restrict__ e, const T* __restrict__ g, int64_t n,
                                        const uint32_t* __restrict__ packed, const float* __restrict__ scales,
                                        int64_t chunk, bool accumulate) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const T v = accumulate ? corrected_value(g[i], e[i]) : g[i];
  e[i] = residual_value(v, signed_scale(packed[i / 32], static_cast<int>(i % 32), scales[i / chunk]));
}

// out_i <- (out_i +) O(P(hat_i)): the reference's out.add_(decompress(p).to(out.dtype)) roundings.
template <typename O, typename P>
__device__ __forceinline__ void store_hat(O* out, int64_t i, float hat, bool accumulate) {
  const O v = static_cast<O>(static_cast<float>(static_cast<P>(hat)));
  out[i] = accumulate ? static_cast<O>(static_cast<float>(out[i]) + static_cast<float>(v)) : v;
}

template <typename O, typename P>
__global__ void sign_unpack_into_kernel(O* __restrict__ out, int64_t n, const uint32_t* __restrict__ packed,
                                        const float* __restrict__ scales, int64_t chunk, bool accumulate) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  store_hat<O, P>(out, i, signed_scale(packed[i / 32], static_cast<int>(i % 32), scales[i / chunk]), accumulate);
}

// ------------------------------------------------------------------------------------------ QSGD
template <typename T>
struct LoadCorrected {  // v_i = g_i + e_i, zero past the gradient
  const T* __restrict__ g;
  const T* __restrict__ e;
  int64_t n;
  __device__ __forceinline__ float operator()(int64_t i) const { return corrected_at(g, e, n, i); }
};

// QSGD of v = g + e over `numel` values (the bucket loop is qsgd.cuh's, shared with qsgd_quantize)
template <typename T>
__global__ void ef_qsgd_quantize_kernel(const T* __restrict__ g, const T* __restrict__ e, int64_t n, int64_t numel,
                                        int bits, int64_t bucket_size, uint32_t key, uint8_t* __restrict__ codes,
                                        float* __restrict__ scales) {
  qsgd_quantize_bucket(LoadCorrected<T>{g, e, n}, numel, bits, bucket_size, key, codes, scales);
}

__device__ __forceinline__ float qsgd_hat(const uint8_t* __restrict__ codes, const float* __restrict__ scales,
                                          int bits, int64_t bucket_size, int64_t i) {
  const uint8_t* src = codes + i / 8 * bits;
  uint64_t group = 0;
  for (int b = 0; b < bits; ++b) group |= static_cast<uint64_t>(src[b]) << (8 * b);
  const uint32_t levels = (1u << bits) - 1u;
  const uint32_t c = static_cast<uint32_t>((group >> (bits * (i % 8))) & levels);
  return qsgd_value(c, scales[i / bucket_size], 1.0f / static_cast<float>(levels), levels);
}

template <typename T>
__global__ void ef_qsgd_residual_kernel(T* __restrict__ e, const T* __restrict__ g, int64_t n,
                                        const uint8_t* __restrict__ codes, const float* __restrict__ scales, int bits,
                                        int64_t bucket_size, bool accumulate) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const T v = accumulate ? corrected_value(g[i], e[i]) : g[i];
  e[i] = residual_value(v, qsgd_hat(codes, scales, bits, bucket_size, i));
}

template <typename O, typename P>
__global__ void qsgd_dequantize_into_kernel(O* __restrict__ out, int64_t n, const uint8_t* __restrict__ codes,
                                            const float* __restrict__ scales, int bits, int64_t bucket_size,
                                            bool accumulate) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  store_hat<O, P>(out, i, qsgd_hat(codes, scales, bits, bucket_size, i), accumulate);
}

// ------------------------------------------------------------------------------------------ sparse
template <typename T>
__global__ void ef_accumulate_kernel(T* __restrict__ e, const T* __restrict__ g, int64_t n, bool accumulate) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  e[i] = accumulate ? corrected_value(g[i], e[i]) : g[i];
}

// Indices come from payloads: one outside [0, n) never touches memory. It stops the kernel with a
// trap (the launch fails with an error at the next synchronization, as a device-side assert does),
// before any write: the CPU twin checks every index before its first write too.
__device__ __forceinline__ bool index_in_range(int64_t i, int64_t n) { return i >= 0 && i < n; }

// One thread walks the k (index, value) pairs in order: zero-valued padding may repeat an index,
// and subtracting in order is what the reference's scatter-add then subtract amounts to.
template <typename T, typename I>
__global__ void ef_subtract_sent_kernel(T* __restrict__ e, const I* __restrict__ idx, const T* __restrict__ val,
                                        int64_t k, int64_t n) {
  for (int64_t j = 0; j < k; ++j)
    if (!index_in_range(static_cast<int64_t>(idx[j]), n)) __trap();
  for (int64_t j = 0; j < k; ++j) e[idx[j]] = residual_value(e[idx[j]], static_cast<float>(val[j]));
}

template <typename T, typename I>
__global__ void ef_gather_kernel(const T* __restrict__ g, const T* __restrict__ e, const I* __restrict__ idx,
                                 int64_t k, int64_t n, T* __restrict__ values) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= k) return;
  const int64_t i = static_cast<int64_t>(idx[j]);
  if (!index_in_range(i, n)) __trap();
  values[j] = e != nullptr ? corrected_value(g[i], e[i]) : g[i];
}

template <typename T>
__global__ void ef_nonfinite_kernel(const T* __restrict__ g, const T* __restrict__ e, int64_t n,
                                    unsigned int* __restrict__ worst) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const uint32_t b = float_bits(corrected_at(g, e, n, i)) & 0x7f800000u;
  if (b == 0x7f800000u) atomicMax(worst, b);
}

__global__ void ef_guard_kernel(const unsigned int* __restrict__ worst, float* __restrict__ guard) {
  *guard = *worst == 0x7f800000u ? __int_as_float(0x7fc00000) : 0.0f;
}

}  // namespace kernels
}  // namespace commlib
