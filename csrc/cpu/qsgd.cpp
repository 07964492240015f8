// QSGD-style b-bit stochastic quantization per bucket, codes bit-packed (CPU, OpenMP).
// Reference: commlib/ops/qsgd.py::qsgd_quantize_reference / qsgd_dequantize_reference.
//
// Layout: elements go in groups of 8; a group of 8 b-bit codes is exactly b bytes, code j of the
// group in bits [b*j, b*j + b) of that little-endian b-byte word. bucket_size is a multiple of 8,
// so buckets start on group boundaries and buckets can be processed independently.
//
// Speed: the work is done on float32 blocks of kBlock values (bf16/fp16 are widened into a block
// buffer first) by loops simple enough to vectorize; `target_clones` builds an AVX2 version next
// to the baseline one and picks at load time.
#include "common.h"

namespace commlib {
namespace {

constexpr int64_t kBlock = 1024;  // multiple of 8

int64_t code_bytes_for(int64_t numel, int64_t bits) { return (numel + 7) / 8 * bits; }

void check_qsgd_args(const char* op, int64_t bits, int64_t bucket_size) {
  TORCH_CHECK(bits >= 1 && bits <= 8, op, ": bits must be in [1, 8], got ", bits);
  TORCH_CHECK(bucket_size >= 8 && bucket_size % 8 == 0, op,
              ": bucket_size must be a positive multiple of 8, got ", bucket_size);
}

// max |x| as an integer max over magnitude bit patterns (vectorizes; NaN patterns rank above inf,
// so a NaN anywhere makes the scale NaN, as the reference's amax does).
COMMLIB_CPU_CLONES float block_absmax(const float* p, int64_t count) {
  const uint32_t* bits = reinterpret_cast<const uint32_t*>(p);
  uint32_t m = 0;
  for (int64_t i = 0; i < count; ++i) {
    const uint32_t a = bits[i] & 0x7fffffffu;
    m = a > m ? a : m;
  }
  float out;
  std::memcpy(&out, &m, sizeof(out));
  return out;
}

// Codes of `count` values whose element indices are first .. first + count - 1, all with the same
// high 32 bits (callers split at 2^32 boundaries).
COMMLIB_CPU_CLONES void block_codes(const float* x, int64_t count, int64_t first, uint32_t key, float inv_scale,
                                    float half_levels, uint32_t levels, uint8_t* codes) {
  const uint32_t high = index_high_key(key, first);
  const uint32_t low = static_cast<uint32_t>(first);
  for (int64_t j = 0; j < count; ++j) {
    const float u = uniform24_low(high, low + static_cast<uint32_t>(j));
    codes[j] = static_cast<uint8_t>(qsgd_code(x[j], inv_scale, half_levels, levels, u));
  }
}

// Power-of-two widths: byte i holds codes i*P .. i*P + P - 1 (P = 8/B per byte, code k of the
// byte at bit B*k), so the loops are flat and vectorize. `count` is padded up to whole bytes with
// zero codes on packing. Other widths go through the generic group-of-8 loops.
template <int B>
inline void pack_pow2_body(const uint8_t* codes, int64_t count, uint8_t* dst) {
  constexpr int per_byte = 8 / B;
  const int64_t full = count / per_byte;
  for (int64_t i = 0; i < full; ++i) {
    uint32_t byte = 0;
    for (int k = 0; k < per_byte; ++k) byte |= static_cast<uint32_t>(codes[i * per_byte + k]) << (B * k);
    dst[i] = static_cast<uint8_t>(byte);
  }
  const int64_t bytes = (count + 7) / 8 * B;
  for (int64_t i = full; i < bytes; ++i) {
    uint32_t byte = 0;
    for (int k = 0; k < per_byte; ++k) {
      const int64_t c = i * per_byte + k;
      if (c < count) byte |= static_cast<uint32_t>(codes[c]) << (B * k);
    }
    dst[i] = static_cast<uint8_t>(byte);
  }
}

template <int B>
inline void unpack_pow2_body(const uint8_t* src, int64_t count, uint8_t* codes) {
  constexpr int per_byte = 8 / B;
  constexpr uint32_t mask = (1u << B) - 1u;
  const int64_t full = count / per_byte;
  for (int64_t i = 0; i < full; ++i) {
    const uint32_t byte = src[i];
    for (int k = 0; k < per_byte; ++k) codes[i * per_byte + k] = static_cast<uint8_t>((byte >> (B * k)) & mask);
  }
  for (int64_t c = full * per_byte; c < count; ++c)
    codes[c] = static_cast<uint8_t>((src[c / per_byte] >> (B * (c % per_byte))) & mask);
}

COMMLIB_CPU_CLONES void pack4(const uint8_t* c, int64_t n, uint8_t* d) { pack_pow2_body<4>(c, n, d); }
COMMLIB_CPU_CLONES void pack2(const uint8_t* c, int64_t n, uint8_t* d) { pack_pow2_body<2>(c, n, d); }
COMMLIB_CPU_CLONES void pack1(const uint8_t* c, int64_t n, uint8_t* d) { pack_pow2_body<1>(c, n, d); }
COMMLIB_CPU_CLONES void unpack4(const uint8_t* s, int64_t n, uint8_t* c) { unpack_pow2_body<4>(s, n, c); }
COMMLIB_CPU_CLONES void unpack2(const uint8_t* s, int64_t n, uint8_t* c) { unpack_pow2_body<2>(s, n, c); }
COMMLIB_CPU_CLONES void unpack1(const uint8_t* s, int64_t n, uint8_t* c) { unpack_pow2_body<1>(s, n, c); }

// Bit-packs `count` codes (count % 8 == 0 except for the tensor's last block) to `bits` per code;
// a short last group is padded with zero bits.
void pack_codes(const uint8_t* codes, int64_t count, int bits, uint8_t* dst) {
  switch (bits) {
    case 8:
      std::memcpy(dst, codes, static_cast<size_t>(count));
      std::memset(dst + count, 0, static_cast<size_t>((count + 7) / 8 * 8 - count));
      return;
    case 4: return pack4(codes, count, dst);
    case 2: return pack2(codes, count, dst);
    case 1: return pack1(codes, count, dst);
    default: break;
  }
  for (int64_t g = 0; g < count; g += 8) {
    uint64_t group = 0;
    const int64_t in_group = std::min<int64_t>(8, count - g);
    for (int64_t j = 0; j < in_group; ++j) group |= static_cast<uint64_t>(codes[g + j]) << (bits * j);
    for (int b = 0; b < bits; ++b) dst[g / 8 * bits + b] = static_cast<uint8_t>(group >> (8 * b));
  }
}

void unpack_codes(const uint8_t* src, int64_t count, int bits, uint8_t* codes) {
  switch (bits) {
    case 8: std::memcpy(codes, src, static_cast<size_t>(count)); return;
    case 4: return unpack4(src, count, codes);
    case 2: return unpack2(src, count, codes);
    case 1: return unpack1(src, count, codes);
    default: break;
  }
  const uint64_t mask = (1u << bits) - 1u;
  for (int64_t g = 0; g < count; g += 8) {
    uint64_t group = 0;
    for (int b = 0; b < bits; ++b) group |= static_cast<uint64_t>(src[g / 8 * bits + b]) << (8 * b);
    const int64_t in_group = std::min<int64_t>(8, count - g);
    for (int64_t j = 0; j < in_group; ++j) codes[g + j] = static_cast<uint8_t>((group >> (bits * j)) & mask);
  }
}

COMMLIB_CPU_CLONES void block_values(const uint8_t* codes, int64_t count, float scale, float inv_levels,
                                      uint32_t levels, float* out) {
  for (int64_t j = 0; j < count; ++j) out[j] = qsgd_value(codes[j], scale, inv_levels, levels);
}

template <typename scalar_t>
const float* as_floats(const scalar_t* p, int64_t count, float* buffer) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return p;
  } else {
    for (int64_t j = 0; j < count; ++j) buffer[j] = static_cast<float>(p[j]);
    return buffer;
  }
}

