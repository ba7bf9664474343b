// CUDA kernel of wagle::masked_adamw_ (docs/kernels.md 4.3): AdamW on the elements selected by a bit
// mask, with compact fp32 state, for a whole list of tensors in ONE launch.
//
// Multi-tensor launch: the launcher (bindings.cpp) copies an array of AdamwTensorMeta (pointers,
// sizes, host-computed coefficients, the tensor's first global chunk) to the device; block b
// handles global chunk b (4096 elements) and finds its tensor by binary search over chunk_begin.
// ~300 tensors therefore cost one launch and one small H2D copy; the error flag is read back only in
// checked calls (bindings.cpp: the host validated the directories and offsets before the launch).
//
// Within a chunk (128 threads = 4 warps, warp q owns elements [1024q, 1024q+1024)): lane l loads
// 32-bit mask word l of its quarter, popcounts it, and a warp inclusive scan (shfl_up) gives each
// word's first compact slot within the quarter; quarter totals go through shared memory, so each
// warp knows its base slot = dir[chunk] + selected in earlier quarters. The warp then walks its 32
// words: a word is broadcast with __shfl_sync, an all-zero word is skipped (uniform branch; with
// weight_decay_mode="all" its weights are still decayed), and lane j of a nonzero word handles
// element 32*word + j with slot base + popc(word & lanemask_lt). m/v for one word are one
// contiguous run (coalesced); p/g lines are only touched where a selected element lives.
//
// Compact gradients (args.compact_grads): g is float32[nnz], read and written back at the slot k
// like m/v (one contiguous run per word) instead of at the element; nothing else changes.
//
// Arithmetic: bit-identical to the CPU op (csrc/cpu/masked_adamw.cpp) and torch's fused CPU AdamW:
// the coefficients come from the same host function adamw_coeffs() (double pow of the C library,
// float rounding), the per-element formulas from common/adamw_math.h (adamw_lerp_m and
// adamw_update_v use __fmaf_rn on the device, exactly where the CPU code calls fmaf), and every
// other float operation is an explicit round-to-nearest intrinsic (__fmul_rn, __fdiv_rn,
// __fsqrt_rn, __fadd_rn): nvcc would otherwise contract p*decay into the final add (the CPU code
// stops GCC doing the same with adamw_no_contract), and the intrinsics keep IEEE division and
// square root even if NVCC_FLAGS adds -prec-div=false / -prec-sqrt=false. Denormals must not be
// flushed, and no intrinsic can prevent that (-ftz=true turns __fmul_rn into mul.rn.ftz.f32): setup.py
// refuses NVCC_FLAGS that flush or approximate (docs/pitfalls.md K20), device_common.cuh stops a
// build whose nvcc defines __USE_FAST_MATH__, and the GPU tests compare with the CPU op bit for bit,
// denormal-range values included.
#include <cuda_fp16.h>

#include "common/adamw_math.h"
#include "common/layout.h"
#include "common/rounding_math.h"
#include "cuda/device_common.cuh"

