// Device helpers shared by the wagle CUDA kernels (torch-free): element loads by DType, warp
// reductions and grid sizing. The per-element math itself is common/score_math.h, shared with the
// CPU kernels so the CPU tests exercise it.
#pragma once
#include <cuda_runtime.h>

// Scores, radix keys and the AdamW update are bit-identical to the CPU ops only with IEEE division
// and square root and without flushing denormals (docs/pitfalls.md K20). Older nvcc define
// __USE_FAST_MATH__ under --use_fast_math; nvcc 13 defines nothing for it or for -ftz=true, so
// setup.py also refuses such NVCC_FLAGS, and the divisions of common/score_math.h use __fdiv_rn.
#if defined(__USE_FAST_MATH__) || defined(__FAST_MATH__)
#error "wagle CUDA kernels must not be built with --use_fast_math: scores and AdamW must stay bit-exact"
#endif
#include <stdint.h>

#include "common/score_math.h"
#include "cuda/kernels.h"

namespace wagle {
namespace cuda {

constexpr int kThreads = 256;  // threads per block of every grid-stride kernel here
constexpr int kWarp = 32;

// Storage type and fp32 conversion of an element of DType D (bf16/fp16 via the bit-exact
// conversions of common/score_math.h, so CPU and GPU agree bit for bit).
template <int D>
struct Elem;
template <>
struct Elem<kF32> {
  using T = float;
  static __device__ __forceinline__ float to_f(float v) { return v; }
};
template <>
struct Elem<kBF16> {
  using T = uint16_t;
  static __device__ __forceinline__ float to_f(uint16_t v) { return bf16_bits_to_float(v); }
};
template <>
struct Elem<kF16> {
  using T = uint16_t;
  static __device__ __forceinline__ float to_f(uint16_t v) { return fp16_bits_to_float(v); }
};

template <int D>
__device__ __forceinline__ float load_f(const void* p, int64_t i) {
  return Elem<D>::to_f(static_cast<const typename Elem<D>::T*>(p)[i]);
}

// 8 consecutive elements [8v, 8v+8) as fp32 with 16-byte loads (two for fp32, one for 16-bit
// types). Needs a 16-byte aligned base pointer.
template <int D>
__device__ __forceinline__ void load8_f(const void* p, int64_t v, float (&out)[8]) {
  if (D == kF32) {
    const float4* q = static_cast<const float4*>(p) + 2 * v;
    const float4 a = q[0], b = q[1];
    out[0] = a.x; out[1] = a.y; out[2] = a.z; out[3] = a.w;
    out[4] = b.x; out[5] = b.y; out[6] = b.z; out[7] = b.w;
  } else {
    const uint4 a = static_cast<const uint4*>(p)[v];
    const uint32_t words[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      out[2 * j] = Elem<D>::to_f(static_cast<uint16_t>(words[j] & 0xFFFFu));
      out[2 * j + 1] = Elem<D>::to_f(static_cast<uint16_t>(words[j] >> 16));
    }
  }
}

__device__ __forceinline__ unsigned long long warp_sum(unsigned long long v) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) v += __shfl_down_sync(0xFFFFFFFFu, v, off);
  return v;
}

// Histogram bucket that all-zero score regions hit (key(+0.0) >> 21); counted in a register per
// thread and added once per block, so a tensor of zeros does not serialise on one shared atomic.
constexpr uint32_t kZeroBucket = 0x80000000u >> kHistShift;

// Blocks for a grid-stride kernel over `work` items with `per_block` items per block-iteration:
// enough to fill the device (8 blocks of kThreads per SM), no more than the work needs.
inline int grid_blocks(int64_t work, int64_t per_block) {
  static int sm_count[64] = {0};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) dev = 0;
  if (sm_count[dev] == 0) {
    int sms = 0;
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || sms <= 0)
      sms = 80;
    sm_count[dev] = sms;
  }
  const int64_t need = (work + per_block - 1) / per_block;
  const int64_t cap = static_cast<int64_t>(sm_count[dev]) * 8;
  const int64_t blocks = need < cap ? need : cap;
  return static_cast<int>(blocks > 0 ? blocks : 1);
}

// 32 mask bits of elements [e, e+32) (e a multiple of 8) of a tensor of n elements (bits beyond
// n read as 0, like the CPU op's load_word: padding bits are never trusted). Byte loads: no
// alignment requirement. Used by masked_adamw.cu and gather_masked.cu (the compact-slot prefix of docs/kernels.md 4.3).
__device__ __forceinline__ uint32_t load_word32(const uint8_t* bits, int64_t e, int64_t n) {
  if (e >= n) return 0u;
  const int64_t nbytes = (n + 7) / 8;
  const int64_t b0 = e / 8;
  uint32_t w = 0;
#pragma unroll
  for (int j = 0; j < 4; ++j)
    if (b0 + j < nbytes) w |= static_cast<uint32_t>(__ldg(bits + b0 + j)) << (8 * j);
  const int64_t cnt = n - e;
  if (cnt < 32) w &= (1u << cnt) - 1u;
  return w;
}

// sh[b] += 1 for every active lane of the warp: lanes holding the same bucket add once, together
// (one shared atomic per distinct bucket per warp instead of one per lane: clustered scores hit
// few buckets). Call from any branch; __activemask() is the set of lanes executing the call.
__device__ __forceinline__ void hist_add_warp_aggregated(uint32_t* sh, uint32_t b) {
  const unsigned active = __activemask();
  const unsigned peers = __match_any_sync(active, b);
  if ((threadIdx.x & (kWarp - 1)) == static_cast<unsigned>(__ffs(peers) - 1))
    atomicAdd(sh + b, static_cast<uint32_t>(__popc(peers)));
}

// Flushes a block's shared 2049-bin uint32 histogram into the global int64 one (nonzero bins).
__device__ __forceinline__ void flush_hist(const uint32_t* sh, unsigned long long* hist) {
  for (int i = threadIdx.x; i < kHistSize; i += blockDim.x)
    if (sh[i]) atomicAdd(hist + i, static_cast<unsigned long long>(sh[i]));
}

// Inclusive prefix sum of one int per lane across a full warp (Hillis-Steele with shuffles).
__device__ __forceinline__ int warp_inclusive_sum(int v, int lane) {
#pragma unroll
  for (int off = 1; off < kWarp; off *= 2) {
    const int up = __shfl_up_sync(0xFFFFFFFFu, v, off);
    if (lane >= off) v += up;
  }
  return v;
}

}  // namespace cuda
}  // namespace wagle