// One bucket: `floats(first, len, buffer)` yields the float32 values at element indices
// first .. first + len - 1 (the input itself or the error-feedback source).
template <typename Floats>
void quantize_bucket(const Floats& floats, int64_t begin, int64_t count, int bits, uint32_t key, uint8_t* codes_out,
                     float* scale_out) {
  alignas(64) float buffer[kBlock];
  alignas(64) uint8_t codes[kBlock];
  // a bucket that fits one block is loaded once for both loops
  const float* cached = count <= kBlock ? floats(begin, count, buffer) : nullptr;
  float scale = 0.0f;
  for (int64_t b = 0; b < count && scale == scale; b += kBlock) {
    const int64_t len = std::min(kBlock, count - b);
    scale = nan_max(scale, block_absmax(cached != nullptr ? cached : floats(begin + b, len, buffer), len));
  }
  *scale_out = scale;
  const uint32_t levels = (1u << bits) - 1u;
  const float half_levels = static_cast<float>(levels) * 0.5f;
  const float inv_scale = safe_inverse(scale);
  for (int64_t b = 0; b < count;) {
    const int64_t first = begin + b;
    // keep each block inside one 2^32-aligned index range (the hoisted high key); first is a
    // multiple of 8, so a block cut at the boundary still holds whole groups
    const int64_t to_boundary = (((first >> 32) + 1) << 32) - first;
    const int64_t len = std::min({kBlock, count - b, to_boundary});
    block_codes(cached != nullptr ? cached + b : floats(first, len, buffer), len, first, key, inv_scale, half_levels,
                levels, codes);
    pack_codes(codes, len, bits, codes_out + first / 8 * bits);
    b += len;
  }
}

