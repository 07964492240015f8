// PowerSGD's two passes over a gradient matrix, fused (CUDA twin of csrc/cpu/powersgd.cpp):
// project (M = G + E with P = M Q) and backproject_ (out = P Q^T, M <- M - P Q^T). Float32 only.
#include "common.cuh"
#include "kernels/powersgd.cuh"

namespace commlib {
namespace {

using namespace kernels;

void check(const char* op, const at::Tensor& m, const at::Tensor& q) {
  TORCH_CHECK(m.is_cuda() && q.is_cuda() && m.scalar_type() == at::kFloat && q.scalar_type() == at::kFloat, op,
              ": expected float32 CUDA tensors");
  TORCH_CHECK(m.dim() == 2 && q.dim() == 2 && q.size(0) == m.size(1) && m.is_contiguous(), op,
              ": M (rows x cols, contiguous) and Q (cols x r) do not chain");
}

at::Tensor powersgd_project_cuda(const at::Tensor& grad, const c10::optional<at::Tensor>& residual,
                                 const at::Tensor& q_in, const at::Tensor& m) {
  check("commlib::powersgd_project", grad, q_in);
  TORCH_CHECK(m.sizes() == grad.sizes() && m.is_contiguous() && m.scalar_type() == at::kFloat,
              "commlib::powersgd_project: m must be a contiguous float32 matrix shaped like grad");
  if (residual.has_value())
    TORCH_CHECK(residual->sizes() == grad.sizes() && residual->is_contiguous() &&
                    residual->scalar_type() == at::kFloat,
                "commlib::powersgd_project: residual must be a contiguous float32 matrix shaped like grad");
  check_device("commlib::powersgd_project", grad, {&q_in, &m, residual.has_value() ? &residual.value() : nullptr});
  const c10::cuda::CUDAGuard guard(grad.device());
  const at::Tensor q = q_in.contiguous();
  const int64_t rows = grad.size(0), cols = grad.size(1), r = q.size(1);
  at::Tensor p = at::empty({rows, r}, grad.options());
  if (rows == 0 || r == 0) return p;
  auto stream = c10::cuda::getCurrentCUDAStream();
  powersgd_project_kernel<<<rows, kThreads, r * kThreads * sizeof(float), stream>>>(
      grad.data_ptr<float>(), residual.has_value() ? residual->data_ptr<float>() : nullptr, q.data_ptr<float>(), cols,
      r, m.data_ptr<float>(), p.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return p;
}

void powersgd_backproject_cuda(const at::Tensor& m, const at::Tensor& p_in, const at::Tensor& q_in,
                               const at::Tensor& out) {
  check("commlib::powersgd_backproject_", m, q_in);
  TORCH_CHECK(out.sizes() == m.sizes() && out.is_contiguous() && out.scalar_type() == at::kFloat,
              "commlib::powersgd_backproject_: out must be a contiguous float32 matrix shaped like m");
  check_device("commlib::powersgd_backproject_", m, {&p_in, &q_in, &out});
  const c10::cuda::CUDAGuard guard(m.device());
  const at::Tensor p = p_in.contiguous();
  const at::Tensor q = q_in.contiguous();
  const int64_t rows = m.size(0), cols = m.size(1), r = q.size(1);
  TORCH_CHECK(p.dim() == 2 && p.size(0) == rows && p.size(1) == r, "commlib::powersgd_backproject_: bad p shape");
  if (rows * cols == 0 || r == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  powersgd_backproject_kernel<<<blocks_for(rows * cols, kThreads), kThreads, 0, stream>>>(
      m.data_ptr<float>(), p.data_ptr<float>(), q.data_ptr<float>(), rows, cols, r, out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(commlib, CUDA, m) {
  m.impl("powersgd_project", &powersgd_project_cuda);
  m.impl("powersgd_backproject_", &powersgd_backproject_cuda);
}

}  // namespace commlib
