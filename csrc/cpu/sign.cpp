// 1-bit sign packing with per-chunk mean-|x| scales (CPU, OpenMP).
// Reference: commlib/ops/sign.py::sign_pack_reference / sign_unpack_reference.
#include "common.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace commlib {
namespace {

int64_t words_for(int64_t numel) { return (numel + 31) / 32; }

// Packs 32 signs of a full fp32 word-group and adds their |x| to `abs_sum`.
inline uint32_t pack_word_f32(const float* p, double& abs_sum) {
  uint32_t word = 0;
#if defined(__SSE2__)
  const __m128 abs_mask = _mm_castsi128_ps(_mm_set1_epi32(0x7fffffff));
  __m128 acc = _mm_setzero_ps();
  for (int j = 0; j < 32; j += 4) {
    const __m128 v = _mm_loadu_ps(p + j);
    word |= static_cast<uint32_t>(_mm_movemask_ps(v)) << j;
    acc = _mm_add_ps(acc, _mm_and_ps(v, abs_mask));
  }
  alignas(16) float lanes[4];
  _mm_store_ps(lanes, acc);
  double sum = (static_cast<double>(lanes[0]) + lanes[1]) + (static_cast<double>(lanes[2]) + lanes[3]);
#else
  float acc = 0.0f;
  for (int j = 0; j < 32; ++j) {
    word |= sign_bit(p[j]) << j;
    acc += std::fabs(p[j]);
  }
  double sum = acc;
#endif
  if (!std::isfinite(sum)) {  // float lanes overflowed (|x| near FLT_MAX): redo in double like the reference
    sum = 0.0;
    for (int j = 0; j < 32; ++j) sum += std::fabs(static_cast<double>(p[j]));
  }
  abs_sum += sum;
  return word;
}

template <typename scalar_t>
inline uint32_t pack_word_generic(const scalar_t* p, int count, double& abs_sum) {
  uint32_t word = 0;
  for (int j = 0; j < count; ++j) {
    const float v = static_cast<float>(p[j]);
    word |= sign_bit(v) << j;
    abs_sum += std::fabs(v);
  }
  return word;
}

// Full words of one chunk to float32: the scale with its sign bit flipped where the bit is set
// (bit-identical to signed_scale), written as a branch-free loop that vectorizes.
COMMLIB_CPU_CLONES void unpack_words_f32(const uint32_t* words, int64_t count, uint32_t scale_bits, uint32_t* out) {
  for (int64_t w = 0; w < count; ++w) {
    const uint32_t word = words[w];
    for (int j = 0; j < 32; ++j) out[w * 32 + j] = scale_bits ^ (((word >> j) & 1u) << 31);
  }
}

// chunk_size is a multiple of 32 (checked), so every chunk is a whole number of words.
std::tuple<at::Tensor, at::Tensor> sign_pack_cpu(const at::Tensor& x_in, int64_t chunk_size) {
  COMMLIB_CHECK_FLOAT_INPUT("commlib::sign_pack", x_in);
  TORCH_CHECK(chunk_size >= 0 && chunk_size % 32 == 0,
              "commlib::sign_pack: chunk_size must be 0 (whole tensor) or a positive multiple of 32, got ",
              chunk_size);
  const at::Tensor x = x_in.contiguous().view(-1);
  const int64_t n = x.numel();
  const int64_t words = words_for(n);
  const int64_t chunk = (chunk_size == 0 || chunk_size >= n) ? std::max<int64_t>(n, 1) : chunk_size;
  const int64_t chunks = n == 0 ? 0 : (n + chunk - 1) / chunk;
  const int64_t words_per_chunk = (chunk + 31) / 32;
  at::Tensor packed = at::empty({words}, x.options().dtype(at::kInt));
  at::Tensor scales = at::empty({chunks}, x.options().dtype(at::kFloat));
  uint32_t* out = reinterpret_cast<uint32_t*>(packed.data_ptr<int32_t>());
  float* scale_out = scales.data_ptr<float>();

  dispatch_floats(x.scalar_type(), "sign_pack", [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* in = x.data_ptr<scalar_t>();
    // Parallel over chunks when there are many, else over words inside the single chunk.
    const bool over_chunks = chunks >= 2 * kernel_threads();
#pragma omp parallel for schedule(static) num_threads(kernel_threads()) if (over_chunks)
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t w_begin = c * words_per_chunk;
      const int64_t w_end = std::min(words, w_begin + words_per_chunk);
      double abs_sum = 0.0;
#pragma omp parallel for schedule(static) num_threads(kernel_threads()) reduction(+ : abs_sum) if (!over_chunks)
      for (int64_t w = w_begin; w < w_end; ++w) {
        const int64_t base = w * 32;
        const int count = static_cast<int>(std::min<int64_t>(32, n - base));
        if constexpr (std::is_same_v<scalar_t, float>) {
          out[w] = count == 32 ? pack_word_f32(in + base, abs_sum) : pack_word_generic(in + base, count, abs_sum);
        } else {
          out[w] = pack_word_generic(in + base, count, abs_sum);
        }
      }
      const int64_t count = std::min(n, (c + 1) * chunk) - c * chunk;
      scale_out[c] = static_cast<float>(abs_sum / static_cast<double>(count));
    }
  });
  return {packed, scales};
}