std::tuple<at::Tensor, at::Tensor> qsgd_quantize_cpu(const at::Tensor& x_in, int64_t bits, int64_t bucket_size,
                                                     int64_t seed) {
  COMMLIB_CHECK_FLOAT_INPUT("commlib::qsgd_quantize", x_in);
  check_qsgd_args("commlib::qsgd_quantize", bits, bucket_size);
  const at::Tensor x = x_in.contiguous().view(-1);
  const int64_t n = x.numel();
  const int64_t buckets = (n + bucket_size - 1) / bucket_size;
  at::Tensor codes = at::empty({code_bytes_for(n, bits)}, x.options().dtype(at::kByte));
  at::Tensor scales = at::empty({buckets}, x.options().dtype(at::kFloat));
  uint8_t* code_ptr = codes.data_ptr<uint8_t>();
  float* scale_ptr = scales.data_ptr<float>();
  const uint32_t key = seed_key(seed);

  dispatch_floats(x.scalar_type(), "qsgd_quantize", [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* in = x.data_ptr<scalar_t>();
#pragma omp parallel for schedule(static) num_threads(kernel_threads())
    for (int64_t b = 0; b < buckets; ++b) {
      const int64_t begin = b * bucket_size;
      const auto floats = [in](int64_t first, int64_t len, float* buffer) {
        return as_floats(in + first, len, buffer);
      };
      quantize_bucket(floats, begin, std::min(bucket_size, n - begin), static_cast<int>(bits), key, code_ptr,
                      scale_ptr + b);
    }
  });
  return {codes, scales};
}

at::Tensor qsgd_dequantize_cpu(const at::Tensor& codes_in, const at::Tensor& scales_in, int64_t bits,
                               int64_t bucket_size, int64_t numel, at::ScalarType dtype) {
  check_qsgd_args("commlib::qsgd_dequantize", bits, bucket_size);
  TORCH_CHECK(codes_in.scalar_type() == at::kByte, "commlib::qsgd_dequantize: codes must be uint8");
  TORCH_CHECK(scales_in.scalar_type() == at::kFloat, "commlib::qsgd_dequantize: scales must be float32");
  TORCH_CHECK(numel >= 0 && codes_in.numel() == code_bytes_for(numel, bits), "commlib::qsgd_dequantize: ",
              codes_in.numel(), " code bytes do not match numel ", numel, " at ", bits, " bits");
  const int64_t buckets = (numel + bucket_size - 1) / bucket_size;
  TORCH_CHECK(scales_in.numel() == buckets, "commlib::qsgd_dequantize: expected ", buckets, " scales, got ",
              scales_in.numel());
  const at::Tensor codes = codes_in.contiguous();
  const at::Tensor scales = scales_in.contiguous();
  at::Tensor out = at::empty({numel}, codes.options().dtype(dtype));
  const uint8_t* code_ptr = codes.data_ptr<uint8_t>();
  const float* scale_ptr = scales.data_ptr<float>();
  const uint32_t levels = (1u << bits) - 1u;
  const float inv_levels = 1.0f / static_cast<float>(levels);

  dispatch_floats(dtype, "qsgd_dequantize", [&](auto tag) {
    using scalar_t = decltype(tag);
    scalar_t* o = out.data_ptr<scalar_t>();
#pragma omp parallel for schedule(static) num_threads(kernel_threads())
    for (int64_t bucket = 0; bucket < buckets; ++bucket) {
      alignas(64) uint8_t block[kBlock];
      alignas(64) float values[kBlock];
      const int64_t begin = bucket * bucket_size;
      const int64_t count = std::min(bucket_size, numel - begin);
      for (int64_t b = 0; b < count; b += kBlock) {
        const int64_t len = std::min(kBlock, count - b);
        const int64_t first = begin + b;
        unpack_codes(code_ptr + first / 8 * bits, len, static_cast<int>(bits), block);
        if constexpr (std::is_same_v<scalar_t, float>) {
          block_values(block, len, scale_ptr[bucket], inv_levels, levels, o + first);
        } else {
          block_values(block, len, scale_ptr[bucket], inv_levels, levels, values);
          for (int64_t j = 0; j < len; ++j) o[first + j] = static_cast<scalar_t>(values[j]);
        }
      }
    }
  });
  return out;
}

