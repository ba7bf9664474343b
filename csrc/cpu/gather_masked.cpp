// CPU kernel of wagle::gather_masked_: the selected entries of a dense gradient, compacted into a
// float32[nnz] buffer (or added to it), in flat element order -- the gradient layout of
// masked_adamw_(compact_grads=True). Used by MaskedAdamW(grad_mode="compact") in a
// post-accumulate-grad hook, once per parameter per backward, so the dense gradient can be freed
// right away.
//
// Work: at::parallel_for over 4096-element chunks; chunk c writes out[dir[c] : dir[c+1]]. Per
// 64-bit mask word: zero -> skip (the gradient's cache lines are not read), all ones -> a
// vectorised copy/add of 64 elements, mixed -> AVX-512 compress of 16 lanes at a time (any dtype,
// widened to fp32 in registers), or a ctz loop over the set bits on other ISAs.
// Bytes: n/8 (bits) + the cache lines of src that hold a selected element + 4*nnz written
// (+4*nnz read with accumulate).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <type_traits>

#include "common/checks.h"
#include "cpu/cpu_dispatch.h"
#include "cpu/mask_words.h"
#include "cpu/load_float.h"

#if WAGLE_X86
#include <immintrin.h>
#endif

namespace wagle {
namespace cpu {
namespace {

struct GatherArgs {
  const void* src;
  float* out;
  const uint8_t* bits;
  const int64_t* dir;
  int64_t n;
  bool accumulate;
};

#if WAGLE_X86
// 16 elements of src starting at s, widened to fp32 (only lanes in km are read).
template <typename T>
WAGLE_TARGET_AVX512 inline __m512 load16_avx512(const T* s, __mmask16 km) {
  if constexpr (std::is_same<T, float>::value) return _mm512_maskz_loadu_ps(km, reinterpret_cast<const float*>(s));
  const __m256i h = _mm256_maskz_loadu_epi16(km, reinterpret_cast<const void*>(s));
  if constexpr (std::is_same<T, c10::BFloat16>::value)  // bf16 -> fp32 is a 16-bit shift (exact)
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  return _mm512_cvtph_ps(h);  // fp16 -> fp32 (exact, subnormals included)
}

// A mixed word: compress the selected lanes of each 16-element group into out[k...].
template <typename T>
WAGLE_TARGET_AVX512 int64_t mixed_word_avx512(const GatherArgs& a, int64_t e, uint64_t w,
                                                                  int64_t k) {
  const T* s = static_cast<const T*>(a.src) + e;
  for (int j = 0; j < 4; ++j, w >>= 16) {
    const __mmask16 km = static_cast<__mmask16>(w & 0xFFFF);
    if (!km) continue;
    const int pc = __builtin_popcount(static_cast<unsigned>(km));
    const __mmask16 kc = static_cast<__mmask16>((1u << pc) - 1u);
    // compress in a register + masked store: a compress-store to memory is microcoded on
    // several x86 cores
    __m512 v = _mm512_maskz_compress_ps(km, load16_avx512<T>(s + 16 * j, km));
    if (a.accumulate) v = _mm512_add_ps(_mm512_maskz_loadu_ps(kc, a.out + k), v);
    _mm512_mask_storeu_ps(a.out + k, kc, v);
    k += pc;
  }
  return k;
}
#endif

// Chunk `chunk`: returns false when the directory disagrees with the bits.
template <typename T, bool Avx512>
WAGLE_ALWAYS_INLINE bool chunk_body(const GatherArgs& a, int64_t chunk) {
  const int64_t e0 = chunk * kChunk;
  const int64_t e1 = std::min(a.n, e0 + kChunk);
  int64_t k = a.dir[chunk];
  const int64_t k_end = a.dir[chunk + 1];
  const T* src = static_cast<const T*>(a.src);
  float* out = a.out;
  for (int64_t e = e0; e < e1; e += kWord) {
    const int64_t cnt = std::min<int64_t>(kWord, e1 - e);
    const uint64_t w = load_word(a.bits, e, cnt);
    if (w == 0) continue;
    const int64_t pc = __builtin_popcountll(w);
    if (k + pc > k_end) return false;
    if (w == ~uint64_t(0)) {
      const T* __restrict__ s = src + e;
      float* __restrict__ o = out + k;
      if (a.accumulate) {
#pragma omp simd
        for (int i = 0; i < kWord; ++i) o[i] += load_f<T>(s, i);
      } else {
#pragma omp simd
        for (int i = 0; i < kWord; ++i) o[i] = load_f<T>(s, i);
      }
      k += kWord;
      continue;
    }
#if WAGLE_X86
    if constexpr (Avx512) {
      k = mixed_word_avx512<T>(a, e, w, k);
      continue;
    }
#endif
    uint64_t left = w;
    if (a.accumulate) {
      while (left) {
        const int b = __builtin_ctzll(left);
        left &= left - 1;
        out[k++] += load_f<T>(src, e + b);
      }
    } else {
      while (left) {
        const int b = __builtin_ctzll(left);
        left &= left - 1;
        out[k++] = load_f<T>(src, e + b);
      }
    }
  }
  return k == k_end;
}

template <typename T, bool Avx512>
WAGLE_ALWAYS_INLINE bool range_body(const GatherArgs& a, int64_t b, int64_t e) {
  bool ok = true;
  for (int64_t c = b; c < e; ++c) ok &= chunk_body<T, Avx512>(a, c);
  return ok;
}

template <typename T>
WAGLE_TARGET_AVX512 bool range_avx512(const GatherArgs& a, int64_t b, int64_t e) {
  return range_body<T, WAGLE_X86 != 0>(a, b, e);
}
template <typename T>
WAGLE_TARGET_AVX2 bool range_avx2(const GatherArgs& a, int64_t b, int64_t e) {
  return range_body<T, false>(a, b, e);
}
template <typename T>
bool range_default(const GatherArgs& a, int64_t b, int64_t e) {
  return range_body<T, false>(a, b, e);
}

using RangeFn = bool (*)(const GatherArgs&, int64_t, int64_t);

template <typename T>
RangeFn pick_isa(Isa isa) {
  switch (isa) {
    case Isa::Avx512: return &range_avx512<T>;
    case Isa::Avx2: return &range_avx2<T>;
    default: return &range_default<T>;
  }
}

RangeFn pick(at::ScalarType dt, Isa isa) {
  switch (dt) {
    case at::kBFloat16: return pick_isa<c10::BFloat16>(isa);
    case at::kHalf: return pick_isa<c10::Half>(isa);
    default: return pick_isa<float>(isa);
  }
}

void gather_masked_cpu(const at::Tensor& out, const at::Tensor& src, const at::Tensor& bits,
                       const at::Tensor& chunk_offsets, bool accumulate) {
  checks::check_gather(out, src, bits, chunk_offsets, at::Device(at::kCPU));
  const at::ScalarType dt = src.scalar_type();
  const int64_t n = src.numel();
  const int64_t nchunks = dir_chunks(n);
  const int64_t* d = chunk_offsets.data_ptr<int64_t>();
  const int64_t nnz = checks::check_directory(d, nchunks, "gather_masked_: chunk_offsets");
  TORCH_CHECK_VALUE(out.numel() == nnz, "gather_masked_: out must be a contiguous float32 tensor with ", nnz,
                    " entries (one per selected element), got ", out.scalar_type(), "[", out.numel(), "]");
  if (nnz == 0) return;
  GatherArgs a{src.data_ptr(), out.data_ptr<float>(), bits.data_ptr<uint8_t>(), d, n, accumulate};
  RangeFn fn = pick(dt, cpu_isa());
  std::atomic<bool> ok{true};
  // Grain: 16 chunks (64K elements) per task.
  at::parallel_for(0, nchunks, 16, [&](int64_t b, int64_t e) {
    if (!fn(a, b, e)) ok.store(false);
  });
  TORCH_CHECK_VALUE(ok.load(), "gather_masked_: chunk_offsets do not match bits (rebuild the directory from "
                               "the mask); out may be partially written");
}

}  // namespace
}  // namespace cpu
}  // namespace wagle

TORCH_LIBRARY_IMPL(wagle, CPU, m) { m.impl("gather_masked_", &wagle::cpu::gather_masked_cpu); }
