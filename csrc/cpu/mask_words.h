// Layout of a PackedMask as the masked CPU kernels walk it (masked_adamw_, gather_masked_): bit j of
// byte i is element 8i+j; the directory (chunk_offsets) has one entry per kChunk elements
// (common/layout.h); the kernels read 64-bit words of the bit array.
#pragma once
#include <cstdint>
#include <cstring>

#include "common/layout.h"
#include "cpu/cpu_dispatch.h"

namespace wagle {
namespace cpu {

constexpr int64_t kChunk = kDirChunk;  // elements per directory entry (common/layout.h): 64 words
constexpr int64_t kWord = 64;

// Bits [e, e + cnt) of the mask as one word (cnt <= 64; bits beyond cnt are zero).
WAGLE_ALWAYS_INLINE uint64_t load_word(const uint8_t* bits, int64_t e, int64_t cnt) {
  uint64_t w = 0;
  if (cnt == kWord) {
    std::memcpy(&w, bits + e / 8, 8);
  } else {
    std::memcpy(&w, bits + e / 8, static_cast<size_t>((cnt + 7) / 8));
    w &= (uint64_t(1) << cnt) - 1;
  }
  return w;
}

}  // namespace cpu
}  // namespace wagle
