// CPU kernels of the exact top-k selection primitives (docs/kernels.md 4.2): radix_histogram,
// count_key and topk_mask_bits over a LIST of score tensors. The orchestration (which digit, which
// threshold, tie quotas, multi-process all-reduce) lives in wagle_ext/ops.py::_select_bits.
//
// Parallelism: every op builds one global work list of (tensor, chunk) ranges -- chunks are
// kChunk elements, aligned to multiples of 64 inside each tensor -- and cuts it into
// element-balanced groups of chunks that the threads claim dynamically (for_parts), so 200 small
// tensors parallelise like one big one. Memory: per-thread histograms / counters only (a few KB
// per thread); the mask pass writes whole 64-bit words of the output bits, and a chunk always
// owns whole words, so threads never share a byte. Each pass reads 4 B (fp32) or 2 B (bf16/fp16) per element once.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "common/checks.h"
#include "common/score_math.h"
#include "common/select_math.h"
#include "cpu/cpu_dispatch.h"
#include "cpu/load_float.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "select_topk.cpp stores 64-bit mask words as little-endian bytes"
#endif

namespace wagle {
namespace cpu {
namespace {

constexpr int64_t kChunk = int64_t(1) << 16;  // elements per work item; multiple of 64
constexpr int kSubHists = 4;                   // interleaved counters against same-bin stalls
constexpr int64_t kFlushEvery = int64_t(1) << 30;  // uint32 counters flushed before overflow

// 64 0/1 flag bytes -> one mask word (flag i -> bit i).
WAGLE_ALWAYS_INLINE uint64_t pack64(const uint8_t* f) {
  uint64_t w = 0;
  for (int j = 0; j < 8; ++j) {
    uint64_t x;
    std::memcpy(&x, f + 8 * j, 8);
    w |= pack8_flags(x) << (8 * j);
  }
  return w;
}

// ----------------------------------------------------------------------------- kernel bodies
// Level-0 histogram (key >> 21; NaN -> kHistNaN) of elements [begin, end).
template <typename T>
WAGLE_ALWAYS_INLINE void hist0_body(const void* data, int64_t begin, int64_t end, uint32_t* __restrict__ h) {
  const T* __restrict__ p = static_cast<const T*>(data);
  constexpr int64_t kBlock = 512;
  alignas(64) uint32_t bucket[kBlock];
  for (int64_t b0 = begin; b0 < end; b0 += kBlock) {
    const int64_t n = std::min<int64_t>(kBlock, end - b0);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) bucket[i] = score_bucket(load_f<T>(p, b0 + i));
    int64_t i = 0;
    for (; i + kSubHists <= n; i += kSubHists) {
      ++h[0 * kHistSize + bucket[i + 0]];
      ++h[1 * kHistSize + bucket[i + 1]];
      ++h[2 * kHistSize + bucket[i + 2]];
      ++h[3 * kHistSize + bucket[i + 3]];
    }
    for (; i < n; ++i) ++h[bucket[i]];
  }
}

// Refinement histogram (prefix_bits 11 or 22): digits of the non-NaN keys whose top prefix_bits
// bits equal `prefix`. Matches are found 64 at a time with vector compares and visited through
// the set bits of a packed word, so the cost of a block with few matches is the compare only.
template <typename T>
WAGLE_ALWAYS_INLINE void histp_body(const void* data, int64_t begin, int64_t end, uint32_t prefix,
                                    int prefix_bits, uint32_t* __restrict__ h) {
  const T* __restrict__ p = static_cast<const T*>(data);
  const int shift = radix_shift(prefix_bits);
  const uint32_t dmask = (1u << radix_width(prefix_bits)) - 1u;
  const int pshift = 32 - prefix_bits;
  alignas(64) uint8_t match[64];
  for (int64_t b0 = begin; b0 < end; b0 += 64) {
    const int64_t n = std::min<int64_t>(64, end - b0);
    if (n < 64) std::memset(match, 0, sizeof(match));
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float x = load_f<T>(p, b0 + i);
      match[i] = (!is_nan_f(x) && (float_key(x) >> pshift) == prefix) ? 1 : 0;
    }
    // The digit is recomputed for the matches only (the block is still in L1).
    uint64_t w = pack64(match);
    while (w) {
      const int i = __builtin_ctzll(w);
      ++h[(i & (kSubHists - 1)) * kHistSize + radix_digit(float_key(load_f<T>(p, b0 + i)), shift, dmask)];
      w &= w - 1;
    }
  }
}

// Number of non-NaN elements of [begin, end) whose key equals `key`.
template <typename T>
WAGLE_ALWAYS_INLINE int64_t count_body(const void* data, int64_t begin, int64_t end, uint32_t key) {
  const T* __restrict__ p = static_cast<const T*>(data);
  int64_t total = 0;
  for (int64_t b0 = begin; b0 < end; b0 += 4096) {
    const int64_t n = std::min<int64_t>(4096, end - b0);
    uint32_t c = 0;
#pragma omp simd reduction(+ : c)
    for (int64_t i = 0; i < n; ++i) {
      const float x = load_f<T>(p, b0 + i);
      c += (!is_nan_f(x) && float_key(x) == key) ? 1u : 0u;
    }
    total += c;
  }
  return total;
}

// Mask bits of [begin, end) (begin a multiple of 64): strictly better than the threshold, plus
// the first `quota` ties in flat-index order when Ties. Writes whole words (the last, partial
// word only its ceil(n/8) bytes; bits past the end are zero). Returns the unused quota.
template <typename T, bool Largest, bool Ties>
WAGLE_ALWAYS_INLINE int64_t mask_body(const void* data, int64_t begin, int64_t end, uint32_t thr,
                                      int64_t quota, uint8_t* __restrict__ out) {
  const T* __restrict__ p = static_cast<const T*>(data);
  alignas(64) uint8_t better[64];
  alignas(64) uint8_t eq[64];
  for (int64_t b0 = begin; b0 < end; b0 += 64) {
    const int64_t n = std::min<int64_t>(64, end - b0);
    if (n < 64) {
      std::memset(better, 0, sizeof(better));
      std::memset(eq, 0, sizeof(eq));
    }
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float x = load_f<T>(p, b0 + i);
      const uint32_t key = float_key(x);
      const bool ok = !is_nan_f(x);
      better[i] = (ok && key_better<Largest>(key, thr)) ? 1 : 0;
      if (Ties) eq[i] = (ok && key == thr) ? 1 : 0;
    }
    uint64_t w = pack64(better);
    if (Ties && quota > 0) {
      const uint64_t e = pack64(eq);
      if (e) {
        const int pc = popcount64(e);
        if (pc <= quota) {
          w |= e;
          quota -= pc;
        } else {
          w |= lowest_set_bits(e, quota);
          quota = 0;
        }
      }
    }
    std::memcpy(out + (b0 >> 3), &w, n == 64 ? 8 : static_cast<size_t>((n + 7) >> 3));
  }
  return quota;
}

