// CPU kernel of wagle::masked_adamw_: AdamW on the elements selected by a bit mask, with compact
// optimizer state (docs/kernels.md 4.3) and the exact arithmetic of torch's fused CPU AdamW
// (common/adamw_math.h).
//
// Layout per tensor of n elements:
//   bits     uint8[ceil(n/8)]       bit j of byte i = element 8i+j (PackedMask)
//   dir      int64[ceil(n/4096)+1]  compact index of the first selected element of each 4096-element
//                                   chunk (dir[last] = nnz), built once per mask
//   m, v     fp32[nnz]              (vmax too with amsgrad), in element order
//   offsets  int32[nnz] or empty    per-element step offset after a mask change (step_i = step - off)
// A tensor without bits is dense (the state has n entries).
//
// Work: at::parallel_for over all chunks of all tensors. Within a chunk, 64-bit mask words are
// read one at a time: an all-zero word is skipped (masked mode never touches p/g there), an
// all-ones word runs a vectorised dense block, a mixed word walks its set bits (ctz loop).
// Bytes per element at density d (fp32, random mask): 0.125 for the bits, ~12 on the cache lines
// that hold a selected element (read p, g; write p), 16*d for the compact m, v.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "common/adamw_math.h"
#include "common/checks.h"
#include "common/rounding_math.h"
#include "common/score_math.h"
#include "cpu/cpu_dispatch.h"
#include "cpu/mask_words.h"

#if WAGLE_X86
#include <immintrin.h>
#endif