at::Tensor sign_unpack_cpu(const at::Tensor& packed_in, const at::Tensor& scales_in, int64_t numel,
                           int64_t chunk_size, at::ScalarType dtype) {
  TORCH_CHECK(packed_in.scalar_type() == at::kInt, "commlib::sign_unpack: packed must be int32");
  TORCH_CHECK(scales_in.scalar_type() == at::kFloat, "commlib::sign_unpack: scales must be float32");
  TORCH_CHECK(numel >= 0 && packed_in.numel() == words_for(numel),
              "commlib::sign_unpack: packed has ", packed_in.numel(), " words, expected ", words_for(numel));
  TORCH_CHECK(chunk_size >= 0 && chunk_size % 32 == 0, "commlib::sign_unpack: bad chunk_size ", chunk_size);
  const int64_t chunk = (chunk_size == 0 || chunk_size >= numel) ? std::max<int64_t>(numel, 1) : chunk_size;
  const int64_t chunks = numel == 0 ? 0 : (numel + chunk - 1) / chunk;
  TORCH_CHECK(scales_in.numel() == chunks, "commlib::sign_unpack: expected ", chunks, " scales, got ",
              scales_in.numel());
  const at::Tensor packed = packed_in.contiguous();
  const at::Tensor scales = scales_in.contiguous();
  at::Tensor out = at::empty({numel}, packed.options().dtype(dtype));
  const uint32_t* words = reinterpret_cast<const uint32_t*>(packed.data_ptr<int32_t>());
  const float* scale_in = scales.data_ptr<float>();
  const int64_t n_words = words_for(numel);
  const int64_t words_per_chunk = (chunk + 31) / 32;

  const int64_t full_words = numel / 32;
  dispatch_floats(dtype, "sign_unpack", [&](auto tag) {
    using scalar_t = decltype(tag);
    scalar_t* o = out.data_ptr<scalar_t>();
    constexpr int64_t kWordsPerTask = 256;
    const int64_t tasks = (n_words + kWordsPerTask - 1) / kWordsPerTask;
#pragma omp parallel for schedule(static) num_threads(kernel_threads())
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t w_end = std::min(n_words, (task + 1) * kWordsPerTask);
      for (int64_t w = task * kWordsPerTask; w < w_end;) {
        const float s = scale_in[w / words_per_chunk];
        // the run of words [w, run_end) shares one scale and holds 32 values each
        const int64_t run_end = std::min({w_end, (w / words_per_chunk + 1) * words_per_chunk, full_words});
        if constexpr (std::is_same_v<scalar_t, float>) {
          if (run_end > w) {
            uint32_t scale_bits;
            std::memcpy(&scale_bits, &s, sizeof(scale_bits));
            unpack_words_f32(words + w, run_end - w, scale_bits, reinterpret_cast<uint32_t*>(o + w * 32));
            w = run_end;
            continue;
          }
        }
        const int64_t base = w * 32;
        const int count = static_cast<int>(std::min<int64_t>(32, numel - base));
        for (int j = 0; j < count; ++j) o[base + j] = static_cast<scalar_t>(signed_scale(words[w], j, s));
        ++w;
      }
    }
  });
  return out;
}