// Fused error feedback, pass 1: qsgd_quantize of v = pad(g + e, numel) without materializing v.
std::tuple<at::Tensor, at::Tensor> ef_qsgd_quantize_cpu(const at::Tensor& grad,
                                                        const c10::optional<at::Tensor>& residual, int64_t bits,
                                                        int64_t bucket_size, int64_t seed, int64_t numel) {
  const at::Tensor* res = residual.has_value() ? &residual.value() : nullptr;
  check_ef_pair("commlib::ef_qsgd_quantize", grad, res);
  check_qsgd_args("commlib::ef_qsgd_quantize", bits, bucket_size);
  TORCH_CHECK(numel >= grad.numel(), "commlib::ef_qsgd_quantize: numel ", numel, " is below grad's ", grad.numel());
  const int64_t n = numel;
  const int64_t buckets = (n + bucket_size - 1) / bucket_size;
  at::Tensor codes = at::empty({code_bytes_for(n, bits)}, grad.options().dtype(at::kByte));
  at::Tensor scales = at::empty({buckets}, grad.options().dtype(at::kFloat));
  uint8_t* code_ptr = codes.data_ptr<uint8_t>();
  float* scale_ptr = scales.data_ptr<float>();
  const uint32_t key = seed_key(seed);
  dispatch_floats(grad.scalar_type(), "ef_qsgd_quantize", [&](auto tag) {
    using scalar_t = decltype(tag);
    const CorrectedSource<scalar_t> src{grad.data_ptr<scalar_t>(), res ? res->data_ptr<scalar_t>() : nullptr,
                                        grad.numel()};
    const auto floats = [&src](int64_t first, int64_t len, float* buffer) { return src.floats(first, len, buffer); };
#pragma omp parallel for schedule(static) num_threads(kernel_threads())
    for (int64_t b = 0; b < buckets; ++b) {
      const int64_t begin = b * bucket_size;
      quantize_bucket(floats, begin, std::min(bucket_size, n - begin), static_cast<int>(bits), key, code_ptr,
                      scale_ptr + b);
    }
  });
  return {codes, scales};
}

// The dequantized values of elements [0, n) of a QSGD payload, block by block inside each bucket
// (buckets in parallel): fn(first, hat, len) gets float32 values bit-identical to qsgd_dequantize's.
template <typename Fn>
void for_each_dequantized_block(const uint8_t* code_ptr, const float* scale_ptr, int64_t bits, int64_t bucket_size,
                                int64_t n, Fn&& fn) {
  const uint32_t levels = (1u << bits) - 1u;
  const float inv_levels = 1.0f / static_cast<float>(levels);
  const int64_t used_buckets = (n + bucket_size - 1) / bucket_size;
#pragma omp parallel for schedule(static) num_threads(kernel_threads())
  for (int64_t bucket = 0; bucket < used_buckets; ++bucket) {
    alignas(64) uint8_t block[kBlock];
    alignas(64) float hat[kBlock];
    const int64_t begin = bucket * bucket_size;
    const int64_t count = std::min(bucket_size, n - begin);
    for (int64_t b = 0; b < count; b += kBlock) {
      const int64_t len = std::min(kBlock, count - b);
      const int64_t first = begin + b;
      unpack_codes(code_ptr + first / 8 * bits, len, static_cast<int>(bits), block);
      block_values(block, len, scale_ptr[bucket], inv_levels, levels, hat);
      fn(first, hat, len);
    }
  }
}

