// Per-element math of exact top-k selection, shared by the CPU (csrc/cpu/select_topk.cpp) and a
// CUDA twin. Torch-free and WAGLE_HD, like score_math.h (whose float_key these build on).
//
// Radix levels of the MSD select (docs/kernels.md 4.2; wagle_ext/kernels/reference.py RADIX_LEVELS):
//   prefix_bits  0: digit = key >> 21            (11 bits; the score kernel's histogram)
//   prefix_bits 11: digit = (key >> 10) & 0x7FF  (11 bits) among keys whose top 11 bits match
//   prefix_bits 22: digit = key & 0x3FF          (10 bits) among keys whose top 22 bits match
#pragma once
#include <stdint.h>

#include "common/score_math.h"

namespace wagle {

WAGLE_HD bool valid_prefix_bits(int64_t prefix_bits) {
  return prefix_bits == 0 || prefix_bits == 11 || prefix_bits == 22;
}
// Shift and width of the digit counted at a level.
WAGLE_HD int radix_shift(int prefix_bits) { return prefix_bits == 0 ? 21 : (prefix_bits == 11 ? 10 : 0); }
WAGLE_HD int radix_width(int prefix_bits) { return prefix_bits == 22 ? 10 : 11; }

WAGLE_HD bool is_nan_f(float x) { return x != x; }

// Top `prefix_bits` bits of a key (0 for prefix_bits == 0: every key matches the empty prefix).
WAGLE_HD uint32_t key_prefix(uint32_t key, int prefix_bits) {
  return (uint32_t)((uint64_t)key >> (32 - prefix_bits));
}

WAGLE_HD uint32_t radix_digit(uint32_t key, int shift, uint32_t digit_mask) {
  return (key >> shift) & digit_mask;
}

// Strictly better than the threshold in the selection direction.
template <bool Largest>
WAGLE_HD bool key_better(uint32_t key, uint32_t threshold) {
  return Largest ? key > threshold : key < threshold;
}

WAGLE_HD int popcount64(uint64_t w) {
#if defined(__CUDA_ARCH__)
  return __popcll(w);
#else
  return __builtin_popcountll(w);
#endif
}

// The lowest `q` set bits of w (all of them when w has at most q): the first q ties of a
// 64-element word in flat-index order.
WAGLE_HD uint64_t lowest_set_bits(uint64_t w, int64_t q) {
  uint64_t rest = w;
  for (int64_t i = 0; i < q && rest; ++i) rest &= rest - 1;
  return w & ~rest;
}

// Eight 0/1 bytes (little-endian in a uint64) -> eight bits, byte j -> bit j. The multiplier
// places byte j's bit at position 56 + j; all partial products have distinct exponents, so no
// carries disturb the top byte.
WAGLE_HD uint64_t pack8_flags(uint64_t bytes01) { return (bytes01 * 0x0102040810204080ull) >> 56; }

// Eight arbitrary bytes -> 0/1 per byte (non-zero -> 1), for bool storage that is not 0/1.
WAGLE_HD uint64_t bytes_nonzero01(uint64_t x) {
  const uint64_t low7 = 0x7F7F7F7F7F7F7F7Full;
  return ((((x & low7) + low7) | x) >> 7) & 0x0101010101010101ull;
}

}  // namespace wagle