// Fused error feedback, pass 1 (before the collective): the signs and scales of
// v = pad(g + e, numel) without materializing v; equal to sign_pack of the materialized v.
std::tuple<at::Tensor, at::Tensor> ef_sign_pack_cpu(const at::Tensor& grad, const c10::optional<at::Tensor>& residual,
                                                    int64_t chunk_size, int64_t numel) {
  const at::Tensor* res = residual.has_value() ? &residual.value() : nullptr;
  check_ef_pair("commlib::ef_sign_pack", grad, res);
  TORCH_CHECK(chunk_size >= 0 && chunk_size % 32 == 0,
              "commlib::ef_sign_pack: chunk_size must be 0 (whole tensor) or a positive multiple of 32, got ",
              chunk_size);
  TORCH_CHECK(numel >= grad.numel(), "commlib::ef_sign_pack: numel ", numel, " is below grad's ", grad.numel());
  const int64_t n = numel;
  const int64_t words = words_for(n);
  const int64_t chunk = (chunk_size == 0 || chunk_size >= n) ? std::max<int64_t>(n, 1) : chunk_size;
  const int64_t chunks = n == 0 ? 0 : (n + chunk - 1) / chunk;
  const int64_t words_per_chunk = (chunk + 31) / 32;
  at::Tensor packed = at::empty({words}, grad.options().dtype(at::kInt));
  at::Tensor scales = at::empty({chunks}, grad.options().dtype(at::kFloat));
  uint32_t* out = reinterpret_cast<uint32_t*>(packed.data_ptr<int32_t>());
  float* scale_out = scales.data_ptr<float>();

  dispatch_floats(grad.scalar_type(), "ef_sign_pack", [&](auto tag) {
    using scalar_t = decltype(tag);
    const CorrectedSource<scalar_t> src{grad.data_ptr<scalar_t>(), res ? res->data_ptr<scalar_t>() : nullptr,
                                        grad.numel()};
    const bool over_chunks = chunks >= 2 * kernel_threads();
#pragma omp parallel for schedule(static) num_threads(kernel_threads()) if (over_chunks)
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t w_begin = c * words_per_chunk;
      const int64_t w_end = std::min(words, w_begin + words_per_chunk);
      double abs_sum = 0.0;
#pragma omp parallel for schedule(static) num_threads(kernel_threads()) reduction(+ : abs_sum) if (!over_chunks)
      for (int64_t w = w_begin; w < w_end; ++w) {
        alignas(16) float buffer[32];
        const int64_t base = w * 32;
        const int count = static_cast<int>(std::min<int64_t>(32, n - base));
        const float* v = src.floats(base, count, buffer);
        // the same summation as sign_pack of the materialized tensor: SSE lanes for full float32
        // words, one double per value otherwise
        out[w] = (std::is_same_v<scalar_t, float> && count == 32) ? pack_word_f32(v, abs_sum)
                                                                   : pack_word_generic(v, count, abs_sum);
      }
      const int64_t count = std::min(n, (c + 1) * chunk) - c * chunk;
      scale_out[c] = static_cast<float>(abs_sum / static_cast<double>(count));
    }
  });
  return {packed, scales};
}

// The decompressed values +-scale of elements [0, n) of a sign payload, in blocks of up to
// kWordsPerTask words (in parallel): fn(first, hat, count) gets float32 values bit-identical to
// sign_unpack's. A word never straddles two chunks (chunk is a multiple of 32, or the whole tensor).
template <typename Fn>
void for_each_unpacked_block(const uint32_t* words, const float* scale_in, int64_t chunk, int64_t n, Fn&& fn) {
  constexpr int64_t kWordsPerTask = 64;
  const int64_t n_words = words_for(n);
  const int64_t tasks = (n_words + kWordsPerTask - 1) / kWordsPerTask;
#pragma omp parallel for schedule(static) num_threads(kernel_threads())
  for (int64_t task = 0; task < tasks; ++task) {
    alignas(64) float hat[kWordsPerTask * 32];
    const int64_t w_begin = task * kWordsPerTask;
    const int64_t w_end = std::min(n_words, w_begin + kWordsPerTask);
    for (int64_t w = w_begin; w < w_end; ++w) {
      const float s = scale_in[w * 32 / chunk];
      uint32_t scale_bits;
      std::memcpy(&scale_bits, &s, sizeof(scale_bits));
      unpack_words_f32(words + w, 1, scale_bits, reinterpret_cast<uint32_t*>(hat + (w - w_begin) * 32));
    }
    const int64_t first = w_begin * 32;
    fn(first, hat, std::min(n, w_end * 32) - first);
  }
}

