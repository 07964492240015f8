// Top-k by magnitude with a sampled threshold pre-filter (CPU, OpenMP).
// Reference: commlib/ops/sparse.py::topk_abs_reference.
//
// Order: by magnitude_key descending, ties by index ascending (NaN > inf > finite). Output
// indices are ascending. exact=true returns exactly that set; exact=false returns the first k
// elements (by index) whose key reaches the sampled threshold, padded with (index 0, value 0).
#include <algorithm>
#include <vector>

#include "common.h"

namespace commlib {
namespace {

constexpr int64_t kSamples = 65536;

// The values ranked: a tensor (PlainSource) or the error-feedback sum g + e (CorrectedSource).
template <typename scalar_t>
struct PlainSource {
  const scalar_t* x;
  inline scalar_t at(int64_t i) const { return x[i]; }
};

template <typename Src>
inline uint32_t key_at(const Src& x, int64_t i) {
  return magnitude_key(static_cast<float>(x.at(i)));
}

// The `rank`-th largest (1-based) of the sampled keys.
template <typename Src>
uint32_t sampled_threshold(const Src& x, int64_t n, int64_t m, int64_t rank) {
  std::vector<uint32_t> sample(static_cast<size_t>(m));
  for (int64_t j = 0; j < m; ++j) sample[j] = key_at(x, sample_position(j, n));
  rank = std::clamp<int64_t>(rank, 1, m);
  std::nth_element(sample.begin(), sample.begin() + (rank - 1), sample.end(), std::greater<uint32_t>());
  return sample[rank - 1];
}

// Indices (ascending) of all elements whose key >= threshold, collected per thread in order.
template <typename Src>
std::vector<int32_t> collect_at_least(const Src& x, int64_t n, uint32_t threshold) {
  const int threads = kernel_threads();
  std::vector<std::vector<int32_t>> local(threads);
#pragma omp parallel num_threads(threads)
  {
#if defined(_OPENMP)
    const int t = omp_get_thread_num();
    const int nt = omp_get_num_threads();
#else
    const int t = 0;
    const int nt = 1;
#endif
    const int64_t begin = n * t / nt;
    const int64_t end = n * (t + 1) / nt;
    std::vector<int32_t>& mine = local[t];
    for (int64_t i = begin; i < end; ++i)
      if (key_at(x, i) >= threshold) mine.push_back(static_cast<int32_t>(i));
  }
  size_t total = 0;
  for (const auto& v : local) total += v.size();
  std::vector<int32_t> out;
  out.reserve(total);
  for (const auto& v : local) out.insert(out.end(), v.begin(), v.end());
  return out;
}

// Composite order key: larger magnitude first, then smaller index.
inline uint64_t order_key(uint32_t key, int32_t index) {
  return (static_cast<uint64_t>(key) << 32) | (0xffffffffu - static_cast<uint32_t>(index));
}

template <typename Src>
std::vector<int32_t> exact_topk(const Src& x, int64_t n, int64_t k) {
  std::vector<int32_t> cand;
  if (n > 4 * kSamples && k * 16 < n) {
    // Rank with a safety margin of ~4 standard deviations of the sampled count.
    const double expected = static_cast<double>(k) * kSamples / static_cast<double>(n);
    const int64_t rank = static_cast<int64_t>(expected + 4.0 * std::sqrt(expected) + 16.0);
    cand = collect_at_least(x, n, sampled_threshold(x, n, kSamples, rank));
  }
  if (static_cast<int64_t>(cand.size()) < k) cand = collect_at_least(x, n, 0u);  // every element
  if (static_cast<int64_t>(cand.size()) == k) return cand;
  std::vector<uint64_t> keys(cand.size());
  for (size_t i = 0; i < cand.size(); ++i) keys[i] = order_key(key_at(x, cand[i]), cand[i]);
  std::vector<uint64_t> scratch(keys);
  std::nth_element(scratch.begin(), scratch.begin() + (k - 1), scratch.end(), std::greater<uint64_t>());
  const uint64_t kth = scratch[k - 1];
  std::vector<int32_t> out;
  out.reserve(static_cast<size_t>(k));
  for (size_t i = 0; i < cand.size(); ++i)
    if (keys[i] >= kth) out.push_back(cand[i]);
  return out;
}

template <typename Src>
std::vector<int32_t> threshold_topk(const Src& x, int64_t n, int64_t k) {
  const int64_t m = std::min(n, kSamples);
  const int64_t rank = (k * m + n - 1) / n;  // ceil(k m / n): expected count above the k-th value
  std::vector<int32_t> cand = collect_at_least(x, n, sampled_threshold(x, n, m, rank));
  if (static_cast<int64_t>(cand.size()) > k) cand.resize(static_cast<size_t>(k));
  return cand;  // may be shorter than k: the caller pads
}

template <typename scalar_t, typename Src>
void write_topk(const Src& src, int64_t n, int64_t k, bool exact, at::Tensor& values, at::Tensor& indices) {
  std::vector<int32_t> chosen = exact ? exact_topk(src, n, k) : threshold_topk(src, n, k);
  int32_t* idx = indices.data_ptr<int32_t>();
  scalar_t* val = values.data_ptr<scalar_t>();
  const int64_t real = static_cast<int64_t>(chosen.size());
  for (int64_t i = 0; i < real; ++i) {
    idx[i] = chosen[i];
    val[i] = src.at(chosen[i]);
  }
  for (int64_t i = real; i < k; ++i) {  // padding adds nothing when scattered with accumulate
    idx[i] = 0;
    val[i] = static_cast<scalar_t>(0.0f);
  }
}

std::tuple<at::Tensor, at::Tensor> topk_abs_cpu(const at::Tensor& x_in, int64_t k, bool exact) {
  COMMLIB_CHECK_FLOAT_INPUT("commlib::topk_abs", x_in);
  const at::Tensor x = x_in.contiguous().view(-1);
  const int64_t n = x.numel();
  TORCH_CHECK(k >= 0 && k <= n, "commlib::topk_abs: k must be in [0, ", n, "], got ", k);
  TORCH_CHECK(n < (int64_t{1} << 31), "commlib::topk_abs: int32 indices need numel < 2^31, got ", n);
  at::Tensor indices = at::empty({k}, x.options().dtype(at::kInt));
  at::Tensor values = at::empty({k}, x.options());
  if (k == 0) return {values, indices};
  dispatch_floats(x.scalar_type(), "topk_abs", [&](auto tag) {
    using scalar_t = decltype(tag);
    write_topk<scalar_t>(PlainSource<scalar_t>{x.data_ptr<scalar_t>()}, n, k, exact, values, indices);
  });
  return {values, indices};
}

// Fused error feedback, pass 1: topk_abs of v = g + e, computing v where it is read (the sampled
// threshold, one scan, the candidates) instead of materializing it.
std::tuple<at::Tensor, at::Tensor> ef_topk_abs_cpu(const at::Tensor& grad, const c10::optional<at::Tensor>& residual,
                                                   int64_t k, bool exact) {
  const at::Tensor* res = residual.has_value() ? &residual.value() : nullptr;
  check_ef_pair("commlib::ef_topk_abs", grad, res);
  const int64_t n = grad.numel();
  TORCH_CHECK(k >= 0 && k <= n, "commlib::ef_topk_abs: k must be in [0, ", n, "], got ", k);
  TORCH_CHECK(n < (int64_t{1} << 31), "commlib::ef_topk_abs: int32 indices need numel < 2^31, got ", n);
  at::Tensor indices = at::empty({k}, grad.options().dtype(at::kInt));
  at::Tensor values = at::empty({k}, grad.options());
  if (k == 0) return {values, indices};
  dispatch_floats(grad.scalar_type(), "ef_topk_abs", [&](auto tag) {
    using scalar_t = decltype(tag);
    const CorrectedSource<scalar_t> src{grad.data_ptr<scalar_t>(), res ? res->data_ptr<scalar_t>() : nullptr, n};
    write_topk<scalar_t>(src, n, k, exact, values, indices);
  });
  return {values, indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(commlib, CPU, m) {
  m.impl("topk_abs", &topk_abs_cpu);
  m.impl("ef_topk_abs", &ef_topk_abs_cpu);
}

}  // namespace commlib