// Candidate of the boundary bucket: its key and flat index inside its tensor.
struct Cand {
  uint32_t key;
  int64_t flat;
};

// Mask bits of [begin, end) (begin a multiple of 64) for keys strictly better than `thr` (the
// bucket's best key, so: every key beyond the bucket on the selected side), and the bucket's
// elements (key prefix of `prefix_bits` bits == `prefix`) appended to `cands` in flat order.
// One read of the scores does the mask pass and the last refinement.
template <typename T, bool Largest>
WAGLE_ALWAYS_INLINE void collect_body(const void* data, int64_t begin, int64_t end, uint32_t thr,
                                      uint32_t prefix, int prefix_bits, uint8_t* __restrict__ out,
                                      std::vector<Cand>* cands) {
  const T* __restrict__ p = static_cast<const T*>(data);
  alignas(64) uint8_t better[64];
  alignas(64) uint8_t inb[64];
  for (int64_t b0 = begin; b0 < end; b0 += 64) {
    const int64_t n = std::min<int64_t>(64, end - b0);
    if (n < 64) {
      std::memset(better, 0, sizeof(better));
      std::memset(inb, 0, sizeof(inb));
    }
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float x = load_f<T>(p, b0 + i);
      const uint32_t key = float_key(x);
      const bool ok = !is_nan_f(x);
      better[i] = (ok && key_better<Largest>(key, thr)) ? 1 : 0;
      inb[i] = (ok && key_prefix(key, prefix_bits) == prefix) ? 1 : 0;
    }
    const uint64_t w = pack64(better);
    std::memcpy(out + (b0 >> 3), &w, n == 64 ? 8 : static_cast<size_t>((n + 7) >> 3));
    for (uint64_t e = pack64(inb); e; e &= e - 1) {
      const int64_t idx = b0 + __builtin_ctzll(e);
      cands->push_back({float_key(load_f<T>(p, idx)), idx});
    }
  }
}

