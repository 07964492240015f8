// Fused error feedback and decompression in place (CUDA twins of the EF ops in csrc/cpu/sign.cpp,
// qsgd.cpp and ef_sparse.cpp). Element logic: elementwise.h (corrected_value, residual_value,
// signed_scale, qsgd_code/qsgd_value), shared with the CPU kernels. ef_topk_abs has no CUDA kernel
// (neither has topk_abs): the reference composite serves CUDA tensors.
#include "common.cuh"
#include "kernels/ef.cuh"

namespace commlib {
namespace {

using namespace kernels;

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
  check_device("commlib::ef_sign_residual_", grad, {&residual, &packed, &scales});
  check_scales("commlib::ef_sign_residual_", scales, sign_scale_count(chunk_size, numel));
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
  check_device("commlib::sign_unpack_into_", out, {&packed, &scales});
  check_scales("commlib::sign_unpack_into_", scales, sign_scale_count(chunk_size, numel));
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
  check_device("commlib::ef_qsgd_residual_", grad, {&residual, &codes, &scales});
  check_scales("commlib::ef_qsgd_residual_", scales, (numel + bucket_size - 1) / bucket_size);
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
  check_device("commlib::qsgd_dequantize_into_", out, {&codes, &scales});
  check_scales("commlib::qsgd_dequantize_into_", scales, (numel + bucket_size - 1) / bucket_size);
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
  check_device("commlib::ef_sparse_residual_", grad, {&residual, &indices_in, &values_in});
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
                                                           values.data_ptr<T>(), k, n);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> ef_gather_cuda(const at::Tensor& grad, const c10::optional<at::Tensor>& residual,
                                                  const at::Tensor& indices_in) {
  const at::Tensor* res = residual.has_value() ? &residual.value() : nullptr;
  check_pair("commlib::ef_gather", grad, res);
  check_device("commlib::ef_gather", grad, {&indices_in});
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
                                                                                 indices.data_ptr<I>(), k, n,
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
