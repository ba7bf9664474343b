// Element loads that widen fp32/bf16/fp16 storage to fp32 in registers, for the CPU kernels.
// bf16/fp16 go through the bit-manipulation conversions of common/score_math.h (branch-free and
// vectorisable inside the run-time-dispatched kernel bodies).
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "common/score_math.h"
#include "cpu/cpu_dispatch.h"

namespace wagle {
namespace cpu {

template <typename T>
WAGLE_ALWAYS_INLINE float load_f(const T* p, int64_t i);
template <>
WAGLE_ALWAYS_INLINE float load_f<float>(const float* p, int64_t i) { return p[i]; }
template <>
WAGLE_ALWAYS_INLINE float load_f<c10::BFloat16>(const c10::BFloat16* p, int64_t i) {
  return bf16_bits_to_float(reinterpret_cast<const uint16_t*>(p)[i]);
}
template <>
WAGLE_ALWAYS_INLINE float load_f<c10::Half>(const c10::Half* p, int64_t i) {
  return fp16_bits_to_float(reinterpret_cast<const uint16_t*>(p)[i]);
}

}  // namespace cpu
}  // namespace wagle