// ----------------------------------------------------------------------------- ISA wrappers
// The bodies are always-inline templates; each wrapper compiles them for one ISA (cpu_dispatch.h).
template <typename T, bool L>
WAGLE_TARGET_AVX512 void collect_avx512(const void* d, int64_t b, int64_t e, uint32_t t, uint32_t pre, int pb,
                                        uint8_t* o, std::vector<Cand>* c) {
  collect_body<T, L>(d, b, e, t, pre, pb, o, c);
}
template <typename T, bool L>
WAGLE_TARGET_AVX2 void collect_avx2(const void* d, int64_t b, int64_t e, uint32_t t, uint32_t pre, int pb,
                                    uint8_t* o, std::vector<Cand>* c) {
  collect_body<T, L>(d, b, e, t, pre, pb, o, c);
}
template <typename T, bool L>
void collect_default(const void* d, int64_t b, int64_t e, uint32_t t, uint32_t pre, int pb, uint8_t* o,
                     std::vector<Cand>* c) {
  collect_body<T, L>(d, b, e, t, pre, pb, o, c);
}
template <typename T>
WAGLE_TARGET_AVX512 void hist0_avx512(const void* d, int64_t b, int64_t e, uint32_t* h) { hist0_body<T>(d, b, e, h); }
template <typename T>
WAGLE_TARGET_AVX2 void hist0_avx2(const void* d, int64_t b, int64_t e, uint32_t* h) { hist0_body<T>(d, b, e, h); }
template <typename T>
void hist0_default(const void* d, int64_t b, int64_t e, uint32_t* h) { hist0_body<T>(d, b, e, h); }

template <typename T>
WAGLE_TARGET_AVX512 void histp_avx512(const void* d, int64_t b, int64_t e, uint32_t pre, int pb, uint32_t* h) {
  histp_body<T>(d, b, e, pre, pb, h);
}
template <typename T>
WAGLE_TARGET_AVX2 void histp_avx2(const void* d, int64_t b, int64_t e, uint32_t pre, int pb, uint32_t* h) {
  histp_body<T>(d, b, e, pre, pb, h);
}
template <typename T>
void histp_default(const void* d, int64_t b, int64_t e, uint32_t pre, int pb, uint32_t* h) {
  histp_body<T>(d, b, e, pre, pb, h);
}

template <typename T>
WAGLE_TARGET_AVX512 int64_t count_avx512(const void* d, int64_t b, int64_t e, uint32_t k) { return count_body<T>(d, b, e, k); }
template <typename T>
WAGLE_TARGET_AVX2 int64_t count_avx2(const void* d, int64_t b, int64_t e, uint32_t k) { return count_body<T>(d, b, e, k); }
template <typename T>
int64_t count_default(const void* d, int64_t b, int64_t e, uint32_t k) { return count_body<T>(d, b, e, k); }

