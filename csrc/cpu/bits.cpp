// CPU kernels of the bit-array helpers: pack_bits (bool -> uint8 bits), unpack_bits (bits ->
// bool) and popcount_bits. Layout (wagle_ext/kernels/reference.py): ceil(numel/8) bytes, bit j of
// byte i is element 8*i+j; padding bits of the last byte are zero.
//
// Each op is one parallel pass; pack/unpack move 8 elements per 64-bit load or store.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <cstring>

#include "common/checks.h"
#include "common/select_math.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "bits.cpp assumes little-endian byte order"
#endif

namespace wagle {
namespace cpu {
namespace {

constexpr int64_t kGrainBytes = int64_t(1) << 16;

void check_bits(const at::Tensor& bits, int64_t numel, const char* op) {
  checks::check_bits(bits, numel, op, at::Device(at::kCPU));
}

at::Tensor pack_bits_cpu(const at::Tensor& mask) {
  checks::check_bool_mask(mask, at::Device(at::kCPU));
  const at::Tensor m = mask.contiguous();
  const int64_t n = m.numel();
  const int64_t nbytes = (n + 7) / 8;
  at::Tensor out = at::empty({nbytes}, m.options().dtype(at::kByte));
  if (n == 0) return out;
  const uint8_t* src = reinterpret_cast<const uint8_t*>(m.data_ptr<bool>());
  uint8_t* dst = out.data_ptr<uint8_t>();
  const int64_t full = n / 8;
  at::parallel_for(0, full, kGrainBytes, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      uint64_t x;
      std::memcpy(&x, src + 8 * i, 8);
      dst[i] = static_cast<uint8_t>(pack8_flags(bytes_nonzero01(x)));
    }
  });
  if (full < nbytes) {
    uint8_t last = 0;
    for (int64_t j = 0; j < n - 8 * full; ++j) last |= static_cast<uint8_t>((src[8 * full + j] != 0) << j);
    dst[full] = last;
  }
  return out;
}

// spread[b]: the eight bits of b as eight 0/1 bytes (bit j -> byte j).
const std::array<uint64_t, 256>& spread_table() {
  static const std::array<uint64_t, 256> table = [] {
    std::array<uint64_t, 256> t{};
    for (int b = 0; b < 256; ++b)
      for (int j = 0; j < 8; ++j)
        if (b & (1 << j)) t[b] |= uint64_t(1) << (8 * j);
    return t;
  }();
  return table;
}

at::Tensor unpack_bits_cpu(const at::Tensor& bits, int64_t numel) {
  check_bits(bits, numel, "unpack_bits");
  const at::Tensor b = bits.contiguous();
  at::Tensor out = at::empty({numel}, b.options().dtype(at::kBool));
  if (numel == 0) return out;
  const uint8_t* src = b.data_ptr<uint8_t>();
  uint8_t* dst = reinterpret_cast<uint8_t*>(out.data_ptr<bool>());
  const auto& spread = spread_table();
  const int64_t full = numel / 8;
  at::parallel_for(0, full, kGrainBytes, [&](int64_t s, int64_t e) {
    for (int64_t i = s; i < e; ++i) std::memcpy(dst + 8 * i, &spread[src[i]], 8);
  });
  for (int64_t j = 8 * full; j < numel; ++j) dst[j] = (src[full] >> (j - 8 * full)) & 1;
  return out;
}

int64_t popcount_bits_cpu(const at::Tensor& bits, int64_t numel) {
  check_bits(bits, numel, "popcount_bits");
  const at::Tensor b = bits.contiguous();
  if (numel == 0) return 0;
  const uint8_t* src = b.data_ptr<uint8_t>();
  const int64_t full_bytes = numel / 8;
  const int64_t words = full_bytes / 8;
  int64_t total = at::parallel_reduce(
      0, words, kGrainBytes / 8, int64_t(0),
      [&](int64_t s, int64_t e, int64_t acc) {
        for (int64_t i = s; i < e; ++i) {
          uint64_t x;
          std::memcpy(&x, src + 8 * i, 8);
          acc += popcount64(x);
        }
        return acc;
      },
      [](int64_t a, int64_t c) { return a + c; });
  for (int64_t i = 8 * words; i < full_bytes; ++i) total += __builtin_popcount(src[i]);
  if (numel % 8) total += __builtin_popcount(src[full_bytes] & ((1u << (numel % 8)) - 1u));
  return total;
}

}  // namespace
}  // namespace cpu
}  // namespace wagle

TORCH_LIBRARY_IMPL(wagle, CPU, m) {
  m.impl("pack_bits", &wagle::cpu::pack_bits_cpu);
  m.impl("unpack_bits", &wagle::cpu::unpack_bits_cpu);
  m.impl("popcount_bits", &wagle::cpu::popcount_bits_cpu);
}