namespace wagle {
namespace cpu {
namespace {

// Mixed words with at least this many set bits take the AVX-512 expand/compress path; sparser
// words are cheaper bit by bit (measured: at 4 the random-mask d=0.1 step was 2.2x slower).
constexpr int kVecMinBits = 24;


constexpr int64_t kPrefetchAhead = 4 * kWord;  // sparse masks: prefetch p/g lines this far ahead

template <typename T>
WAGLE_ALWAYS_INLINE float to_f(T x);
template <>
WAGLE_ALWAYS_INLINE float to_f<float>(float x) { return x; }
template <>
WAGLE_ALWAYS_INLINE float to_f<c10::BFloat16>(c10::BFloat16 x) {
  uint16_t b;
  std::memcpy(&b, &x, 2);
  return bf16_bits_to_float(b);
}
template <>
WAGLE_ALWAYS_INLINE float to_f<c10::Half>(c10::Half x) {
  uint16_t b;
  std::memcpy(&b, &x, 2);
  return fp16_bits_to_float(b);
}
template <typename T>
WAGLE_ALWAYS_INLINE T from_f(float x) { return static_cast<T>(x); }  // round to nearest even

// The parameter value written for fp32 result x of element i: round to nearest even, or with
// R == kRoundStochastic the stochastic rounding of common/rounding_math.h (bf16/fp16 only).
template <typename T, int R>
WAGLE_ALWAYS_INLINE T round_out(float x, uint64_t key, int64_t i) {
  T y = from_f<T>(x);
  if (R == kRoundStochastic && !std::is_same<T, float>::value) {
    uint16_t b;
    std::memcpy(&b, &y, 2);
    b = static_cast<uint16_t>(stochastic_round_bits<std::is_same<T, c10::Half>::value>(x, b, sr_bits(key, i)));
    std::memcpy(&y, &b, 2);
  }
  return y;
}

// One tensor of the list.
struct TensorArgs {
  void* p;
  void* g;
  float* m;
  float* v;
  float* vmax;
  const uint8_t* bits;     // nullptr: dense
  const int64_t* dir;      // nullptr: dense
  const int32_t* offsets;  // nullptr: every element uses the tensor's step
  float* mw;               // compact fp32 master weights (nnz), or nullptr (masked_adamw_)
  uint64_t sr_key;         // stochastic rounding: sr_key(seed, step) of this tensor and step
  int64_t n;
  int64_t tail_start;  // elements >= tail_start use torch's scalar-tail contraction of v
  bool gc;             // compact grads: g is float32[nnz], indexed by the compact slot k
  double step;
  AdamwCoeffs c;
};

struct StepArgs {
  double lr, beta1, beta2, weight_decay, eps;
  int mode;
  bool maximize;
  bool has_scale;
  float scale;
};

// Gradient as used by the update: unscaled (and written back, as torch does), then negated for
// maximize.
template <typename T>
WAGLE_ALWAYS_INLINE float grad_in(T* g, int64_t i, const StepArgs& s) {
  float gv = to_f<T>(g[i]);
  if (s.has_scale) {
    gv = gv / s.scale;
    g[i] = from_f<T>(gv);
  }
  return s.maximize ? -gv : gv;
}

// Scalar update of element i with compact slot k.
// R: kRoundNoMaster (p is read and written), or master weights (the fp32 value is read from and
// written to mw[k], p[i] only written, rounded).
template <typename T, bool Amsgrad, int R>
WAGLE_ALWAYS_INLINE void update_one(const TensorArgs& t, const StepArgs& s, const AdamwCoeffs& c,
                                    int64_t i, int64_t k) {
  T* p = static_cast<T*>(t.p);
  const float gv = t.gc ? grad_in<float>(static_cast<float*>(t.g), k, s) : grad_in<T>(static_cast<T*>(t.g), i, s);
  const float pin = R != kRoundNoMaster ? t.mw[k] : to_f<T>(p[i]);
  const float pv = adamw_no_contract(pin * c.decay);
  float dummy = 0.f;
  float& vm = Amsgrad ? t.vmax[k] : dummy;
  const float pn = adamw_element<Amsgrad>(pv, gv, t.m[k], t.v[k], vm, c, i >= t.tail_start);
  if (R != kRoundNoMaster) t.mw[k] = pn;
  p[i] = round_out<T, R>(pn, t.sr_key, i);
}

// 64 consecutive selected elements [e, e+64) with slots [k, k+64), all before tail_start.
// Two loops so that p*decay is rounded before the final add (no contraction), both vectorised.
template <typename T, bool Amsgrad, int R>
WAGLE_ALWAYS_INLINE void update_dense_word(const TensorArgs& t, const StepArgs& s, int64_t e, int64_t k) {
  T* __restrict__ p = static_cast<T*>(t.p) + e;
  float* __restrict__ m = t.m + k;
  float* __restrict__ v = t.v + k;
  float* __restrict__ vmax = Amsgrad ? t.vmax + k : nullptr;
  const AdamwCoeffs c = t.c;
  alignas(64) float pf[kWord];
  alignas(64) float gf[kWord];
  const float scale = s.scale;
  const float sign = s.maximize ? -1.0f : 1.0f;
  if (t.gc) {
    float* __restrict__ g = static_cast<float*>(t.g) + k;
    if (s.has_scale) {
#pragma omp simd
      for (int i = 0; i < kWord; ++i) {
        const float gv = g[i] / scale;
        g[i] = gv;
        gf[i] = gv * sign;
      }
    } else {
#pragma omp simd
      for (int i = 0; i < kWord; ++i) gf[i] = g[i] * sign;
    }
  } else if (s.has_scale) {
    T* __restrict__ g = static_cast<T*>(t.g) + e;
#pragma omp simd
    for (int i = 0; i < kWord; ++i) {
      const float gv = to_f<T>(g[i]) / scale;
      g[i] = from_f<T>(gv);
      gf[i] = gv * sign;
    }
  } else {
    T* __restrict__ g = static_cast<T*>(t.g) + e;
#pragma omp simd
    for (int i = 0; i < kWord; ++i) gf[i] = to_f<T>(g[i]) * sign;
  }
  if (R != kRoundNoMaster) {
    const float* __restrict__ mw = t.mw + k;
#pragma omp simd
    for (int i = 0; i < kWord; ++i) pf[i] = mw[i] * c.decay;
  } else {
#pragma omp simd
    for (int i = 0; i < kWord; ++i) pf[i] = to_f<T>(p[i]) * c.decay;
  }
#pragma omp simd
  for (int i = 0; i < kWord; ++i) {
    const float gv = gf[i];
    const float d = gv - m[i];
    const float mn = c.lerp_small ? adamw_fma(c.w1, d, m[i]) : adamw_fma(c.w1m1, d, gv);
    const float vn = adamw_fma(c.c2 * gv, gv, v[i] * c.b2);
    m[i] = mn;
    v[i] = vn;
    float vd = vn;
    if (Amsgrad) {
      const float vx = vmax[i] > vn ? vmax[i] : vn;
      vmax[i] = vx;
      vd = vx;
    }
    const float den = sqrtf(vd) / c.bc2_sqrt + c.eps;
    if (R == kRoundNoMaster) {
      p[i] = from_f<T>(pf[i] + (c.neg_step_size * mn) / den);
    } else {
      pf[i] = pf[i] + (c.neg_step_size * mn) / den;
    }
  }
  if (R != kRoundNoMaster) {
    float* __restrict__ mw = t.mw + k;
#pragma omp simd
    for (int i = 0; i < kWord; ++i) mw[i] = pf[i];
    if (R == kRoundNearest) {
#pragma omp simd
      for (int i = 0; i < kWord; ++i) p[i] = from_f<T>(pf[i]);
    } else {
      // stochastic rounding on the 16-bit patterns (T is bf16 or fp16 here) in uint32 lanes, one
      // vectorised loop: within a 64-aligned word, lo32(e + i) = lo32(e) + i and hi32(e + i) = hi32(e),
      // so sr_bits(key, e + i) is computed on 32-bit integers. fp16 takes c10's RNE pattern first.
      uint16_t* __restrict__ pb = reinterpret_cast<uint16_t*>(p);
      const uint32_t k0 = static_cast<uint32_t>(t.sr_key);
      const uint32_t k1 = static_cast<uint32_t>(t.sr_key >> 32) ^ static_cast<uint32_t>(static_cast<uint64_t>(e) >> 32);
      const uint32_t e0 = static_cast<uint32_t>(e);
      alignas(64) uint32_t nb[kWord];
      alignas(64) uint32_t out[kWord];
      if (std::is_same<T, c10::BFloat16>::value) {
#pragma omp simd
        for (int i = 0; i < kWord; ++i) nb[i] = f32_to_bf16_rne_bits(pf[i]);
      } else {
        for (int i = 0; i < kWord; ++i) {
          const T y = from_f<T>(pf[i]);
          uint16_t b16;
          std::memcpy(&b16, &y, 2);
          nb[i] = b16;
        }
      }
      constexpr bool kFp16 = std::is_same<T, c10::Half>::value;
#pragma omp simd
      for (int i = 0; i < kWord; ++i)
        out[i] = stochastic_round_bits<kFp16>(pf[i], nb[i], hash32(hash32((e0 + static_cast<uint32_t>(i)) ^ k0) ^ k1));
#pragma omp simd
      for (int i = 0; i < kWord; ++i) pb[i] = static_cast<uint16_t>(out[i]);
    }
  }
}

#if WAGLE_X86
// A mixed 64-bit word of a float32 tensor (before tail_start, tensor-wide step), AVX-512:
// 16 lanes at a time, compact m/v gathered with expand-loads and written back with
// compress + masked stores, p written with a masked store. Same operations, same rounding as
// update_one (common/adamw_math.h vector-region form). Returns the next compact slot.
template <bool Amsgrad>
WAGLE_TARGET_AVX512 int64_t mixed_word_f32_avx512(const TensorArgs& t, const StepArgs& s, int64_t e,
                                                  uint64_t w, int64_t k) {
  float* p = static_cast<float*>(t.p) + e;
  float* g = static_cast<float*>(t.g) + (t.gc ? 0 : e);  // compact grads: slot k, else element e
  const AdamwCoeffs& c = t.c;
  const __m512 decay = _mm512_set1_ps(c.decay), w1 = _mm512_set1_ps(c.w1), w1m1 = _mm512_set1_ps(c.w1m1);
  const __m512 c2 = _mm512_set1_ps(c.c2), b2 = _mm512_set1_ps(c.b2), bcs = _mm512_set1_ps(c.bc2_sqrt);
  const __m512 eps = _mm512_set1_ps(c.eps), nss = _mm512_set1_ps(c.neg_step_size);
  const __m512 scale = _mm512_set1_ps(s.scale);
  for (int j = 0; j < 4; ++j, w >>= 16) {
    const __mmask16 km = static_cast<__mmask16>(w & 0xFFFF);
    if (!km) continue;
    // compress in a register + masked store of the first pc lanes: a compress-store to memory is
    // microcoded (slow) on several x86 cores
    const int pc = __builtin_popcount(static_cast<unsigned>(km));
    const __mmask16 kc = static_cast<__mmask16>((1u << pc) - 1u);
    __m512 gv = t.gc ? _mm512_maskz_expand_ps(km, _mm512_maskz_loadu_ps(kc, g + k))
                     : _mm512_maskz_loadu_ps(km, g + 16 * j);
    if (s.has_scale) {
      gv = _mm512_div_ps(gv, scale);
      if (t.gc) {
        _mm512_mask_storeu_ps(g + k, kc, _mm512_maskz_compress_ps(km, gv));
      } else {
        _mm512_mask_storeu_ps(g + 16 * j, km, gv);
      }
    }
    if (s.maximize) gv = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(gv), _mm512_set1_epi32(INT32_MIN)));
    __m512 p1 = _mm512_mul_ps(_mm512_maskz_loadu_ps(km, p + 16 * j), decay);
    __asm__("" : "+v"(p1));  // round p*decay before the final add (no contraction)
    const __m512 m = _mm512_maskz_expand_ps(km, _mm512_maskz_loadu_ps(kc, t.m + k));
    const __m512 v = _mm512_maskz_expand_ps(km, _mm512_maskz_loadu_ps(kc, t.v + k));
    const __m512 d = _mm512_sub_ps(gv, m);
    const __m512 mn = c.lerp_small ? _mm512_fmadd_ps(w1, d, m) : _mm512_fmadd_ps(w1m1, d, gv);
    const __m512 vn = _mm512_fmadd_ps(_mm512_mul_ps(c2, gv), gv, _mm512_mul_ps(v, b2));
    __m512 vd = vn;
    if (Amsgrad) {
      const __m512 vx0 = _mm512_maskz_expand_ps(km, _mm512_maskz_loadu_ps(kc, t.vmax + k));
      // vmax > vn ? vmax : vn
      vd = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(vx0, vn, _CMP_GT_OQ), vn, vx0);
      _mm512_mask_storeu_ps(t.vmax + k, kc, _mm512_maskz_compress_ps(km, vd));
    }
    const __m512 den = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(vd), bcs), eps);
    const __m512 pn = _mm512_add_ps(p1, _mm512_div_ps(_mm512_mul_ps(nss, mn), den));
    _mm512_mask_storeu_ps(p + 16 * j, km, pn);
    _mm512_mask_storeu_ps(t.m + k, kc, _mm512_maskz_compress_ps(km, mn));
    _mm512_mask_storeu_ps(t.v + k, kc, _mm512_maskz_compress_ps(km, vn));
    k += pc;
  }
  return k;
}
#endif