template <typename T, bool L, bool Ti>
WAGLE_TARGET_AVX512 int64_t mask_avx512(const void* d, int64_t b, int64_t e, uint32_t t, int64_t q, uint8_t* o) {
  return mask_body<T, L, Ti>(d, b, e, t, q, o);
}
template <typename T, bool L, bool Ti>
WAGLE_TARGET_AVX2 int64_t mask_avx2(const void* d, int64_t b, int64_t e, uint32_t t, int64_t q, uint8_t* o) {
  return mask_body<T, L, Ti>(d, b, e, t, q, o);
}
template <typename T, bool L, bool Ti>
int64_t mask_default(const void* d, int64_t b, int64_t e, uint32_t t, int64_t q, uint8_t* o) {
  return mask_body<T, L, Ti>(d, b, e, t, q, o);
}

using Hist0Fn = void (*)(const void*, int64_t, int64_t, uint32_t*);
using HistpFn = void (*)(const void*, int64_t, int64_t, uint32_t, int, uint32_t*);
using CountFn = int64_t (*)(const void*, int64_t, int64_t, uint32_t);
using MaskFn = int64_t (*)(const void*, int64_t, int64_t, uint32_t, int64_t, uint8_t*);
using CollectFn = void (*)(const void*, int64_t, int64_t, uint32_t, uint32_t, int, uint8_t*, std::vector<Cand>*);

// Dtype slot of a score tensor: 0 float32, 1 bfloat16, 2 float16.
int dtype_slot(at::ScalarType t) { return t == at::kBFloat16 ? 1 : (t == at::kHalf ? 2 : 0); }

template <typename Fn>
Fn by_isa(Isa isa, Fn avx512, Fn avx2, Fn dflt) {
  return isa == Isa::Avx512 ? avx512 : (isa == Isa::Avx2 ? avx2 : dflt);
}

struct Kernels {
  Hist0Fn hist0[3];
  HistpFn histp[3];
  CountFn count[3];
  MaskFn mask[3][2][2];  // [dtype][largest][ties]
  CollectFn collect[3][2];  // [dtype][largest]
};

template <typename T, bool L, bool Ti>
MaskFn pick_mask(Isa isa) {
  return by_isa<MaskFn>(isa, &mask_avx512<T, L, Ti>, &mask_avx2<T, L, Ti>, &mask_default<T, L, Ti>);
}

template <typename T>
void fill_dtype(Kernels& k, int s, Isa isa) {
  k.hist0[s] = by_isa<Hist0Fn>(isa, &hist0_avx512<T>, &hist0_avx2<T>, &hist0_default<T>);
  k.histp[s] = by_isa<HistpFn>(isa, &histp_avx512<T>, &histp_avx2<T>, &histp_default<T>);
  k.count[s] = by_isa<CountFn>(isa, &count_avx512<T>, &count_avx2<T>, &count_default<T>);
  k.mask[s][0][0] = pick_mask<T, false, false>(isa);
  k.mask[s][0][1] = pick_mask<T, false, true>(isa);
  k.mask[s][1][0] = pick_mask<T, true, false>(isa);
  k.mask[s][1][1] = pick_mask<T, true, true>(isa);
  k.collect[s][0] = by_isa<CollectFn>(isa, &collect_avx512<T, false>, &collect_avx2<T, false>, &collect_default<T, false>);
  k.collect[s][1] = by_isa<CollectFn>(isa, &collect_avx512<T, true>, &collect_avx2<T, true>, &collect_default<T, true>);
}

// WAGLE_CPU_ISA is read on every call (cpu_dispatch.h), so tests can compare the paths.
Kernels pick_kernels() {
  const Isa isa = cpu_isa();
  Kernels k;
  fill_dtype<float>(k, 0, isa);
  fill_dtype<c10::BFloat16>(k, 1, isa);
  fill_dtype<c10::Half>(k, 2, isa);
  return k;
}

