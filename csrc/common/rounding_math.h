// Compact master weights of masked_adamw_master_ (docs/kernels.md 5): writing the fp32 master value
// back to a bfloat16/float16 parameter, with round-to-nearest-even (each back end's own conversion,
// identical bits: c10's on the CPU, the bit formulas of csrc/cuda/masked_adamw.cu on the device) or
// stochastic rounding, shared by the CPU (csrc/cpu/masked_adamw.cpp) and CUDA
// (csrc/cuda/masked_adamw.cu) kernels; the Triton kernel and the reference
// (wagle_ext/kernels/reference.py) compute the same integers and floats step by step.
//
// Stochastic rounding is counter based: the random bits of element e (flat index in its tensor) at
// step s of a tensor seeded with `seed` are sr_bits(sr_key(seed, s), e) -- no generator state, so
// every back end and every thread layout draws the same bits, and a run is reproducible from the
// seed and the step count alone (a checkpoint needs no RNG state).
//
//   key  = mix64(seed + 0x9E3779B97F4A7C15 * step)             (splitmix64 finaliser, once per tensor)
//   r    = hash32(hash32(lo32(e) ^ lo32(key)) ^ hi32(e) ^ hi32(key))   (lowbias32, a bijection of uint32)
//   n    = round_to_nearest_even(x)       (16-bit pattern of the target format)
//   x == n, NaN, or n infinite   -> n     (exact values, NaN and overflow round as RNE)
//   lo, hi = the two neighbours of x (sign-magnitude patterns n-1/n or n/n+1 around |x|)
//   frac = (|x| - |lo|) / (|hi| - |lo|)   (exact: Sterbenz, and a power-of-two divisor)
//   out  = float(r >> 8) * 2^-24 < frac ? hi : lo
// P(hi) = ceil(frac * 2^24) / 2^24: exactly frac for every bf16 value and fp16 normal value (frac
// has at most 16 resp. 13 bits there), within 2^-24 of it in the fp16 subnormal range.
#pragma once
#include <stdint.h>

#include "common/layout.h"
#include "common/score_math.h"

namespace wagle {

// How masked_adamw_master_ writes each parameter (per tensor in the kernels).
enum Rounding : int {
  kRoundNoMaster = 0,    // no master copy: the update reads and writes p itself (masked_adamw_)
  kRoundNearest = 1,     // master copy, p = round_to_nearest_even(master)
  kRoundStochastic = 2,  // master copy, p = stochastic_round(master)
};

// lowbias32 (C. Wellons, hash-prospector): a bijective 32-bit mixer.
WAGLE_HD uint32_t hash32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// splitmix64's finaliser.
WAGLE_HD uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// The key of one tensor at one step (computed on the host, once per tensor and call).
WAGLE_HD uint64_t sr_key(uint64_t seed, int64_t step) {
  return mix64(seed + 0x9E3779B97F4A7C15ull * static_cast<uint64_t>(step));
}

// 32 random bits of element e (flat index in its tensor) under `key`.
WAGLE_HD uint32_t sr_bits(uint64_t key, int64_t e) {
  const uint64_t u = static_cast<uint64_t>(e);
  const uint32_t r = hash32(static_cast<uint32_t>(u) ^ static_cast<uint32_t>(key));
  return hash32(r ^ static_cast<uint32_t>(u >> 32) ^ static_cast<uint32_t>(key >> 32));
}

// Bit casts for this header: intrinsics on the device, __builtin_bit_cast on the host (memcpy-based
// helpers keep GCC from vectorising the CPU kernel's stochastic-rounding loop).
WAGLE_HD uint32_t rm_float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  return __builtin_bit_cast(uint32_t, x);
#endif
}
WAGLE_HD float rm_bits_float(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  return __builtin_bit_cast(float, b);
#endif
}
WAGLE_HD float rm_abs(float x) { return rm_bits_float(rm_float_bits(x) & 0x7FFFFFFFu); }

// float value of a 16-bit pattern h (in a uint32, < 2^16) of bf16 (Fp16 = false) or fp16: the
// formulas of score_math.h bf16_bits_to_float / fp16_bits_to_float (c10's), on uint32.
template <bool Fp16>
WAGLE_HD float half_bits_to_float(uint32_t h) {
  if (!Fp16) return rm_bits_float(h << 16);
  const uint32_t w = h << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = rm_bits_float((two_w >> 4) + (0xE0u << 23)) * rm_bits_float(0x7800000u);
  const float denormalized = rm_bits_float((two_w >> 17) | (126u << 23)) - 0.5f;
  return rm_bits_float(sign | (two_w < (1u << 27) ? rm_float_bits(denormalized) : rm_float_bits(normalized)));
}

// Stochastic rounding of x to bfloat16 (Fp16 = false) or float16, given n = the
// round-to-nearest-even pattern of x in that format (< 2^16) and r = sr_bits(...) of the element.
// Branch-free, on uint32/float only, so the CPU kernel's loops vectorise it; the discarded
// candidates of the exact/NaN/overflow cases may divide by zero or read NaN patterns, harmlessly.
template <bool Fp16>
WAGLE_HD uint32_t stochastic_round_bits(float x, uint32_t n, uint32_t r) {
  const float ax = rm_abs(x);
  const float an = rm_abs(half_bits_to_float<Fp16>(n));
  const uint32_t inf = Fp16 ? 0x7C00u : 0x7F80u;
  const bool keep = (x != x) | (an == ax) | ((n & 0x7FFFu) == inf);  // NaN, exact, overflow (as RNE)
  const bool below = an < ax;  // n is the lower neighbour: the upper one is one step away from zero
  const uint32_t other = (below ? n + 1u : n - 1u) & 0xFFFFu;  // sign-magnitude steps
  const uint32_t lo = below ? n : other;
  const uint32_t hi = below ? other : n;
  const float flo = rm_abs(half_bits_to_float<Fp16>(lo));
  const float fhi = rm_abs(half_bits_to_float<Fp16>(hi));
  const float frac = div_rn(ax - flo, fhi - flo);  // both differences exact
  const float u = static_cast<float>(static_cast<int32_t>(r >> 8)) * 5.9604644775390625e-8f;  // r24/2^24, exact
  const uint32_t pick = u < frac ? hi : lo;
  return keep ? n : pick;
}

// float -> bf16 pattern, round to nearest even, NaN -> 0x7FC0: c10::BFloat16(float) and the CUDA
// kernel's f32_to_bf16_bits, as plain integer operations.
WAGLE_HD uint32_t f32_to_bf16_rne_bits(float x) {
  const uint32_t u = rm_float_bits(x);
  return x != x ? 0x7FC0u : (u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16;
}

}  // namespace wagle