// weight_decay_mode="all": p *= decay on unselected elements (what grad*=mask + torch AdamW does to
// a weight whose moments are zero).
template <typename T>
WAGLE_ALWAYS_INLINE void decay_word(const TensorArgs& t, int64_t e, uint64_t unselected) {
  T* p = static_cast<T*>(t.p);
  const float decay = t.c.decay;
  if (unselected == ~uint64_t(0)) {
    T* __restrict__ q = p + e;
#pragma omp simd
    for (int i = 0; i < kWord; ++i) q[i] = from_f<T>(to_f<T>(q[i]) * decay);
    return;
  }
  while (unselected) {
    const int b = __builtin_ctzll(unselected);
    unselected &= unselected - 1;
    p[e + b] = from_f<T>(to_f<T>(p[e + b]) * decay);
  }
}

// Per-element coefficients for tensors whose elements carry their own step (after set_masks);
// consecutive elements nearly always share a step, so the last one is cached.
struct CoeffCache {
  double step = -1.0;
  AdamwCoeffs c;
};

WAGLE_ALWAYS_INLINE const AdamwCoeffs& coeffs_for(const TensorArgs& t, const StepArgs& s, int64_t k,
                                                  CoeffCache& cache) {
  if (!t.offsets) return t.c;
  const double step = t.step - static_cast<double>(t.offsets[k]);
  if (step != cache.step) {
    cache.step = step;
    cache.c = adamw_coeffs(s.lr, s.beta1, s.beta2, s.mode == kDecayNone ? 0.0 : s.weight_decay, s.eps, step);
  }
  return cache.c;
}

