// QSGD-style b-bit stochastic quantization (CUDA). Same layout and element logic as
// csrc/cpu/qsgd.cpp: one block per bucket (max-reduce, then one thread per group of 8 codes).
#include "common.cuh"
#include "kernels/qsgd.cuh"

namespace commlib {
namespace {

using namespace kernels;

void check_args(const char* op, int64_t bits, int64_t bucket_size) {
  TORCH_CHECK(bits >= 1 && bits <= 8, op, ": bits must be in [1, 8], got ", bits);
  TORCH_CHECK(bucket_size >= 8 && bucket_size % 8 == 0, op, ": bucket_size must be a positive multiple of 8, got ",
              bucket_size);
}

std::tuple<at::Tensor, at::Tensor> qsgd_quantize_cuda(const at::Tensor& x_in, int64_t bits, int64_t bucket_size,
                                                      int64_t seed) {
  TORCH_CHECK(x_in.is_cuda(), "commlib::qsgd_quantize: expected a CUDA tensor");
  check_args("commlib::qsgd_quantize", bits, bucket_size);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous().view(-1);
  const int64_t n = x.numel();
  const int64_t buckets = (n + bucket_size - 1) / bucket_size;
  at::Tensor codes = at::empty({(n + 7) / 8 * bits}, x.options().dtype(at::kByte));
  at::Tensor scales = at::empty({buckets}, x.options().dtype(at::kFloat));
  if (n == 0) return {codes, scales};
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_floats_cuda(x.scalar_type(), "qsgd_quantize", [&](auto tag) {
    using T = decltype(tag);
    qsgd_quantize_kernel<T><<<buckets, kThreads, 0, stream>>>(x.data_ptr<T>(), n, static_cast<int>(bits),
                                                              bucket_size, seed_key(seed), codes.data_ptr<uint8_t>(),
                                                              scales.data_ptr<float>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {codes, scales};
}

at::Tensor qsgd_dequantize_cuda(const at::Tensor& codes_in, const at::Tensor& scales_in, int64_t bits,
                                int64_t bucket_size, int64_t numel, at::ScalarType dtype) {
  check_args("commlib::qsgd_dequantize", bits, bucket_size);
  TORCH_CHECK(codes_in.is_cuda() && scales_in.is_cuda(), "commlib::qsgd_dequantize: expected CUDA tensors");
  check_device("commlib::qsgd_dequantize", codes_in, {&scales_in});
  TORCH_CHECK(codes_in.scalar_type() == at::kByte && scales_in.scalar_type() == at::kFloat,
              "commlib::qsgd_dequantize: codes must be uint8 and scales float32");
  TORCH_CHECK(codes_in.numel() == (numel + 7) / 8 * bits, "commlib::qsgd_dequantize: code bytes do not match numel");
  TORCH_CHECK(scales_in.numel() == (numel + bucket_size - 1) / bucket_size,
              "commlib::qsgd_dequantize: wrong number of scales");
  const c10::cuda::CUDAGuard guard(codes_in.device());
  const at::Tensor codes = codes_in.contiguous();
  const at::Tensor scales = scales_in.contiguous();
  at::Tensor out = at::empty({numel}, codes.options().dtype(dtype));
  if (numel == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t groups = (numel + 7) / 8;
  dispatch_floats_cuda(dtype, "qsgd_dequantize", [&](auto tag) {
    using T = decltype(tag);
    qsgd_dequantize_kernel<T><<<blocks_for(groups, kThreads), kThreads, 0, stream>>>(
        codes.data_ptr<uint8_t>(), scales.data_ptr<float>(), static_cast<int>(bits), bucket_size, numel,
        out.data_ptr<T>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(commlib, CUDA, m) {
  m.impl("qsgd_quantize", &qsgd_quantize_cuda);
  m.impl("qsgd_dequantize", &qsgd_dequantize_cuda);
}

}  // namespace commlib