// ----------------------------------------------------------------------------- work list
struct Chunk {
  int32_t tensor;
  int64_t begin, end;  // flat element range inside the tensor; begin is a multiple of kChunk
};

struct WorkList {
  std::vector<Chunk> chunks;
  std::vector<int64_t> start;  // start[c] = elements before chunk c; start.back() = total
  int64_t total = 0;
};

// Chunks of the tensors for which keep(i) is true, in tensor order then flat order.
template <typename Keep>
WorkList make_work(const std::vector<at::Tensor>& ts, Keep keep) {
  WorkList w;
  for (size_t i = 0; i < ts.size(); ++i) {
    const int64_t n = ts[i].numel();
    if (n == 0 || !keep(i)) continue;
    for (int64_t b = 0; b < n; b += kChunk) {
      w.chunks.push_back({static_cast<int32_t>(i), b, std::min(n, b + kChunk)});
      w.start.push_back(w.total);
      w.total += w.chunks.back().end - b;
    }
  }
  w.start.push_back(w.total);
  return w;
}

int num_parts(const WorkList& w) {
  const int64_t by_size = std::max<int64_t>(1, w.total / (int64_t(1) << 15));
  const int64_t n = std::min<int64_t>({static_cast<int64_t>(at::get_num_threads()), by_size,
                                       static_cast<int64_t>(w.chunks.size())});
  return static_cast<int>(std::max<int64_t>(1, n));
}

// Runs fn(worker, first_chunk, end_chunk) over the whole work list with `parts` workers. The
// list is cut into element-balanced groups of consecutive chunks (several per worker) that workers
// claim dynamically, so a worker that the OS deschedules (a loaded machine) does not leave its
// share waiting. fn may be called several times per worker; results must not depend on which
// worker ran a group (per-worker integer histograms, per-chunk counts and mask words do not).
template <typename F>
void for_parts(const WorkList& w, int parts, const F& fn) {
  if (w.chunks.empty()) return;
  const int64_t nc = static_cast<int64_t>(w.chunks.size());
  const int64_t groups = std::min<int64_t>(nc, parts == 1 ? 1 : int64_t(parts) * 8);
  auto first_chunk = [&](int64_t g) -> int64_t {
    if (g >= groups) return nc;
    const int64_t target = g * w.total / groups;
    return std::lower_bound(w.start.begin(), w.start.begin() + nc, target) - w.start.begin();
  };
  std::atomic<int64_t> next{0};
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t g = next.fetch_add(1); g < groups; g = next.fetch_add(1)) {
        const int64_t c0 = first_chunk(g), c1 = first_chunk(g + 1);
        if (c0 < c1) fn(p, c0, c1);
      }
  });
}

// ----------------------------------------------------------------------------- argument checks
// (common/checks.h, shared with the CUDA bindings)
std::vector<at::Tensor> prepare_scores(at::TensorList scores, const char* op) {
  return checks::score_list(scores, op, at::Device(at::kCPU));
}