// Chunk `chunk` of tensor t. Returns false if the directory disagrees with the bits.
template <typename T, bool Amsgrad, bool Avx512, int R>
WAGLE_ALWAYS_INLINE bool chunk_body(const TensorArgs& t, const StepArgs& s, int64_t chunk) {
  const int64_t e0 = chunk * kChunk;
  const int64_t e1 = std::min(t.n, e0 + kChunk);
  const bool dense = t.bits == nullptr;
  int64_t k = dense ? e0 : t.dir[chunk];
  const int64_t k_end = dense ? e1 : t.dir[chunk + 1];
  const bool decay_all = s.mode == kDecayAll && t.c.decay != 1.0f;
  CoeffCache cache;
  for (int64_t e = e0; e < e1; e += kWord) {
    const int64_t cnt = std::min<int64_t>(kWord, e1 - e);
    const uint64_t valid = cnt == kWord ? ~uint64_t(0) : ((uint64_t(1) << cnt) - 1);
    const uint64_t w = dense ? valid : load_word(t.bits, e, cnt);
    if (!dense && e + kPrefetchAhead + kWord <= e1) {
      // Sparse random masks touch scattered cache lines of p and g; fetch the lines that hold
      // selected elements a few words ahead so the misses overlap.
      uint64_t wa = load_word(t.bits, e + kPrefetchAhead, kWord);
      // Only very sparse words: denser ones keep the hardware prefetcher streaming anyway.
      if (__builtin_popcountll(wa) > 2) wa = 0;
      constexpr int kLine = 64 / static_cast<int>(sizeof(T));  // elements per cache line
      const T* pa = static_cast<const T*>(t.p) + e + kPrefetchAhead;
      const T* ga = static_cast<const T*>(t.g) + e + kPrefetchAhead;
      while (wa) {
        const int b = __builtin_ctzll(wa) & ~(kLine - 1);
        __builtin_prefetch(pa + b, 1);
        if (!t.gc) __builtin_prefetch(ga + b, 0);
        wa &= (b + kLine >= 64) ? 0 : (~uint64_t(0) << (b + kLine));
      }
    }
    if (w == 0) {
      if (decay_all) decay_word<T>(t, e, valid);
      continue;
    }
    const int64_t pc = __builtin_popcountll(w);
    if (k + pc > k_end) return false;
    if (w == ~uint64_t(0) && e + kWord <= t.tail_start && !t.offsets) {
      update_dense_word<T, Amsgrad, R>(t, s, e, k);
      k += kWord;
      continue;
    }
    if (decay_all && (w != valid)) decay_word<T>(t, e, valid & ~w);
#if WAGLE_X86
    // Only for well-filled words: a vector lane costs its sqrt/div whether selected or not, so
    // sparse words (below ~3/8 filled) are cheaper bit by bit.
    if (Avx512 && R == kRoundNoMaster && std::is_same<T, float>::value && pc >= kVecMinBits && cnt == kWord && e + kWord <= t.tail_start && !t.offsets) {
      k = mixed_word_f32_avx512<Amsgrad>(t, s, e, w, k);
      continue;
    }
#endif
    uint64_t bitsleft = w;
    while (bitsleft) {
      const int b = __builtin_ctzll(bitsleft);
      bitsleft &= bitsleft - 1;
      update_one<T, Amsgrad, R>(t, s, coeffs_for(t, s, k, cache), e + b, k);
      ++k;
    }
  }
  return k == k_end;
}

