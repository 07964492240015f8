// 1-bit sign packing with per-chunk mean-|x| scales (CUDA). Element logic: elementwise.h.
// One thread per 32-value word; per-chunk |x| sums accumulate in float64 atomics.
#include "common.cuh"
#include "kernels/sign.cuh"

namespace commlib {
namespace {

using namespace kernels;

std::tuple<at::Tensor, at::Tensor> sign_pack_cuda(const at::Tensor& x_in, int64_t chunk_size) {
  TORCH_CHECK(x_in.is_cuda(), "commlib::sign_pack: expected a CUDA tensor");
  TORCH_CHECK(chunk_size >= 0 && chunk_size % 32 == 0, "commlib::sign_pack: bad chunk_size ", chunk_size);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous().view(-1);
  const int64_t n = x.numel();
  const int64_t words = (n + 31) / 32;
  const int64_t chunk = (chunk_size == 0 || chunk_size >= n) ? std::max<int64_t>(n, 1) : chunk_size;
  const int64_t chunks = n == 0 ? 0 : (n + chunk - 1) / chunk;
  at::Tensor packed = at::empty({words}, x.options().dtype(at::kInt));
  at::Tensor sums = at::zeros({chunks}, x.options().dtype(at::kDouble));
  at::Tensor scales = at::empty({chunks}, x.options().dtype(at::kFloat));
  if (n == 0) return {packed, scales};
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_floats_cuda(x.scalar_type(), "sign_pack", [&](auto tag) {
    using T = decltype(tag);
    sign_pack_kernel<T><<<blocks_for(words, kThreads), kThreads, 0, stream>>>(
        x.data_ptr<T>(), n, (chunk + 31) / 32, reinterpret_cast<uint32_t*>(packed.data_ptr<int32_t>()),
        sums.data_ptr<double>());
  });
  finish_scales_kernel<<<blocks_for(chunks, kThreads), kThreads, 0, stream>>>(sums.data_ptr<double>(), chunks,
                                                                               chunk, n, scales.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {packed, scales};
}

at::Tensor sign_unpack_cuda(const at::Tensor& packed_in, const at::Tensor& scales_in, int64_t numel,
                            int64_t chunk_size, at::ScalarType dtype) {
  TORCH_CHECK(packed_in.is_cuda() && scales_in.is_cuda(), "commlib::sign_unpack: expected CUDA tensors");
  check_device("commlib::sign_unpack", packed_in, {&scales_in});
  TORCH_CHECK(packed_in.scalar_type() == at::kInt && scales_in.scalar_type() == at::kFloat,
              "commlib::sign_unpack: packed must be int32 and scales float32");
  TORCH_CHECK(packed_in.numel() == (numel + 31) / 32, "commlib::sign_unpack: packed size does not match numel");
  const c10::cuda::CUDAGuard guard(packed_in.device());
  const int64_t chunk = (chunk_size == 0 || chunk_size >= numel) ? std::max<int64_t>(numel, 1) : chunk_size;
  const int64_t chunks = numel == 0 ? 0 : (numel + chunk - 1) / chunk;
  TORCH_CHECK(scales_in.numel() == chunks, "commlib::sign_unpack: expected ", chunks, " scales");
  const at::Tensor packed = packed_in.contiguous();
  const at::Tensor scales = scales_in.contiguous();
  at::Tensor out = at::empty({numel}, packed.options().dtype(dtype));
  if (numel == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_floats_cuda(dtype, "sign_unpack", [&](auto tag) {
    using T = decltype(tag);
    sign_unpack_kernel<T><<<blocks_for(numel, kThreads), kThreads, 0, stream>>>(
        reinterpret_cast<const uint32_t*>(packed.data_ptr<int32_t>()), scales.data_ptr<float>(), numel, chunk,
        out.data_ptr<T>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(commlib, CUDA, m) {
  m.impl("sign_pack", &sign_pack_cuda);
  m.impl("sign_unpack", &sign_unpack_cuda);
}

}  // namespace commlib