// Fused error feedback, pass 2: e <- (g + e) - dequantize(codes, scales) in place.
void ef_qsgd_residual_cpu(const at::Tensor& residual, const at::Tensor& grad, const at::Tensor& codes_in,
                          const at::Tensor& scales_in, int64_t bits, int64_t bucket_size, int64_t numel,
                          bool accumulate) {
  check_ef_pair("commlib::ef_qsgd_residual_", grad, &residual);
  check_qsgd_args("commlib::ef_qsgd_residual_", bits, bucket_size);
  TORCH_CHECK(codes_in.scalar_type() == at::kByte && scales_in.scalar_type() == at::kFloat,
              "commlib::ef_qsgd_residual_: codes must be uint8 and scales float32");
  TORCH_CHECK(numel >= grad.numel() && codes_in.numel() == code_bytes_for(numel, bits),
              "commlib::ef_qsgd_residual_: ", codes_in.numel(), " code bytes do not match numel ", numel);
  const int64_t buckets = (numel + bucket_size - 1) / bucket_size;
  TORCH_CHECK(scales_in.numel() == buckets, "commlib::ef_qsgd_residual_: expected ", buckets, " scales, got ",
              scales_in.numel());
  const at::Tensor codes = codes_in.contiguous();
  const at::Tensor scales = scales_in.contiguous();
  const uint8_t* code_ptr = codes.data_ptr<uint8_t>();
  const float* scale_ptr = scales.data_ptr<float>();
  const int64_t n = grad.numel();
  dispatch_floats(grad.scalar_type(), "ef_qsgd_residual_", [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* g = grad.data_ptr<scalar_t>();
    scalar_t* e = residual.data_ptr<scalar_t>();
    for_each_dequantized_block(code_ptr, scale_ptr, bits, bucket_size, n,
                               [&](int64_t first, const float* hat, int64_t len) {
                                 residual_block(g + first, e + first, hat, len, accumulate);
                               });
  });
}

// Dequantization into an existing tensor: out[:out.numel()] <- (out +) qsgd_dequantize(...).
void qsgd_dequantize_into_cpu(const at::Tensor& out, const at::Tensor& codes_in, const at::Tensor& scales_in,
                              int64_t bits, int64_t bucket_size, int64_t numel, at::ScalarType dtype,
                              bool accumulate) {
  COMMLIB_CHECK_FLOAT_INPUT("commlib::qsgd_dequantize_into_", out);
  check_qsgd_args("commlib::qsgd_dequantize_into_", bits, bucket_size);
  TORCH_CHECK(out.is_contiguous() && out.numel() <= numel, "commlib::qsgd_dequantize_into_: out must be ",
              "contiguous with at most numel elements");
  TORCH_CHECK(codes_in.scalar_type() == at::kByte && scales_in.scalar_type() == at::kFloat,
              "commlib::qsgd_dequantize_into_: codes must be uint8 and scales float32");
  TORCH_CHECK(codes_in.numel() == code_bytes_for(numel, bits), "commlib::qsgd_dequantize_into_: ",
              codes_in.numel(), " code bytes do not match numel ", numel);
  const int64_t buckets = (numel + bucket_size - 1) / bucket_size;
  TORCH_CHECK(scales_in.numel() == buckets, "commlib::qsgd_dequantize_into_: expected ", buckets,
              " scales, got ", scales_in.numel());
  const at::Tensor codes = codes_in.contiguous();
  const at::Tensor scales = scales_in.contiguous();
  const uint8_t* code_ptr = codes.data_ptr<uint8_t>();
  const float* scale_ptr = scales.data_ptr<float>();
  const int64_t n = out.numel();
  dispatch_float_pair(out.scalar_type(), dtype, "qsgd_dequantize_into_", [&](auto out_tag, auto payload_tag) {
    using O = decltype(out_tag);
    using P = decltype(payload_tag);
    O* o = out.data_ptr<O>();
    for_each_dequantized_block(code_ptr, scale_ptr, bits, bucket_size, n,
                               [&](int64_t first, const float* hat, int64_t len) {
                                 store_decompressed<O, P>(hat, len, accumulate, o + first);
                               });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(commlib, CPU, m) {
  m.impl("qsgd_quantize", &qsgd_quantize_cpu);
  m.impl("qsgd_dequantize", &qsgd_dequantize_cpu);
  m.impl("ef_qsgd_quantize", &ef_qsgd_quantize_cpu);
  m.impl("ef_qsgd_residual_", &ef_qsgd_residual_cpu);
  m.impl("qsgd_dequantize_into_", &qsgd_dequantize_into_cpu);
}

}  // namespace commlib