struct ListArgs {
  const std::vector<TensorArgs>* tensors;
  const std::vector<int64_t>* chunk_start;  // prefix sums of chunk counts, size tensors+1
  const StepArgs* s;
};

// Chunks [begin, end) of the flattened chunk list. Returns false on a directory mismatch.
template <typename T, bool Amsgrad, bool Avx512, int R>
WAGLE_ALWAYS_INLINE bool range_body(const ListArgs& a, int64_t begin, int64_t end) {
  const auto& cs = *a.chunk_start;
  int64_t ti = std::upper_bound(cs.begin(), cs.end(), begin) - cs.begin() - 1;
  bool ok = true;
  for (int64_t gc = begin; gc < end; ++gc) {
    while (gc >= cs[ti + 1]) ++ti;
    ok &= chunk_body<T, Amsgrad, Avx512, R>((*a.tensors)[ti], *a.s, gc - cs[ti]);
  }
  return ok;
}

template <typename T, bool Amsgrad, int R>
WAGLE_TARGET_AVX512 bool range_avx512(const ListArgs& a, int64_t b, int64_t e) {
  return range_body<T, Amsgrad, WAGLE_X86 != 0, R>(a, b, e);
}
template <typename T, bool Amsgrad, int R>
WAGLE_TARGET_AVX2 bool range_avx2(const ListArgs& a, int64_t b, int64_t e) {
  return range_body<T, Amsgrad, false, R>(a, b, e);
}
template <typename T, bool Amsgrad, int R>
bool range_default(const ListArgs& a, int64_t b, int64_t e) {
  return range_body<T, Amsgrad, false, R>(a, b, e);
}