// ----------------------------------------------------------------------------- ops
at::Tensor radix_histogram_cpu(at::TensorList scores, int64_t prefix, int64_t prefix_bits) {
  checks::check_prefix(prefix, prefix_bits, "radix_histogram", /*allow_zero=*/true);
  const std::vector<at::Tensor> ts = prepare_scores(scores, "radix_histogram");
  at::Tensor hist = at::zeros({kHistSize}, at::TensorOptions().dtype(at::kLong));
  const WorkList w = make_work(ts, [](size_t) { return true; });
  if (w.total == 0) return hist;
  const Kernels k = pick_kernels();
  const int parts = num_parts(w);
  std::vector<int64_t> part_hist(static_cast<size_t>(parts) * kHistSize, 0);
  const int pb = static_cast<int>(prefix_bits);
  const uint32_t pre = static_cast<uint32_t>(prefix);
  for_parts(w, parts, [&](int64_t part, int64_t c0, int64_t c1) {
    std::vector<uint32_t> local(static_cast<size_t>(kSubHists) * kHistSize, 0);
    int64_t* ph = part_hist.data() + part * kHistSize;
    int64_t pending = 0;
    auto flush = [&] {
      for (int s = 0; s < kSubHists; ++s)
        for (int i = 0; i < kHistSize; ++i) {
          ph[i] += local[s * kHistSize + i];
          local[s * kHistSize + i] = 0;
        }
      pending = 0;
    };
    for (int64_t c = c0; c < c1; ++c) {
      const Chunk& ch = w.chunks[c];
      const at::Tensor& t = ts[ch.tensor];
      const int s = dtype_slot(t.scalar_type());
      if (pb == 0) k.hist0[s](t.data_ptr(), ch.begin, ch.end, local.data());
      else k.histp[s](t.data_ptr(), ch.begin, ch.end, pre, pb, local.data());
      pending += ch.end - ch.begin;
      if (pending >= kFlushEvery) flush();
    }
    flush();
  });
  int64_t* hp = hist.data_ptr<int64_t>();
  for (int p = 0; p < parts; ++p)
    for (int i = 0; i < kHistSize; ++i) hp[i] += part_hist[static_cast<size_t>(p) * kHistSize + i];
  return hist;
}

// Per-chunk counts of `key` over a work list (deterministic: one slot per chunk).
std::vector<int64_t> count_chunks(const std::vector<at::Tensor>& ts, const WorkList& w, const Kernels& k,
                                  uint32_t key) {
  std::vector<int64_t> counts(w.chunks.size(), 0);
  for_parts(w, num_parts(w), [&](int64_t, int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const Chunk& ch = w.chunks[c];
      const at::Tensor& t = ts[ch.tensor];
      counts[c] = k.count[dtype_slot(t.scalar_type())](t.data_ptr(), ch.begin, ch.end, key);
    }
  });
  return counts;
}

at::Tensor count_key_cpu(at::TensorList scores, int64_t key) {
  checks::key_arg(key, "count_key", "key");
  const std::vector<at::Tensor> ts = prepare_scores(scores, "count_key");
  at::Tensor out = at::zeros({static_cast<int64_t>(ts.size())}, at::TensorOptions().dtype(at::kLong));
  const WorkList w = make_work(ts, [](size_t) { return true; });
  const std::vector<int64_t> counts = count_chunks(ts, w, pick_kernels(), static_cast<uint32_t>(key));
  int64_t* op = out.data_ptr<int64_t>();
  for (size_t c = 0; c < w.chunks.size(); ++c) op[w.chunks[c].tensor] += counts[c];
  return out;
}

