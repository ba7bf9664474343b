// Per-element AdamW math shared by the CPU (csrc/cpu/masked_adamw.cpp) and a future CUDA twin.
//
// The arithmetic reproduces torch.optim.AdamW(fused=True) on CPU (aten/src/ATen/native/cpu/
// FusedAdamKernel.cpp, ADAM_MODE::ADAMW) bit for bit, as built by the official x86-64 wheels
// (GCC, AVX2/AVX512 capability, default -ffp-contract=fast). Probed against torch 2.13:
//
//   g    = grad / float(grad_scale)                 (written back when grad_scale is given)
//   g    = maximize ? -g : g
//   p    = p * float(1 - lr*wd)                     (decoupled decay, BEFORE the update, no FMA)
//   m    = fma(w, g - m, m)            if |w| < 0.5 (exp_avg.lerp_(g, w), w = float(1 - beta1))
//        = fma(w - 1, g - m, g)        otherwise
//   v    = fma(c2*g, g, v*b2)          vector region      (c2 = float(1 - beta2), b2 = float(beta2))
//        = fma(v, b2, (c2*g)*g)        scalar tail: the last numel % 8 elements of a tensor, where
//                                      GCC's contraction of the scalar loop picks the other product
//   vmax = max(vmax, v)                (amsgrad; stored v is not maxed)
//   den  = sqrt(vmax or v) / float(sqrt(bc2)) + float(eps)   (eps AFTER the bias correction)
//   p    = p + (float(-lr/bc1) * m) / den
//
// with bc1 = 1 - beta1^step, bc2 = 1 - beta2^step computed in double once per tensor (per element
// when elements have their own step count). Each rounding step above is one IEEE float operation;
// CPU code must keep the compiler from contracting p*decay into the final add (see
// adamw_no_contract).
#pragma once
#include <math.h>
#include <stdint.h>

#include "common/score_math.h"

namespace wagle {

// weight_decay_mode of masked_adamw_ (string <-> enum in csrc/cpu/masked_adamw.cpp).
enum WeightDecayMode : int {
  kDecayMasked = 0,  // decay only selected weights; frozen weights are never read or written
  kDecayAll = 1,     // decay every weight (== grad *= mask + torch AdamW, for published-run fidelity)
  kDecayNone = 2,    // no decay at all
};

// Scalar coefficients of one step, as the float values torch's fused CPU kernel uses.
struct AdamwCoeffs {
  float neg_step_size;  // float(-(lr / bc1))
  float bc2_sqrt;       // float(sqrt(bc2))
  float eps;            // float(eps)
  float decay;          // float(1 - lr * wd)   (1.0f when wd == 0)
  float w1;             // float(1 - beta1): the lerp weight
  float w1m1;           // w1 - 1 (lerp form for w1 >= 0.5)
  bool lerp_small;      // |w1| < 0.5
  float c2;             // float(1 - beta2)
  float b2;             // float(beta2)
};

// The step-dependent part of the coefficients, split so that a per-step table can cache the two
// pow() calls by (beta1, beta2, step) and apply lr per call (csrc/cuda/host_plan.h): the values
// are those of adamw_coeffs() bit for bit, because adamw_coeffs() is built from these.
WAGLE_HD double adamw_bc1(double beta1, double step) { return 1.0 - pow(beta1, step); }
WAGLE_HD float adamw_bc2_sqrt(double beta2, double step) { return (float)sqrt(1.0 - pow(beta2, step)); }
WAGLE_HD float adamw_neg_step_size(double lr, double bc1) { return (float)(-(lr / bc1)); }

// Coefficients for `step` (already incremented, >= 1), computed in double once like torch.
WAGLE_HD AdamwCoeffs adamw_coeffs(double lr, double beta1, double beta2, double weight_decay,
                                  double eps, double step) {
  AdamwCoeffs c;
  c.neg_step_size = adamw_neg_step_size(lr, adamw_bc1(beta1, step));
  c.bc2_sqrt = adamw_bc2_sqrt(beta2, step);
  c.eps = (float)eps;
  c.decay = (float)(1.0 - lr * weight_decay);
  c.w1 = (float)(1.0 - beta1);
  c.w1m1 = c.w1 - 1.0f;
  c.lerp_small = fabsf(c.w1) < 0.5f;
  c.c2 = (float)(1.0 - beta2);
  c.b2 = (float)beta2;
  return c;
}

// An optimisation barrier on a float: the value is materialised as rounded, so a multiply that
// produced it cannot be fused into a later add (GCC contracts a*b+c across statements by default).
WAGLE_HD float adamw_no_contract(float x) {
#if defined(__CUDA_ARCH__)
  return x;  // CUDA code uses __fmul_rn/__fadd_rn, which are never contracted
#elif defined(__x86_64__) || defined(__i386__)
  __asm__("" : "+x"(x));
  return x;
#elif defined(__aarch64__)
  __asm__("" : "+w"(x));
  return x;
#else
  volatile float y = x;
  return y;
#endif
}

WAGLE_HD float adamw_fma(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return fmaf(a, b, c);
#endif
}

// exp_avg.lerp_(g, w1) exactly as torch's CPU lerp (fmadd form).
WAGLE_HD float adamw_lerp_m(float m, float g, const AdamwCoeffs& c) {
  const float d = g - m;
  return c.lerp_small ? adamw_fma(c.w1, d, m) : adamw_fma(c.w1m1, d, g);
}

// exp_avg_sq update; `tail` selects the scalar-tail contraction of torch's CPU kernel.
WAGLE_HD float adamw_update_v(float v, float g, const AdamwCoeffs& c, bool tail) {
  if (tail) return adamw_fma(v, c.b2, (c.c2 * g) * g);
  return adamw_fma(c.c2 * g, g, v * c.b2);
}

// One element. p: the (already decayed, for selected elements) fp32 parameter value; g: the
// unscaled, maximize-adjusted gradient. Updates m, v, vmax in place; returns the new parameter.
template <bool Amsgrad>
WAGLE_HD float adamw_element(float p, float g, float& m, float& v, float& vmax, const AdamwCoeffs& c,
                             bool tail) {
  m = adamw_lerp_m(m, g, c);
  v = adamw_update_v(v, g, c, tail);
  float vd = v;
  if (Amsgrad) {
    vmax = vmax > v ? vmax : v;  // torch: maximum(vmax, v); NaN propagation differs only for NaN v
    vd = vmax;
  }
  const float den = sqrtf(vd) / c.bc2_sqrt + c.eps;
  return p + (c.neg_step_size * m) / den;
}

}  // namespace wagle