// Fused error feedback, pass 2 (after the collective, only if the step is kept):
// e <- (g + e) - unpack(packed, scales) for the first grad.numel() values, in place.
void ef_sign_residual_cpu(const at::Tensor& residual, const at::Tensor& grad, const at::Tensor& packed_in,
                          const at::Tensor& scales_in, int64_t chunk_size, int64_t numel, bool accumulate) {
  check_ef_pair("commlib::ef_sign_residual_", grad, &residual);
  TORCH_CHECK(packed_in.scalar_type() == at::kInt && scales_in.scalar_type() == at::kFloat,
              "commlib::ef_sign_residual_: packed must be int32 and scales float32");
  TORCH_CHECK(numel >= grad.numel() && packed_in.numel() == words_for(numel),
              "commlib::ef_sign_residual_: packed has ", packed_in.numel(), " words, expected ", words_for(numel));
  TORCH_CHECK(chunk_size >= 0 && chunk_size % 32 == 0, "commlib::ef_sign_residual_: bad chunk_size ", chunk_size);
  const int64_t chunk = (chunk_size == 0 || chunk_size >= numel) ? std::max<int64_t>(numel, 1) : chunk_size;
  const int64_t chunks = numel == 0 ? 0 : (numel + chunk - 1) / chunk;
  TORCH_CHECK(scales_in.numel() == chunks, "commlib::ef_sign_residual_: expected ", chunks, " scales, got ",
              scales_in.numel());
  const at::Tensor packed = packed_in.contiguous();
  const at::Tensor scales = scales_in.contiguous();
  const uint32_t* words = reinterpret_cast<const uint32_t*>(packed.data_ptr<int32_t>());
  const float* scale_in = scales.data_ptr<float>();
  const int64_t n = grad.numel();
  dispatch_floats(grad.scalar_type(), "ef_sign_residual_", [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* g = grad.data_ptr<scalar_t>();
    scalar_t* e = residual.data_ptr<scalar_t>();
    for_each_unpacked_block(words, scale_in, chunk, n, [&](int64_t first, const float* hat, int64_t count) {
      residual_block(g + first, e + first, hat, count, accumulate);
    });
  });
}

// Decompression into an existing tensor: out[:out.numel()] <- (out +) sign_unpack(...), so the hooks
// neither allocate the decompressed tensor nor make a second pass to add or copy it.
void sign_unpack_into_cpu(const at::Tensor& out, const at::Tensor& packed_in, const at::Tensor& scales_in,
                          int64_t chunk_size, int64_t numel, at::ScalarType dtype, bool accumulate) {
  COMMLIB_CHECK_FLOAT_INPUT("commlib::sign_unpack_into_", out);
  TORCH_CHECK(out.is_contiguous() && out.numel() <= numel, "commlib::sign_unpack_into_: out must be contiguous ",
              "with at most numel elements");
  TORCH_CHECK(packed_in.scalar_type() == at::kInt && scales_in.scalar_type() == at::kFloat,
              "commlib::sign_unpack_into_: packed must be int32 and scales float32");
  TORCH_CHECK(packed_in.numel() == words_for(numel), "commlib::sign_unpack_into_: packed has ", packed_in.numel(),
              " words, expected ", words_for(numel));
  TORCH_CHECK(chunk_size >= 0 && chunk_size % 32 == 0, "commlib::sign_unpack_into_: bad chunk_size ", chunk_size);
  const int64_t chunk = (chunk_size == 0 || chunk_size >= numel) ? std::max<int64_t>(numel, 1) : chunk_size;
  const int64_t chunks = numel == 0 ? 0 : (numel + chunk - 1) / chunk;
  TORCH_CHECK(scales_in.numel() == chunks, "commlib::sign_unpack_into_: expected ", chunks, " scales, got ",
              scales_in.numel());
  const at::Tensor packed = packed_in.contiguous();
  const at::Tensor scales = scales_in.contiguous();
  const uint32_t* words = reinterpret_cast<const uint32_t*>(packed.data_ptr<int32_t>());
  const float* scale_in = scales.data_ptr<float>();
  const int64_t n = out.numel();
  dispatch_float_pair(out.scalar_type(), dtype, "sign_unpack_into_", [&](auto out_tag, auto payload_tag) {
    using O = decltype(out_tag);
    using P = decltype(payload_tag);
    O* o = out.data_ptr<O>();
    for_each_unpacked_block(words, scale_in, chunk, n, [&](int64_t first, const float* hat, int64_t count) {
      store_decompressed<O, P>(hat, count, accumulate, o + first);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(commlib, CPU, m) {
  m.impl("sign_pack", &sign_pack_cpu);
  m.impl("sign_unpack", &sign_unpack_cpu);
  m.impl("ef_sign_pack", &ef_sign_pack_cpu);
  m.impl("ef_sign_residual_", &ef_sign_residual_cpu);
  m.impl("sign_unpack_into_", &sign_unpack_into_cpu);
}

}  // namespace commlib