std::vector<at::Tensor> topk_mask_bits_cpu(at::TensorList scores, int64_t threshold_key, bool largest,
                                           at::IntArrayRef ties_take) {
  const uint32_t thr = checks::key_arg(threshold_key, "topk_mask_bits", "threshold_key");
  checks::check_ties_take(ties_take, scores.size());
  const std::vector<at::Tensor> ts = prepare_scores(scores, "topk_mask_bits");
  std::vector<at::Tensor> outs;
  outs.reserve(ts.size());
  for (const at::Tensor& t : ts)
    outs.push_back(at::empty({(t.numel() + 7) / 8}, at::TensorOptions().dtype(at::kByte)));
  const Kernels k = pick_kernels();

  // Tie quotas in flat-index order: a tensor that takes some but maybe not all of its ties needs,
  // for each of its chunks, the number of ties in the chunks before it (count pass, prefix sum).
  std::vector<std::vector<int64_t>> ties_before(ts.size());
  auto partial = [&](size_t i) { return ties_take[i] > 0; };
  const WorkList tw = make_work(ts, partial);
  if (!tw.chunks.empty()) {
    const std::vector<int64_t> counts = count_chunks(ts, tw, k, thr);
    for (size_t c = 0; c < tw.chunks.size(); ++c) {
      std::vector<int64_t>& tb = ties_before[tw.chunks[c].tensor];
      tb.push_back(tb.empty() ? 0 : tb.back() + counts[c - 1]);
    }
  }

  const WorkList w = make_work(ts, [](size_t) { return true; });
  for_parts(w, num_parts(w), [&](int64_t, int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const Chunk& ch = w.chunks[c];
      const at::Tensor& t = ts[ch.tensor];
      const int64_t take = ties_take[ch.tensor];
      int64_t quota = 0;
      if (take < 0) quota = std::numeric_limits<int64_t>::max();
      else if (take > 0) quota = std::max<int64_t>(0, take - ties_before[ch.tensor][ch.begin / kChunk]);
      k.mask[dtype_slot(t.scalar_type())][largest ? 1 : 0][quota > 0 ? 1 : 0](
          t.data_ptr(), ch.begin, ch.end, thr, quota, outs[ch.tensor].data_ptr<uint8_t>());
    }
  });
  return outs;
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor, at::Tensor> topk_mask_collect_cpu(
    at::TensorList scores, int64_t prefix, int64_t prefix_bits, bool largest) {
  checks::check_prefix(prefix, prefix_bits, "topk_mask_collect", /*allow_zero=*/false);
  const std::vector<at::Tensor> ts = prepare_scores(scores, "topk_mask_collect");
  const int pb = static_cast<int>(prefix_bits);
  const uint32_t pre = static_cast<uint32_t>(prefix);
  // Keys strictly better than the whole bucket: above its highest key, or below its lowest.
  const uint32_t lo = pre << (32 - pb);
  const uint32_t hi = lo | ((uint32_t(1) << (32 - pb)) - 1u);
  const uint32_t thr = largest ? hi : lo;
  std::vector<at::Tensor> outs;
  outs.reserve(ts.size());
  for (const at::Tensor& t : ts)
    outs.push_back(at::empty({(t.numel() + 7) / 8}, at::TensorOptions().dtype(at::kByte)));
  const Kernels k = pick_kernels();
  const WorkList w = make_work(ts, [](size_t) { return true; });
  std::vector<std::vector<Cand>> per_chunk(w.chunks.size());  // one slot per chunk: deterministic order
  for_parts(w, num_parts(w), [&](int64_t, int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const Chunk& ch = w.chunks[c];
      const at::Tensor& t = ts[ch.tensor];
      k.collect[dtype_slot(t.scalar_type())][largest ? 1 : 0](t.data_ptr(), ch.begin, ch.end, thr, pre, pb,
                                                              outs[ch.tensor].data_ptr<uint8_t>(), &per_chunk[c]);
    }
  });
  int64_t total = 0;
  for (const auto& v : per_chunk) total += static_cast<int64_t>(v.size());
  const auto lopt = at::TensorOptions().dtype(at::kLong);
  at::Tensor keys = at::empty({total}, lopt), tens = at::empty({total}, lopt), flat = at::empty({total}, lopt);
  int64_t* kp = keys.data_ptr<int64_t>();
  int64_t* tp = tens.data_ptr<int64_t>();
  int64_t* fp = flat.data_ptr<int64_t>();
  int64_t j = 0;
  for (size_t c = 0; c < per_chunk.size(); ++c)
    for (const Cand& cd : per_chunk[c]) {
      kp[j] = cd.key;
      tp[j] = w.chunks[c].tensor;
      fp[j] = cd.flat;
      ++j;
    }
  return {outs, keys, tens, flat};
}

}  // namespace
}  // namespace cpu
}  // namespace wagle

TORCH_LIBRARY_IMPL(wagle, CPU, m) {
  m.impl("topk_mask_collect", &wagle::cpu::topk_mask_collect_cpu);
  m.impl("radix_histogram", &wagle::cpu::radix_histogram_cpu);
  m.impl("count_key", &wagle::cpu::count_key_cpu);
  m.impl("topk_mask_bits", &wagle::cpu::topk_mask_bits_cpu);
}
