// Fused error feedback and decompression in place (CUDA twins of the EF ops in csrc/cpu/sign.cpp,
// qsgd.cpp and ef_sparse.cpp). Element logic: elementwise.h (corrected_value, residual_value,
// signed_scale, qsgd_code/qsgd_value), shared with the CPU kernels. ef_topk_abs has no CUDA kernel
// (neither has topk_abs): the reference composite serves CUDA tensors.
#include "common.cuh"

namespace commlib {
namespace {

constexpr int kThreads = 256;

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

int64_t chunk_of(int64_t chunk_size, int64_t numel) {
  return (chunk_size == 0 || chunk_size >= numel) ? std::max<int64_t>(numel, 1) : chunk_size;
}

void check_pair(const char* op, const at::Tensor& grad, const at::Tensor* residual) {
  TORCH_CHECK(grad.is_cuda() && grad.is_contiguous(), op, ": expected a contiguous CUDA tensor");
  if (residual != nullptr)
    TORCH_CHECK(residual->scalar_type() == grad.scalar_type() && residual->numel() == grad.numel() &&
                    residual->is_contiguous() && residual->device() == grad.device(),
                op, ": residual must match grad's dtype, size and device, and be contiguous");
}

std::tuple<at::Tensor, at::Tensor> ef_sign_pack_cuda(const at::Tensor& grad, const c10::optional<at::Tensor>& residual,
                                                     int64_t chunk_size, int64_t numel) {
  const at::Tensor* res = residual.has_value() ? &residual.value() : nullptr;
  check_pair("commlib::ef_sign_pack", grad, res);
  TORCH_CHECK(chunk_size >= 0 && chunk_size % 32 == 0 && numel >= grad.numel(),
              "commlib::ef_sign_pack: bad chunk_size or numel");
  const c10::cuda::CUDAGuard guard(grad.device());
  const int64_t words = (numel + 31) / 32;
  const int64_t chunk = chunk_of(chunk_size, numel);
  const int64_t chunks = numel == 0 ? 0 : (numel + chunk - 1) / chunk;
  at::Tensor packed = at::empty({words}, grad.options().dtype(at::kInt));
  at::Tensor sums = at::zeros({chunks}, grad.options().dtype(at::kDouble));
  at::Tensor scales = at::empty({chunks}, grad.options().dtype(at::kFloat));
  if (numel == 0) return {packed, scales};
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_floats_cuda(grad.scalar_type(), "ef_sign_pack", [&](auto tag) {
    using T = decltype(tag);
    ef_sign_pack_kernel<T><<<blocks_for(words, kThreads), kThreads, 0, stream>>>(
        grad.data_ptr<T>(), res ? res->data_ptr<T>() : nullptr, grad.numel(), numel, (chunk + 31) / 32,
        reinterpret_cast<uint32_t*>(packed.data_ptr<int32_t>()), sums.data_ptr<double>());
  });
  ef_finish_scales_kernel<<<blocks_for(chunks, kThreads), kThreads, 0, stream>>>(
      sums.data_ptr<double>(), chunks, chunk, numel, scales.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {packed, scales};
}

void ef_sign_residual_cuda(const at::Tensor& residual, const at::Tensor& grad, const at::Tensor& packed,
                           const at::Tensor& scales, int64_t chunk_size, int64_t numel, bool accumulate) {
  check_pair("commlib::ef_sign_residual_", grad, &residual);
  TORCH_CHECK(packed.numel() == (numel + 31) / 32 && numel >= grad.numel() && packed.is_contiguous() &&
                  scales.is_contiguous(), "commlib::ef_sign_residual_: payload does not match numel");
  const c10::cuda::CUDAGuard guard(grad.device());
  const int64_t n = grad.numel();
  if (n == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_floats_cuda(grad.scalar_type(), "ef_sign_residual_", [&](auto tag) {
    using T = decltype(tag);
    ef_sign_residual_kernel<T><<<blocks_for(n, kThreads), kThreads, 0, stream>>>(
        residual.data_ptr<T>(), grad.data_ptr<T>(), n,
        reinterpret_cast<const uint32_t*>(packed.data_ptr<int32_t>()), scales.data_ptr<float>(),
        chunk_of(chunk_size, numel), accumulate);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename F>
void dispatch_pair_cuda(at::ScalarType out_type, at::ScalarType payload_type, const char* op, F&& f) {
  dispatch_floats_cuda(out_type, op, [&](auto o) { dispatch_floats_cuda(payload_type, op, [&](auto p) { f(o, p); }); });
}

void sign_unpack_into_cuda(const at::Tensor& out, const at::Tensor& packed, const at::Tensor& scales,
                           int64_t chunk_size, int64_t numel, at::ScalarType dtype, bool accumulate) {
  TORCH_CHECK(out.is_cuda() && out.is_contiguous() && out.numel() <= numel && packed.numel() == (numel + 31) / 32 &&
                  packed.is_contiguous() && scales.is_contiguous(),
              "commlib::sign_unpack_into_: out must be contiguous CUDA with at most numel elements");
  const c10::cuda::CUDAGuard guard(out.device());
  const int64_t n = out.numel();
  if (n == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_pair_cuda(out.scalar_type(), dtype, "sign_unpack_into_", [&](auto o, auto p) {
    using O = decltype(o);
    using P = decltype(p);
    sign_unpack_into_kernel<O, P><<<blocks_for(n, kThreads), kThreads, 0, stream>>>(
        out.data_ptr<O>(), n, reinterpret_cast<const uint32_t*>(packed.data_ptr<int32_t>()), scales.data_ptr<float>(),
        chunk_of(chunk_size, numel), accumulate);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ------------------------------------------------------------------------------------------ QSGD
template <typename T>
__global__ void ef_qsgd_quantize_kernel(const T* __restrict__ g, const T* __restrict__ e, int64_t n, int64_t numel,
                                        int bits, int64_t bucket_size, uint32_t key, uint8_t* __restrict__ codes,
                                        float* __restrict__ scales) {
  __shared__ float partial[kThreads];
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * bucket_size;
  const int64_t count = min(bucket_size, numel - begin);
  float m = 0.0f;
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) m = nan_max(m, fabsf(corrected_at(g, e, n, begin + i)));
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
  for (int64_t grp = threadIdx.x; grp < groups; grp += blockDim.x) {
    uint64_t group = 0;
    const int64_t first = begin + grp * 8;
    const int in_group = count - grp * 8 < 8 ? static_cast<int>(count - grp * 8) : 8;
    for (int j = 0; j < in_group; ++j) {
      const float u = uniform24(key, first + j);
      group |= static_cast<uint64_t>(qsgd_code(corrected_at(g, e, n, first + j), inv_scale, half_levels, levels, u))
               << (bits * j);
    }
    uint8_t* dst = codes + first / 8 * bits;
    for (int b = 0; b < bits; ++b) dst[b] = static_cast<uint8_t>(group >> (8 * b));
  }
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

void check_qsgd(const char* op, int64_t bits, int64_t bucket_size) {
  TORCH_CHECK(bits >= 1 && bits <= 8 && bucket_size >= 8 && bucket_size % 8 == 0, op, ": bad bits or bucket_size");
}

std::tuple<at::Tensor, at::Tensor> ef_qsgd_quantize_cuda(const at::Tensor& grad,
                                                         const c10::optional<at::Tensor>& residual, int64_t bits,
                                                         int64_t bucket_size, int64_t seed, int64_t numel) {
  const at::Tensor* res = residual.has_value() ? &residual.value() : nullptr;
  check_pair("commlib::ef_qsgd_quantize", grad, res);
  check_qsgd("commlib::ef_qsgd_quantize", bits, bucket_size);
  TORCH_CHECK(numel >= grad.numel(), "commlib::ef_qsgd_quantize: numel is below grad's");
  const c10::cuda::CUDAGuard guard(grad.device());
  const int64_t buckets = (numel + bucket_size - 1) / bucket_size;
  at::Tensor codes = at::empty({(numel + 7) / 8 * bits}, grad.options().dtype(at::kByte));
  at::Tensor scales = at::empty({buckets}, grad.options().dtype(at::kFloat));
  if (numel == 0) return {codes, scales};
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_floats_cuda(grad.scalar_type(), "ef_qsgd_quantize", [&](auto tag) {
    using T = decltype(tag);
    ef_qsgd_quantize_kernel<T><<<buckets, kThreads, 0, stream>>>(
        grad.data_ptr<T>(), res ? res->data_ptr<T>() : nullptr, grad.numel(), numel, static_cast<int>(bits),
        bucket_size, seed_key(seed), codes.data_ptr<uint8_t>(), scales.data_ptr<float>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {codes, scales};
}

void ef_qsgd_residual_cuda(const at::Tensor& residual, const at::Tensor& grad, const at::Tensor& codes,
                           const at::Tensor& scales, int64_t bits, int64_t bucket_size, int64_t numel,
                           bool accumulate) {
  check_pair("commlib::ef_qsgd_residual_", grad, &residual);
  check_qsgd("commlib::ef_qsgd_residual_", bits, bucket_size);
  TORCH_CHECK(codes.numel() == (numel + 7) / 8 * bits && numel >= grad.numel() && codes.is_contiguous() &&
                  scales.is_contiguous(), "commlib::ef_qsgd_residual_: payload does not match numel");
  const c10::cuda::CUDAGuard guard(grad.device());
  const int64_t n = grad.numel();
  if (n == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_floats_cuda(grad.scalar_type(), "ef_qsgd_residual_", [&](auto tag) {
    using T = decltype(tag);
    ef_qsgd_residual_kernel<T><<<blocks_for(n, kThreads), kThreads, 0, stream>>>(
        residual.data_ptr<T>(), grad.data_ptr<T>(), n, codes.data_ptr<uint8_t>(), scales.data_ptr<float>(),
        static_cast<int>(bits), bucket_size, accumulate);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void qsgd_dequantize_into_cuda(const at::Tensor& out, const at::Tensor& codes, const at::Tensor& scales, int64_t bits,
                               int64_t bucket_size, int64_t numel, at::ScalarType dtype, bool accumulate) {
  check_qsgd("commlib::qsgd_dequantize_into_", bits, bucket_size);
  TORCH_CHECK(out.is_cuda() && out.is_contiguous() && out.numel() <= numel &&
                  codes.numel() == (numel + 7) / 8 * bits && codes.is_contiguous() && scales.is_contiguous(),
              "commlib::qsgd_dequantize_into_: out must be contiguous CUDA with at most numel elements");
  const c10::cuda::CUDAGuard guard(out.device());
  const int64_t n = out.numel();
  if (n == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_pair_cuda(out.scalar_type(), dtype, "qsgd_dequantize_into_", [&](auto o, auto p) {
    using O = decltype(o);
    using P = decltype(p);
    qsgd_dequantize_into_kernel<O, P><<<blocks_for(n, kThreads), kThreads, 0, stream>>>(
        out.data_ptr<O>(), n, codes.data_ptr<uint8_t>(), scales.data_ptr<float>(), static_cast<int>(bits),
        bucket_size, accumulate);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ------------------------------------------------------------------------------------------ sparse
template <typename T>
__global__ void ef_accumulate_kernel(T* __restrict__ e, const T* __restrict__ g, int64_t n, bool accumulate) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  e[i] = accumulate ? corrected_value(g[i], e[i]) : g[i];
}

// One thread walks the k (index, value) pairs in order: zero-valued padding may repeat an index,
// and subtracting in order is what the reference's scatter-add then subtract amounts to.
template <typename T, typename I>
__global__ void ef_subtract_sent_kernel(T* __restrict__ e, const I* __restrict__ idx, const T* __restrict__ val,
                                        int64_t k) {
  for (int64_t j = 0; j < k; ++j) e[idx[j]] = residual_value(e[idx[j]], static_cast<float>(val[j]));
}

template <typename T, typename I>
__global__ void ef_gather_kernel(const T* __restrict__ g, const T* __restrict__ e, const I* __restrict__ idx,
                                 int64_t k, T* __restrict__ values) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= k) return;
  const int64_t i = static_cast<int64_t>(idx[j]);
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

template <typename F>
void dispatch_indices_cuda(at::ScalarType type, const char* op, F&& f) {
  switch (type) {
    case at::kInt: f(int32_t{}); break;
    case at::kLong: f(int64_t{}); break;
    default: TORCH_CHECK(false, op, ": indices must be int32 or int64, got ", type);
  }
}

void ef_sparse_residual_cuda(const at::Tensor& residual, const at::Tensor& grad, const at::Tensor& indices_in,
                             const at::Tensor& values_in, bool accumulate) {
  check_pair("commlib::ef_sparse_residual_", grad, &residual);
  TORCH_CHECK(values_in.scalar_type() == grad.scalar_type() && values_in.numel() == indices_in.numel(),
              "commlib::ef_sparse_residual_: values must match grad's dtype and the indices' count");
  const c10::cuda::CUDAGuard guard(grad.device());
  const at::Tensor indices = indices_in.contiguous();
  const at::Tensor values = values_in.contiguous();
  const int64_t n = grad.numel();
  const int64_t k = indices.numel();
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_floats_cuda(grad.scalar_type(), "ef_sparse_residual_", [&](auto tag) {
    using T = decltype(tag);
    if (n > 0)
      ef_accumulate_kernel<T><<<blocks_for(n, kThreads), kThreads, 0, stream>>>(residual.data_ptr<T>(),
                                                                                grad.data_ptr<T>(), n, accumulate);
    dispatch_indices_cuda(indices.scalar_type(), "ef_sparse_residual_", [&](auto itag) {
      using I = decltype(itag);
      if (k > 0)
        ef_subtract_sent_kernel<T, I><<<1, 1, 0, stream>>>(residual.data_ptr<T>(), indices.data_ptr<I>(),
                                                           values.data_ptr<T>(), k);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> ef_gather_cuda(const at::Tensor& grad, const c10::optional<at::Tensor>& residual,
                                                  const at::Tensor& indices_in) {
  const at::Tensor* res = residual.has_value() ? &residual.value() : nullptr;
  check_pair("commlib::ef_gather", grad, res);
  const c10::cuda::CUDAGuard guard(grad.device());
  const at::Tensor indices = indices_in.contiguous();
  const int64_t n = grad.numel();
  const int64_t k = indices.numel();
  at::Tensor values = at::empty({k}, grad.options());
  at::Tensor worst = at::zeros({1}, grad.options().dtype(at::kInt));
  at::Tensor guard_out = at::empty({}, grad.options().dtype(at::kFloat));
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_floats_cuda(grad.scalar_type(), "ef_gather", [&](auto tag) {
    using T = decltype(tag);
    const T* e = res ? res->data_ptr<T>() : nullptr;
    unsigned int* worst_ptr = reinterpret_cast<unsigned int*>(worst.data_ptr<int32_t>());
    if (n > 0)
      ef_nonfinite_kernel<T><<<blocks_for(n, kThreads), kThreads, 0, stream>>>(grad.data_ptr<T>(), e, n, worst_ptr);
    ef_guard_kernel<<<1, 1, 0, stream>>>(worst_ptr, guard_out.data_ptr<float>());
    dispatch_indices_cuda(indices.scalar_type(), "ef_gather", [&](auto itag) {
      using I = decltype(itag);
      if (k > 0)
        ef_gather_kernel<T, I><<<blocks_for(k, kThreads), kThreads, 0, stream>>>(grad.data_ptr<T>(), e,
                                                                                 indices.data_ptr<I>(), k,
                                                                                 values.data_ptr<T>());
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {values, guard_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(commlib, CUDA, m) {
  m.impl("ef_sign_pack", &ef_sign_pack_cuda);
  m.impl("ef_sign_residual_", &ef_sign_residual_cuda);
  m.impl("sign_unpack_into_", &sign_unpack_into_cuda);
  m.impl("ef_qsgd_quantize", &ef_qsgd_quantize_cuda);
  m.impl("ef_qsgd_residual_", &ef_qsgd_residual_cuda);
  m.impl("qsgd_dequantize_into_", &qsgd_dequantize_into_cuda);
  m.impl("ef_sparse_residual_", &ef_sparse_residual_cuda);
  m.impl("ef_gather", &ef_gather_cuda);
}

}  // namespace commlib