using RangeFn = bool (*)(const ListArgs&, int64_t, int64_t);

template <typename T, bool Amsgrad, int R>
RangeFn pick_isa(Isa isa) {
  switch (isa) {
    case Isa::Avx512: return &range_avx512<T, Amsgrad, R>;
    case Isa::Avx2: return &range_avx2<T, Amsgrad, R>;
    default: return &range_default<T, Amsgrad, R>;
  }
}

template <typename T, int R>
RangeFn pick_ams(bool amsgrad, Isa isa) {
  return amsgrad ? pick_isa<T, true, R>(isa) : pick_isa<T, false, R>(isa);
}

// Master weights exist for bf16/fp16 params only (checks::check_master_lists): fp32 instantiates R = 0.
template <typename T>
RangeFn pick_round(int rounding, bool amsgrad, Isa isa) {
  switch (rounding) {
    case kRoundNearest: return pick_ams<T, kRoundNearest>(amsgrad, isa);
    case kRoundStochastic: return pick_ams<T, kRoundStochastic>(amsgrad, isa);
    default: return pick_ams<T, kRoundNoMaster>(amsgrad, isa);
  }
}

RangeFn pick(at::ScalarType dt, int rounding, bool amsgrad, Isa isa) {
  switch (dt) {
    case at::kBFloat16: return pick_round<c10::BFloat16>(rounding, amsgrad, isa);
    case at::kHalf: return pick_round<c10::Half>(rounding, amsgrad, isa);
    default: return pick_ams<float, kRoundNoMaster>(amsgrad, isa);
  }
}

