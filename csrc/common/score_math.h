// Per-element math shared by the CPU (csrc/cpu) and CUDA (csrc/cuda) kernels.
// Everything here is __host__ __device__ and torch-free, so the CPU tests exercise exactly the
// arithmetic the GPU kernels run.
#pragma once
#include <stdint.h>
#include <string.h>

#include "common/layout.h"  // WAGLE_HD

namespace wagle {

// Score kinds (attribution_score op, `kind` string <-> enum in csrc/ops.cpp).
enum ScoreKind : int {
  kScoreWagle = 0,         // |(w - g_r / gamma) * g_f|          (WAGLE, constant Hessian diagonal)
  kScoreWagleHessian = 1,  // |(w - g_r / (h + eps)) * g_f|      (diagonal Hessian estimate h)
  kScoreSnip = 2,          // |w * g_f|
  kScoreGradient = 3,      // |g_f|                              (SalUn gradient saliency)
  kScoreMagnitude = 4,     // |w|
};

// Histogram over the top kHistBits bits of the order-preserving key of a float score.
// hist has kHistSize entries: kHistBins key buckets followed by one NaN counter.
constexpr int kHistBits = 11;
constexpr int kHistShift = 32 - kHistBits;
constexpr int kHistBins = 1 << kHistBits;  // 2048
constexpr int kHistNaN = kHistBins;        // index of the NaN counter
constexpr int kHistSize = kHistBins + 1;

WAGLE_HD uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t b;
  memcpy(&b, &x, sizeof(b));
  return b;
#endif
}

WAGLE_HD float bits_float(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  float x;
  memcpy(&x, &b, sizeof(x));
  return x;
#endif
}

// Order-preserving map float -> uint32: a < b  <=>  key(a) < key(b) for non-NaN floats.
// -0.0 is canonicalised to +0.0 first (x + 0.0f), so the two zeros tie.
WAGLE_HD uint32_t float_key(float x) {
  uint32_t b = float_bits(x + 0.0f);
  uint32_t flip = (b & 0x80000000u) ? 0xFFFFFFFFu : 0x80000000u;
  return b ^ flip;
}

// Histogram bucket of a score: key >> 21, or kHistNaN for NaN.
WAGLE_HD uint32_t score_bucket(float x) {
  return (x != x) ? (uint32_t)kHistNaN : (float_key(x) >> kHistShift);
}

// bf16 / fp16 -> fp32 by bit manipulation (branch-free, vectorisable; identical to
// c10::detail::fp16_ieee_to_fp32_value).
WAGLE_HD float bf16_bits_to_float(uint16_t h) { return bits_float((uint32_t)h << 16); }

WAGLE_HD float fp16_bits_to_float(uint16_t h) {
  const uint32_t w = (uint32_t)h << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const uint32_t exp_offset = 0xE0u << 23;
  const float exp_scale = bits_float(0x7800000u);  // 0x1.0p-112f
  const float normalized = bits_float((two_w >> 4) + exp_offset) * exp_scale;
  const uint32_t magic_mask = 126u << 23;
  const float magic_bias = 0.5f;
  const float denormalized = bits_float((two_w >> 17) | magic_mask) - magic_bias;
  const uint32_t denorm_cutoff = 1u << 27;
  const uint32_t result =
      sign | (two_w < denorm_cutoff ? float_bits(denormalized) : float_bits(normalized));
  return bits_float(result);
}

WAGLE_HD float abs_f(float x) { return bits_float(float_bits(x) & 0x7FFFFFFFu); }

// IEEE round-to-nearest division on both sides. On the device, __fdiv_rn keeps it IEEE even if
// NVCC_FLAGS add -prec-div=false or --use_fast_math (which turn `/` into div.approx; docs/pitfalls.md
// K20); flushing of denormals (-ftz=true) cannot be undone here and is refused by setup.py.
WAGLE_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

// The score formulas. Division (not multiplication by a reciprocal) so results are bit-identical
// to the PyTorch reference expression `(w - g_r / gamma) * g_f`.
template <int Kind>
WAGLE_HD float attribution_score(float w, float gf, float gr, float h, float gamma, float eps) {
  if (Kind == kScoreWagle) return abs_f((w - div_rn(gr, gamma)) * gf);
  if (Kind == kScoreWagleHessian) return abs_f((w - div_rn(gr, h + eps)) * gf);
  if (Kind == kScoreSnip) return abs_f(w * gf);
  if (Kind == kScoreGradient) return abs_f(gf);
  return abs_f(w);  // kScoreMagnitude
}

}  // namespace wagle