namespace wagle {
namespace cuda {
namespace {

constexpr int kAdamwThreads = 128;     // 4 warps
constexpr int kWordsPerWarp = 32;  // 32 words of 32 bits = 1024 elements per warp
static_assert(kDirChunk == 4 * kWordsPerWarp * 32, "one block of 4 warps per directory chunk");

// float -> bf16 bits exactly as c10::BFloat16(float) (round to nearest even, NaN -> 0x7FC0), so
// the CUDA and CPU ops store the same bf16 values.
__device__ __forceinline__ uint16_t f32_to_bf16_bits(float x) {
  if (x != x) return 0x7FC0u;
  const uint32_t u = float_bits(x);
  return static_cast<uint16_t>((u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16);
}

// float -> fp16 bits as c10::Half(float): IEEE round to nearest even (overflow -> inf, gradual
// underflow), NaN -> 0x7E00 with the sign kept (c10's fp16_ieee_from_fp32_value).
__device__ __forceinline__ uint16_t f32_to_fp16_bits(float x) {
  if (x != x) return static_cast<uint16_t>(0x7E00u | ((float_bits(x) >> 16) & 0x8000u));
  return __half_as_ushort(__float2half_rn(x));
}

template <int D>
__device__ __forceinline__ void store_f(void* p, int64_t i, float x) {
  if (D == kF32) {
    static_cast<float*>(p)[i] = x;
  } else if (D == kBF16) {
    static_cast<uint16_t*>(p)[i] = f32_to_bf16_bits(x);
  } else {
    static_cast<uint16_t*>(p)[i] = f32_to_fp16_bits(x);
  }
}

// The bits store_f<D> writes for x (bf16/fp16 only).
template <int D>
__device__ __forceinline__ uint16_t half_bits(float x) {
  return D == kBF16 ? f32_to_bf16_bits(x) : f32_to_fp16_bits(x);
}

// Master weights: p[e] = rounding of the fp32 master value x (round to nearest even, or
// stochastic rounding keyed by (t.sr_key, e): common/rounding_math.h, as the CPU op).
template <int D>
__device__ __forceinline__ void store_rounded(const AdamwTensorMeta& t, int64_t e, float x) {
  if (D == kF32 || t.rounding != kRoundStochastic) {
    store_f<D>(t.p, e, x);
    return;
  }
  const uint16_t b = static_cast<uint16_t>(stochastic_round_bits<D == kF16>(x, half_bits<D>(x), sr_bits(t.sr_key, e)));
  static_cast<uint16_t*>(t.p)[e] = b;
}

// Dense tensor: every element of [e, e+32) below n is selected.
__device__ __forceinline__ uint32_t valid_word32(int64_t e, int64_t n) {
  if (e >= n) return 0u;
  return n - e >= 32 ? 0xFFFFFFFFu : (1u << (n - e)) - 1u;
}

__device__ __forceinline__ int find_tensor(const AdamwTensorMeta* meta, int num_tensors, int64_t chunk) {
  int lo = 0, hi = num_tensors - 1;  // last i with chunk_begin <= chunk
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (meta[mid].chunk_begin <= chunk) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

template <int D, bool Amsgrad>
__global__ void __launch_bounds__(kAdamwThreads)
    masked_adamw_kernel(const AdamwTensorMeta* __restrict__ meta, int num_tensors, AdamwListArgs a) {
  if (a.found_inf != nullptr && *a.found_inf == 1.0f) return;  // torch fused: skip the whole step
  const int64_t gchunk = blockIdx.x;
  const AdamwTensorMeta t = meta[find_tensor(meta, num_tensors, gchunk)];  // a copy: no reloads after stores
  const int64_t chunk = gchunk - t.chunk_begin;
  const int warp = threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  const bool dense = t.bits == nullptr;
  const int64_t e_warp = chunk * kDirChunk + static_cast<int64_t>(warp) * kWordsPerWarp * 32;

  // ---- compact slots: word popcounts, warp scan, quarter totals through shared memory
  const uint32_t my_word = dense ? valid_word32(e_warp + 32 * lane, t.n) : load_word32(t.bits, e_warp + 32 * lane, t.n);
  const int my_pc = __popc(my_word);
  const int incl = warp_inclusive_sum(my_pc, lane);
  __shared__ int quarter_total[kAdamwThreads / kWarp];
  if (lane == kWarp - 1) quarter_total[warp] = incl;
  __syncthreads();
  int64_t before = 0, chunk_total = 0;
#pragma unroll
  for (int q = 0; q < kAdamwThreads / kWarp; ++q) {
    if (q < warp) before += quarter_total[q];
    chunk_total += quarter_total[q];
  }
  const int64_t k0 = dense ? chunk * kDirChunk : t.dir[chunk];
  const int64_t k1 = dense ? k0 + chunk_total : t.dir[chunk + 1];
  if (!dense && threadIdx.x == 0 && a.error != nullptr && (k1 - k0 != chunk_total || k0 < 0 || k1 > t.nnz))
    atomicAdd(a.error, 1);  // directory disagrees with the bits: flagged, slots kept in bounds
  const int64_t lo = k0 > 0 ? k0 : 0;
  const int64_t hi = k1 < t.nnz ? k1 : t.nnz;
  const int64_t warp_base = k0 + before;
  const bool decay_all = t.decay_all != 0;
  const AdamwCoeffs& c0 = t.c;

  for (int j = 0; j < kWordsPerWarp; ++j) {
    const uint32_t w = __shfl_sync(0xFFFFFFFFu, my_word, j);
    const int excl = __shfl_sync(0xFFFFFFFFu, incl - my_pc, j);
    if (w == 0u && !decay_all) continue;  // warp-uniform: an all-zero word costs one shuffle
    const int64_t e = e_warp + 32 * j + lane;
    if (e >= t.n) continue;
    const bool selected = (w >> lane) & 1u;
    if (!selected) {
      if (decay_all) store_f<D>(t.p, e, __fmul_rn(load_f<D>(t.p, e), c0.decay));
      continue;
    }
    const int64_t k = warp_base + excl + __popc(w & ((1u << lane) - 1u));
    if (k < lo || k >= hi) continue;  // corrupt directory (flagged above): never out of bounds
    AdamwCoeffs c = c0;
    if (t.offsets != nullptr) {
      // Per-element step (after set_masks): coefficients from the host table of the steps the
      // offsets reach (rows table_lo ..), computed there with adamw_coeffs()'s own formulas. The
      // offset is checked against THIS tensor's step (the host did so too, from its range).
      const int64_t off = static_cast<int64_t>(t.offsets[k]);
      const int64_t r = t.step_int - off - a.table_lo;
      if (off < 0 || off >= t.step_int || r < 0 || r >= a.table_len) {
        if (a.error != nullptr) atomicAdd(a.error + 1, 1);
        continue;
      }
      c.neg_step_size = a.step_table[2 * r];
      c.bc2_sqrt = a.step_table[2 * r + 1];
    }
    // Compact grads (gather_masked's layout): float32 at the slot k, like m/v.
    float g = a.compact_grads ? static_cast<const float*>(t.g)[k] : load_f<D>(t.g, e);
    if (a.grad_scale != nullptr) {
      g = __fdiv_rn(g, *a.grad_scale);  // torch fused: grad / scale, written back
      if (a.compact_grads) static_cast<float*>(t.g)[k] = g;
      else store_f<D>(t.g, e, g);
    }
    if (a.maximize) g = -g;
    // Master weights: the fp32 value lives at the slot k (p itself is only written).
    const float p_in = t.mw != nullptr ? t.mw[k] : load_f<D>(t.p, e);
    const float p1 = __fmul_rn(p_in, c.decay);  // rounded: never fused into the add below
    float m = t.m[k], v = t.v[k];
    m = adamw_lerp_m(m, g, c);                          // __fmaf_rn, as fmaf on the CPU
    v = adamw_update_v(v, g, c, e >= t.tail_start);     // vector- or tail-region form, as the CPU
    float vd = v;
    if (Amsgrad) {
      const float vx = t.vmax[k];
      vd = vx > v ? vx : v;  // same select as adamw_element (NaN v only differs from torch.maximum)
      t.vmax[k] = vd;
    }
    const float den = __fadd_rn(__fdiv_rn(__fsqrt_rn(vd), c.bc2_sqrt), c.eps);
    const float p_new = __fadd_rn(p1, __fdiv_rn(__fmul_rn(c.neg_step_size, m), den));
    if (t.mw != nullptr) {
      t.mw[k] = p_new;
      store_rounded<D>(t, e, p_new);
    } else {
      store_f<D>(t.p, e, p_new);
    }
    t.m[k] = m;
    t.v[k] = v;
  }
}

template <int D>
cudaError_t launch_dtype(const AdamwTensorMeta* meta, int num_tensors, int64_t total_chunks, bool amsgrad,
                         const AdamwListArgs& a, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(total_chunks));
  if (amsgrad) masked_adamw_kernel<D, true><<<grid, kAdamwThreads, 0, stream>>>(meta, num_tensors, a);
  else masked_adamw_kernel<D, false><<<grid, kAdamwThreads, 0, stream>>>(meta, num_tensors, a);
  return cudaGetLastError();
}

}  // namespace

cudaError_t masked_adamw(int dtype, const AdamwTensorMeta* meta, int num_tensors, int64_t total_chunks,
                         bool amsgrad, const AdamwListArgs& args, cudaStream_t stream) {
  if (num_tensors <= 0 || total_chunks <= 0) return cudaSuccess;
  if (total_chunks > 0x7FFFFFFFLL) return cudaErrorInvalidValue;  // grid.x limit (2^31-1 chunks = 8.8e12 elements)
  switch (dtype) {
    case kBF16: return launch_dtype<kBF16>(meta, num_tensors, total_chunks, amsgrad, args, stream);
    case kF16: return launch_dtype<kF16>(meta, num_tensors, total_chunks, amsgrad, args, stream);
    default: return launch_dtype<kF32>(meta, num_tensors, total_chunks, amsgrad, args, stream);
  }
}

}  // namespace cuda
}  // namespace wagle
