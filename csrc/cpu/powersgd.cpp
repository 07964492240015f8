// PowerSGD's two full passes over a gradient matrix, fused (CPU, OpenMP). Reference:
// commlib/ops/powersgd.py::powersgd_project_reference / powersgd_backproject_reference.
//
//   project:      M = G + E (written to `m`) and P = M Q in the same pass (Vogels et al. 2019, Alg. 1
//                 lines 3-4): each row of M is formed, stays in L1, and is dotted with the r columns
//                 of Q, so M is read once instead of twice.
//   backproject_: hat = P Q^T is written to `out` (the gradient the step applies) and M <- M - hat
//                 (the new error-feedback residual, Alg. 1 line 9) in one pass.
// Float32 only (the hook keeps other dtypes on torch's matmuls). Accumulation is float32 in k
// order, so results equal BLAS's to within r ulps of sum |p_k q_k| (the tests bound it).
#include <vector>

#include "common.h"

namespace commlib {
namespace {

void check_matrices(const char* op, const at::Tensor& m, const at::Tensor& q) {
  TORCH_CHECK(m.device().is_cpu() && q.device().is_cpu(), op, ": expected CPU tensors");
  TORCH_CHECK(m.scalar_type() == at::kFloat && q.scalar_type() == at::kFloat, op, ": expected float32 tensors");
  TORCH_CHECK(m.dim() == 2 && q.dim() == 2 && q.size(0) == m.size(1), op, ": shapes ", m.sizes(), " and ",
              q.sizes(), " do not chain (M is rows x cols, Q is cols x r)");
  TORCH_CHECK(m.is_contiguous(), op, ": matrices must be contiguous");
}

// Q^T as r contiguous rows of length cols: the inner loops then run over contiguous memory.
std::vector<float> transposed(const at::Tensor& q_in) {
  const at::Tensor q = q_in.contiguous();
  const int64_t cols = q.size(0), r = q.size(1);
  std::vector<float> qt(static_cast<size_t>(cols * r));
  const float* src = q.data_ptr<float>();
  for (int64_t j = 0; j < cols; ++j)
    for (int64_t k = 0; k < r; ++k) qt[k * cols + j] = src[j * r + k];
  return qt;
}

// 16 independent partial sums (one per SIMD lane; a single running sum would not vectorize
// without reassociating), combined pairwise at the end.
COMMLIB_CPU_CLONES float dot(const float* a, const float* b, int64_t n) {
  constexpr int64_t kLanes = 16;
  float acc[kLanes] = {};
  const int64_t full = n / kLanes * kLanes;
  for (int64_t j = 0; j < full; j += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) acc[l] += a[j + l] * b[j + l];
  for (int64_t j = full; j < n; ++j) acc[j - full] += a[j] * b[j];
  for (int64_t width = kLanes / 2; width > 0; width /= 2)
    for (int64_t l = 0; l < width; ++l) acc[l] += acc[l + width];
  return acc[0];
}

COMMLIB_CPU_CLONES void form_row(const float* g, const float* e, float* m, int64_t n) {
  if (e == nullptr) {
    std::memcpy(m, g, static_cast<size_t>(n) * sizeof(float));
  } else {
    for (int64_t j = 0; j < n; ++j) m[j] = g[j] + e[j];
  }
}

// One row of the back-projection: out_j = sum_k p_k qt[k][j] (k in order), m_j -= out_j.
// R fixed at compile time keeps the k loop unrolled so the j loop vectorizes.
template <int R>
inline void backproject_row_fixed(const float* p, const float* qt, int64_t cols, float* __restrict__ out,
                                  float* __restrict__ m) {
  float coef[R];
  const float* __restrict__ rows[R];
  for (int k = 0; k < R; ++k) {
    coef[k] = p[k];
    rows[k] = qt + k * cols;
  }
  for (int64_t j = 0; j < cols; ++j) {
    float hat = coef[0] * rows[0][j];
    for (int k = 1; k < R; ++k) hat += coef[k] * rows[k][j];
    out[j] = hat;
    m[j] -= hat;
  }
}

COMMLIB_CPU_CLONES void backproject_row(const float* p, const float* qt, int64_t r, int64_t cols, float* out,
                                        float* m) {
  switch (r) {
    case 1: return backproject_row_fixed<1>(p, qt, cols, out, m);
    case 2: return backproject_row_fixed<2>(p, qt, cols, out, m);
    case 4: return backproject_row_fixed<4>(p, qt, cols, out, m);
    case 8: return backproject_row_fixed<8>(p, qt, cols, out, m);
    default: break;
  }
  // any other r: accumulate into out over k (same order: p_0 q_0 first), then subtract
  for (int64_t j = 0; j < cols; ++j) out[j] = p[0] * qt[j];
  for (int64_t k = 1; k < r; ++k) {
    const float c = p[k];
    const float* __restrict__ row = qt + k * cols;
    for (int64_t j = 0; j < cols; ++j) out[j] += c * row[j];
  }
  for (int64_t j = 0; j < cols; ++j) m[j] -= out[j];
}

at::Tensor powersgd_project_cpu(const at::Tensor& grad, const c10::optional<at::Tensor>& residual,
                                const at::Tensor& q, const at::Tensor& m) {
  check_matrices("commlib::powersgd_project", grad, q);
  TORCH_CHECK(m.sizes() == grad.sizes() && m.scalar_type() == at::kFloat && m.is_contiguous(),
              "commlib::powersgd_project: m must be a contiguous float32 matrix shaped like grad");
  if (residual.has_value())
    TORCH_CHECK(residual->sizes() == grad.sizes() && residual->scalar_type() == at::kFloat &&
                    residual->is_contiguous(),
                "commlib::powersgd_project: residual must be a contiguous float32 matrix shaped like grad");
  const int64_t rows = grad.size(0), cols = grad.size(1), r = q.size(1);
  at::Tensor p = at::empty({rows, r}, grad.options());
  const std::vector<float> qt = transposed(q);
  const float* g = grad.data_ptr<float>();
  const float* e = residual.has_value() ? residual->data_ptr<float>() : nullptr;
  float* mp = m.data_ptr<float>();
  float* pp = p.data_ptr<float>();
#pragma omp parallel for schedule(static) num_threads(kernel_threads())
  for (int64_t i = 0; i < rows; ++i) {
    float* row = mp + i * cols;
    form_row(g + i * cols, e == nullptr ? nullptr : e + i * cols, row, cols);
    for (int64_t k = 0; k < r; ++k) pp[i * r + k] = dot(row, qt.data() + k * cols, cols);
  }
  return p;
}

void powersgd_backproject_cpu(const at::Tensor& m, const at::Tensor& p_in, const at::Tensor& q,
                              const at::Tensor& out) {
  check_matrices("commlib::powersgd_backproject_", m, q);
  const at::Tensor p = p_in.contiguous();
  const int64_t rows = m.size(0), cols = m.size(1), r = q.size(1);
  TORCH_CHECK(p.scalar_type() == at::kFloat && p.dim() == 2 && p.size(0) == rows && p.size(1) == r,
              "commlib::powersgd_backproject_: p must be float32 of shape (", rows, ", ", r, ")");
  TORCH_CHECK(out.sizes() == m.sizes() && out.scalar_type() == at::kFloat && out.is_contiguous(),
              "commlib::powersgd_backproject_: out must be a contiguous float32 matrix shaped like m");
  const std::vector<float> qt = transposed(q);
  float* mp = m.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float* pp = p.data_ptr<float>();
#pragma omp parallel for schedule(static) num_threads(kernel_threads())
  for (int64_t i = 0; i < rows; ++i) backproject_row(pp + i * r, qt.data(), r, cols, op + i * cols, mp + i * cols);
}

}  // namespace

TORCH_LIBRARY_IMPL(commlib, CPU, m) {
  m.impl("powersgd_project", &powersgd_project_cpu);
  m.impl("powersgd_backproject_", &powersgd_backproject_cpu);
}

}  // namespace commlib
