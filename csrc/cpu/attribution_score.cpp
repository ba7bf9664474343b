// CPU kernel of wagle::attribution_score(_out): one pass over the inputs that writes the fp32
// score and accumulates the 11-bit key histogram used by selection (docs/kernels.md 4.1).
//
// Bytes per element (fp32 in, fp32 out): 16 (wagle: w, g_f, g_r read, s written); 20 with a
// Hessian tensor. The histogram lives in L1 (4 interleaved 2049-bin uint32 copies per thread, so
// consecutive elements in the same bucket do not serialise on one counter) and adds no DRAM traffic.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "common/checks.h"
#include "common/score_math.h"
#include "cpu/cpu_dispatch.h"
#include "cpu/load_float.h"

namespace wagle {
namespace cpu {
namespace {

constexpr int64_t kBlock = 512;     // elements per inner block (scores + buckets stay in L1)
constexpr int kSubHists = 4;
// uint16 sub-histogram counters are flushed into int64 every kFlushEvery elements, so no counter
// can exceed kFlushEvery / kSubHists = 32768 increments.
constexpr int64_t kFlushEvery = int64_t(1) << 17;
constexpr int64_t kStreamMinBytes = int64_t(1) << 20;  // outputs >= 1 MiB use streaming stores


struct ScoreArgs {
  const void* w;
  const void* gf;
  const void* gr;
  const void* h;
  float gamma;
  float eps;
  float* out;
};

// Output stores. Scores of a large tensor are consumed later (by selection), long after they
// left the cache, so they are written with non-temporal stores: no read-for-ownership of the
// destination lines, i.e. 16 instead of 20 bytes of DRAM traffic per element (kind=wagle, fp32).
struct PlainStore {
  static void store(float* dst, const float* src, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }
  static void fence() {}
};
#if WAGLE_X86
struct StreamStoreAvx512 {
  WAGLE_TARGET_AVX512 static void store(float* dst, const float* src, int64_t n) {
    int64_t i = 0;
    while (i < n && (reinterpret_cast<uintptr_t>(dst + i) & 63)) { dst[i] = src[i]; ++i; }
    for (; i + 16 <= n; i += 16) _mm512_stream_ps(dst + i, _mm512_loadu_ps(src + i));
    for (; i < n; ++i) dst[i] = src[i];
  }
  static void fence() { _mm_sfence(); }
};
struct StreamStoreAvx2 {
  WAGLE_TARGET_AVX2 static void store(float* dst, const float* src, int64_t n) {
    int64_t i = 0;
    while (i < n && (reinterpret_cast<uintptr_t>(dst + i) & 31)) { dst[i] = src[i]; ++i; }
    for (; i + 8 <= n; i += 8) _mm256_stream_ps(dst + i, _mm256_loadu_ps(src + i));
    for (; i < n; ++i) dst[i] = src[i];
  }
  static void fence() { _mm_sfence(); }
};
#else
using StreamStoreAvx512 = PlainStore;
using StreamStoreAvx2 = PlainStore;
#endif

// Scores and histogram of elements [begin, end), begin..end spanning at most kFlushEvery
// elements. hist: kSubHists * kHistSize uint16 counters (16 KB: stays in L1 beside the data).
// Scores go to an L1-resident block first (bucketed from there), then to `out` via Store.
template <int Kind, typename TW, typename TG, typename Store, bool kHist>
WAGLE_ALWAYS_INLINE void score_range_body(const ScoreArgs& a, int64_t begin, int64_t end,
                                          uint16_t* __restrict__ hist) {
  const TW* __restrict__ w = static_cast<const TW*>(a.w);
  const TG* __restrict__ gf = static_cast<const TG*>(a.gf);
  const TG* __restrict__ gr = static_cast<const TG*>(a.gr);
  const TG* __restrict__ h = static_cast<const TG*>(a.h);
  float* __restrict__ out = a.out;
  const float gamma = a.gamma, eps = a.eps;
  alignas(64) uint32_t bucket[kBlock];
  alignas(64) float sbuf[kBlock];
  for (int64_t b0 = begin; b0 < end; b0 += kBlock) {
    const int64_t n = std::min<int64_t>(kBlock, end - b0);
    float* __restrict__ o = sbuf;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const int64_t j = b0 + i;
      const float wv = (Kind == kScoreGradient) ? 0.f : load_f<TW>(w, j);
      const float gfv = (Kind == kScoreMagnitude) ? 0.f : load_f<TG>(gf, j);
      const float grv = (Kind == kScoreWagle || Kind == kScoreWagleHessian) ? load_f<TG>(gr, j) : 0.f;
      const float hv = (Kind == kScoreWagleHessian) ? load_f<TG>(h, j) : 0.f;
      const float s = attribution_score<Kind>(wv, gfv, grv, hv, gamma, eps);
      o[i] = s;
      if (kHist) bucket[i] = score_bucket(s);
    }
    Store::store(out + b0, sbuf, n);
    if (!kHist) continue;
    int64_t i = 0;
    for (; i + kSubHists <= n; i += kSubHists) {
      ++hist[0 * kHistSize + bucket[i + 0]];
      ++hist[1 * kHistSize + bucket[i + 1]];
      ++hist[2 * kHistSize + bucket[i + 2]];
      ++hist[3 * kHistSize + bucket[i + 3]];
    }
    for (; i < n; ++i) ++hist[bucket[i]];
  }
  Store::fence();
}

// hist == nullptr: scores only (the caller asked for no histogram).
template <int Kind, typename TW, typename TG, bool kStream>
WAGLE_TARGET_AVX512 void score_range_avx512(const ScoreArgs& a, int64_t b, int64_t e, uint16_t* hist) {
  using St = typename std::conditional<kStream, StreamStoreAvx512, PlainStore>::type;
  if (hist) score_range_body<Kind, TW, TG, St, true>(a, b, e, hist);
  else score_range_body<Kind, TW, TG, St, false>(a, b, e, hist);
}
template <int Kind, typename TW, typename TG, bool kStream>
WAGLE_TARGET_AVX2 void score_range_avx2(const ScoreArgs& a, int64_t b, int64_t e, uint16_t* hist) {
  using St = typename std::conditional<kStream, StreamStoreAvx2, PlainStore>::type;
  if (hist) score_range_body<Kind, TW, TG, St, true>(a, b, e, hist);
  else score_range_body<Kind, TW, TG, St, false>(a, b, e, hist);
}
template <int Kind, typename TW, typename TG, bool kStream>
void score_range_default(const ScoreArgs& a, int64_t b, int64_t e, uint16_t* hist) {
  if (hist) score_range_body<Kind, TW, TG, PlainStore, true>(a, b, e, hist);
  else score_range_body<Kind, TW, TG, PlainStore, false>(a, b, e, hist);
}

using RangeFn = void (*)(const ScoreArgs&, int64_t, int64_t, uint16_t*);

template <int Kind, typename TW, typename TG>
RangeFn pick_isa(Isa isa, bool stream) {
  switch (isa) {
    case Isa::Avx512:
      return stream ? &score_range_avx512<Kind, TW, TG, true> : &score_range_avx512<Kind, TW, TG, false>;
    case Isa::Avx2:
      return stream ? &score_range_avx2<Kind, TW, TG, true> : &score_range_avx2<Kind, TW, TG, false>;
    default: return &score_range_default<Kind, TW, TG, false>;
  }
}

template <typename TW, typename TG>
RangeFn pick_kind(int kind, Isa isa, bool stream) {
  switch (kind) {
    case kScoreWagle: return pick_isa<kScoreWagle, TW, TG>(isa, stream);
    case kScoreWagleHessian: return pick_isa<kScoreWagleHessian, TW, TG>(isa, stream);
    case kScoreSnip: return pick_isa<kScoreSnip, TW, TG>(isa, stream);
    case kScoreGradient: return pick_isa<kScoreGradient, TW, TG>(isa, stream);
    default: return pick_isa<kScoreMagnitude, TW, TG>(isa, stream);
  }
}

template <typename TW>
RangeFn pick_grad_dtype(at::ScalarType tg, int kind, Isa isa, bool stream) {
  switch (tg) {
    case at::kBFloat16: return pick_kind<TW, c10::BFloat16>(kind, isa, stream);
    case at::kHalf: return pick_kind<TW, c10::Half>(kind, isa, stream);
    default: return pick_kind<TW, float>(kind, isa, stream);
  }
}

RangeFn pick(at::ScalarType tw, at::ScalarType tg, int kind, Isa isa, bool stream) {
  switch (tw) {
    case at::kBFloat16: return pick_grad_dtype<c10::BFloat16>(tg, kind, isa, stream);
    case at::kHalf: return pick_grad_dtype<c10::Half>(tg, kind, isa, stream);
    default: return pick_grad_dtype<float>(tg, kind, isa, stream);
  }
}

void attribution_score_out_cpu(const at::Tensor& weight, const c10::optional<at::Tensor>& grad_forget,
                               const c10::optional<at::Tensor>& grad_retain,
                               const c10::optional<at::Tensor>& hessian, c10::string_view kind_s,
                               double gamma, double eps, at::Tensor& out, at::Tensor& hist) {
  TORCH_CHECK_VALUE(weight.defined() && weight.device().is_cpu(), "weight must be a CPU tensor for the CPU kernel");
  const checks::ScoreInputs in = checks::score_inputs(weight, grad_forget, grad_retain, hessian, kind_s, out, hist);
  const int kind = in.kind;
  const bool want_hist = in.want_hist;
  const at::Tensor &w = in.w, &gf = in.gf, &gr = in.gr, &h = in.h;
  const at::ScalarType tg = in.grad_dtype;
  const int64_t n = weight.numel();
  if (n == 0) return;

  ScoreArgs args{w.defined() ? w.data_ptr() : nullptr, gf.defined() ? gf.data_ptr() : nullptr,
                 gr.defined() ? gr.data_ptr() : nullptr, h.defined() ? h.data_ptr() : nullptr,
                 static_cast<float>(gamma), static_cast<float>(eps), out.data_ptr<float>()};
  // Stream (non-temporal) only when the output is far larger than the caches would keep anyway
  // and does not alias an input (in place over g_f, the lines are already owned: plain stores).
  const void* out_ptr = out.data_ptr();
  const bool aliased = out_ptr == args.w || out_ptr == args.gf || out_ptr == args.gr || out_ptr == args.h;
  const bool stream = !aliased && n * static_cast<int64_t>(sizeof(float)) >= kStreamMinBytes;
  RangeFn fn = pick(weight.scalar_type(), tg, kind, cpu_isa(), stream);

  const int nthreads = at::get_num_threads();
  std::vector<int64_t> thread_hist(static_cast<size_t>(nthreads) * kHistSize, 0);
  // Grain: 64K elements (>= 256 KB of traffic) per task; small tensors run on the caller thread.
  at::parallel_for(0, n, 1 << 16, [&](int64_t begin, int64_t end) {
    std::vector<uint16_t> local(static_cast<size_t>(kSubHists) * kHistSize, 0);
    int64_t* th = thread_hist.data() + static_cast<size_t>(at::get_thread_num()) * kHistSize;
    for (int64_t b = begin; b < end; b += kFlushEvery) {
      const int64_t e = std::min<int64_t>(end, b + kFlushEvery);
      fn(args, b, e, want_hist ? local.data() : nullptr);
      if (!want_hist) continue;
      for (int s = 0; s < kSubHists; ++s)
        for (int i = 0; i < kHistSize; ++i) {
          th[i] += local[s * kHistSize + i];
          local[s * kHistSize + i] = 0;
        }
    }
  });
  if (!want_hist) return;
  int64_t* hp = hist.data_ptr<int64_t>();
  for (int t = 0; t < nthreads; ++t)
    for (int i = 0; i < kHistSize; ++i) hp[i] += thread_hist[static_cast<size_t>(t) * kHistSize + i];
}

}  // namespace
}  // namespace cpu
}  // namespace wagle

// The functional attribution_score is device-neutral (csrc/ops.cpp) over this kernel.
TORCH_LIBRARY_IMPL(wagle, CPU, m) { m.impl("attribution_score_out", &wagle::cpu::attribution_score_out_cpu); }
