// Error feedback for the sparsifiers (top-k, random-k), CPU. Reference:
// commlib/ops/sparse.py::ef_sparse_residual_reference / ef_gather_reference.
#include "common.h"

namespace commlib {
namespace {

template <typename F>
void dispatch_indices(at::ScalarType type, const char* op, F&& f) {
  switch (type) {
    case at::kInt: f(int32_t{}); break;
    case at::kLong: f(int64_t{}); break;
    default: TORCH_CHECK(false, op, ": indices must be int32 or int64, got ", type);
  }
}

// Every index in [0, n), checked before any output is written (a bad one leaves it as it was).
void check_indices(const char* op, const at::Tensor& indices, int64_t n) {
  dispatch_indices(indices.scalar_type(), op, [&](auto index_tag) {
    using index_t = decltype(index_tag);
    const index_t* idx = indices.data_ptr<index_t>();
    for (int64_t j = 0; j < indices.numel(); ++j) {
      const int64_t i = static_cast<int64_t>(idx[j]);
      TORCH_CHECK(i >= 0 && i < n, op, ": index ", i, " out of range [0, ", n, ")");
    }
  });
}

// The exponent field of a float32: all ones exactly for inf and NaN.
inline uint32_t exponent_bits(float v) { return float_bits(v) & 0x7f800000u; }

// Pass 2 (after the collective, only if the step is kept): e <- (g + e) - scatter_add(values at
// indices), in place. Indices are distinct except zero-valued padding (top-k's threshold mode),
// for which subtracting one value at a time equals subtracting their sum.
void ef_sparse_residual_cpu(const at::Tensor& residual, const at::Tensor& grad, const at::Tensor& indices_in,
                            const at::Tensor& values_in, bool accumulate) {
  check_ef_pair("commlib::ef_sparse_residual_", grad, &residual);
  TORCH_CHECK(values_in.scalar_type() == grad.scalar_type() && values_in.numel() == indices_in.numel(),
              "commlib::ef_sparse_residual_: values must match grad's dtype and the indices' count");
  const at::Tensor indices = indices_in.contiguous();
  const at::Tensor values = values_in.contiguous();
  const int64_t n = grad.numel();
  const int64_t k = indices.numel();
  check_indices("commlib::ef_sparse_residual_", indices, n);  // before the residual is touched
  dispatch_floats(grad.scalar_type(), "ef_sparse_residual_", [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* g = grad.data_ptr<scalar_t>();
    scalar_t* e = residual.data_ptr<scalar_t>();
    if (accumulate) {
#pragma omp parallel for schedule(static) num_threads(kernel_threads())
      for (int64_t i = 0; i < n; ++i) e[i] = corrected_value(g[i], e[i]);
    } else {
      std::memcpy(e, g, static_cast<size_t>(n) * sizeof(scalar_t));
    }
    const scalar_t* val = values.data_ptr<scalar_t>();
    dispatch_indices(indices.scalar_type(), "ef_sparse_residual_", [&](auto index_tag) {
      using index_t = decltype(index_tag);
      const index_t* idx = indices.data_ptr<index_t>();
      for (int64_t j = 0; j < k; ++j) {
        const int64_t i = static_cast<int64_t>(idx[j]);
        e[i] = residual_value(e[i], static_cast<float>(val[j]));
      }
    });
  });
}

// Pass 1 of random-k: the values of v = g + e at the shared indices, and a guard that is 0 when
// every value of v is finite and NaN otherwise (an overflow outside the sample must still travel).
std::tuple<at::Tensor, at::Tensor> ef_gather_cpu(const at::Tensor& grad, const c10::optional<at::Tensor>& residual,
                                                 const at::Tensor& indices_in) {
  const at::Tensor* res = residual.has_value() ? &residual.value() : nullptr;
  check_ef_pair("commlib::ef_gather", grad, res);
  const at::Tensor indices = indices_in.contiguous();
  const int64_t n = grad.numel();
  const int64_t k = indices.numel();
  check_indices("commlib::ef_gather", indices, n);
  at::Tensor values = at::empty({k}, grad.options());
  at::Tensor guard = at::empty({}, grad.options().dtype(at::kFloat));
  dispatch_floats(grad.scalar_type(), "ef_gather", [&](auto tag) {
    using scalar_t = decltype(tag);
    const CorrectedSource<scalar_t> src{grad.data_ptr<scalar_t>(), res ? res->data_ptr<scalar_t>() : nullptr, n};
    uint32_t worst = 0;
#pragma omp parallel for schedule(static) num_threads(kernel_threads()) reduction(max : worst)
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t b = exponent_bits(static_cast<float>(src.at(i)));
      worst = b > worst ? b : worst;
    }
    guard.fill_(worst == 0x7f800000u ? std::numeric_limits<float>::quiet_NaN() : 0.0f);
    scalar_t* val = values.data_ptr<scalar_t>();
    dispatch_indices(indices.scalar_type(), "ef_gather", [&](auto index_tag) {
      using index_t = decltype(index_tag);
      const index_t* idx = indices.data_ptr<index_t>();
      for (int64_t j = 0; j < k; ++j) val[j] = src.at(static_cast<int64_t>(idx[j]));
    });
  });
  return {values, guard};
}

}  // namespace

TORCH_LIBRARY_IMPL(commlib, CPU, m) {
  m.impl("ef_sparse_residual_", &ef_sparse_residual_cpu);
  m.impl("ef_gather", &ef_gather_cpu);
}

}  // namespace commlib