// masked_adamw_master_ (and masked_adamw_: empty master_weights). With master weights, the fp32
// value of selected element k is read from and written to master_weights[i][k] and the parameter
// only written (round to nearest even, or stochastic rounding keyed by rounding_seeds[i]).
void masked_adamw_master_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                             at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                             at::TensorList state_steps, at::TensorList mask_bits, at::TensorList chunk_offsets,
                             at::TensorList step_offsets, at::TensorList master_weights, double lr, double beta1,
                             double beta2, double weight_decay, double eps, bool amsgrad, bool maximize,
                             c10::string_view weight_decay_mode, const c10::optional<at::Tensor>& grad_scale,
                             const c10::optional<at::Tensor>& found_inf, int64_t torch_tail, bool compact_grads,
                             at::IntArrayRef rounding_seeds) {
  const size_t nt = params.size();
  const at::Device cpu(at::kCPU);
  const int mode = checks::parse_weight_decay_mode(weight_decay_mode);
  checks::check_adamw_lists(nt, grads.size(), exp_avgs.size(), exp_avg_sqs.size(), max_exp_avg_sqs.size(),
                            state_steps.size(), mask_bits.size(), chunk_offsets.size(), step_offsets.size(), amsgrad,
                            torch_tail);
  const int rounding = checks::check_master_lists(nt, master_weights.size(), rounding_seeds.size(),
                                                  nt ? params[0] : at::Tensor());
  if (found_inf.has_value() && found_inf->defined()) {
    checks::check_scalar(*found_inf, "masked_adamw_: found_inf", cpu);
    // torch's fused kernels: `if (found_inf_ptr && *found_inf_ptr == 1) return;`
    if (found_inf->to(at::kFloat).item<float>() == 1.0f) return;
  }
  StepArgs s{lr, beta1, beta2, weight_decay, eps, mode, maximize, false, 1.0f};
  if (grad_scale.has_value() && grad_scale->defined()) {
    checks::check_scalar(*grad_scale, "masked_adamw_: grad_scale", cpu);
    s.has_scale = true;
    s.scale = grad_scale->to(at::kFloat).item<float>();
  }
  const double wd_eff = mode == kDecayNone ? 0.0 : weight_decay;
  if (nt == 0) return;
  const at::ScalarType dt = checks::adamw_param_dtype(params[0]);

  std::vector<TensorArgs> ts;
  std::vector<int64_t> chunk_start{0};
  ts.reserve(nt);
  for (size_t i = 0; i < nt; ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& g = grads[i];
    checks::check_param_grad(p, g, dt, compact_grads, i, cpu);
    const int64_t n = p.numel();
    const at::Tensor& st = state_steps[i];
    checks::check_scalar(st, "masked_adamw_: state_steps[" + std::to_string(i) + "]", cpu);
    TensorArgs a{};
    a.p = p.data_ptr();
    a.g = g.data_ptr();
    a.n = n;
    a.tail_start = torch_tail > 0 ? n - n % torch_tail : n;
    // torch: `double step = state_step.item<float>()`
    a.step = static_cast<double>(st.to(at::kFloat).item<float>());
    a.c = adamw_coeffs(lr, beta1, beta2, wd_eff, eps, a.step);
    int64_t nnz = n;
    const at::Tensor& bits = mask_bits[i];
    const at::Tensor& dir = chunk_offsets[i];
    const int64_t nchunks = dir_chunks(n);
    if (bits.numel() > 0 || dir.numel() > 0) {
      const std::string dir_name = "masked_adamw_: chunk_offsets[" + std::to_string(i) + "]";
      checks::check_mask_layout(bits, dir, n, "masked_adamw_: mask_bits[" + std::to_string(i) + "]", dir_name, cpu);
      const int64_t* d = dir.data_ptr<int64_t>();
      nnz = checks::check_directory(d, nchunks, dir_name);
      a.bits = bits.data_ptr<uint8_t>();
      a.dir = d;
    }
    if (compact_grads) {
      checks::check_compact_grad_numel(g, nnz, i);
      a.gc = true;
    }
    checks::check_state(exp_avgs[i], nnz, "exp_avgs", i, cpu);
    checks::check_state(exp_avg_sqs[i], nnz, "exp_avg_sqs", i, cpu);
    a.m = exp_avgs[i].data_ptr<float>();
    a.v = exp_avg_sqs[i].data_ptr<float>();
    if (amsgrad) {
      checks::check_state(max_exp_avg_sqs[i], nnz, "max_exp_avg_sqs", i, cpu);
      a.vmax = max_exp_avg_sqs[i].data_ptr<float>();
    }
    if (rounding != kRoundNoMaster) {
      checks::check_state(master_weights[i], nnz, "master_weights", i, cpu);
      a.mw = master_weights[i].data_ptr<float>();
      if (rounding == kRoundStochastic)
        a.sr_key = sr_key(static_cast<uint64_t>(rounding_seeds[i]), static_cast<int64_t>(a.step));
    }
    if (checks::check_step_offsets(step_offsets[i], nnz, i, cpu)) {
      a.offsets = step_offsets[i].data_ptr<int32_t>();
      checks::check_step_offset_values(a.offsets, nnz, a.step, i);
    }
    if (nnz == 0 && !(mode == kDecayAll && a.c.decay != 1.0f)) {
      chunk_start.push_back(chunk_start.back());  // nothing to read or write
    } else {
      chunk_start.push_back(chunk_start.back() + nchunks);
    }
    ts.push_back(a);
  }
  // Tensors skipped above keep their chunk count at 0 in chunk_start; nchunks for the rest.
  const int64_t total = chunk_start.back();
  if (total == 0) return;
  ListArgs la{&ts, &chunk_start, &s};
  RangeFn fn = pick(dt, rounding, amsgrad, cpu_isa());
  std::atomic<bool> ok{true};
  // Grain: 8 chunks (32K elements) per task; small lists run on the calling thread.
  at::parallel_for(0, total, 8, [&](int64_t b, int64_t e) {
    if (!fn(la, b, e)) ok.store(false);
  });
  TORCH_CHECK_VALUE(ok.load(), "masked_adamw_: chunk_offsets do not match mask_bits (rebuild the "
                               "directory from the mask); the state may be partially updated");
}

void masked_adamw_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                      at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                      at::TensorList state_steps, at::TensorList mask_bits, at::TensorList chunk_offsets,
                      at::TensorList step_offsets, double lr, double beta1, double beta2,
                      double weight_decay, double eps, bool amsgrad, bool maximize,
                      c10::string_view weight_decay_mode, const c10::optional<at::Tensor>& grad_scale,
                      const c10::optional<at::Tensor>& found_inf, int64_t torch_tail, bool compact_grads) {
  masked_adamw_master_cpu(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, mask_bits,
                          chunk_offsets, step_offsets, {}, lr, beta1, beta2, weight_decay, eps, amsgrad, maximize,
                          weight_decay_mode, grad_scale, found_inf, torch_tail, compact_grads, {});
}

}  // namespace
}  // namespace cpu
}  // namespace wagle

TORCH_LIBRARY_IMPL(wagle, CPU, m) {
  m.impl("masked_adamw_", &wagle::cpu::masked_adamw_cpu);
  m.impl("masked_adamw_master_", &wagle::cpu::masked_adamw_master_cpu);
}
