// CUDA kernel of wagle::gather_masked_ (compact gradients): out[k] (+)= float(src[e_k]) for the
// k-th selected element e_k of a bit mask, with the compact-slot addressing of masked_adamw.cu
// (docs/kernels.md 4.3), so out is laid out exactly like the compact exp_avg.
//
// One block per 4096-element directory chunk (128 threads = 4 warps, warp q owns elements
// [1024q, 1024q+1024)): lane l loads 32-bit mask word l of its quarter and popcounts it; a warp
// inclusive scan (shfl_up) gives each word's first slot within the quarter and the quarter totals
// go through shared memory, so base slot = dir[chunk] + selected in earlier quarters. The warp
// then visits only its nonzero words (ballot, then ffs over the ballot: all-zero words cost
// nothing): lane j of word w handles element 32w + j with slot base + excl[w] +
// popc(word & lanemask_lt). Reads of src touch only the 128-byte lines of words that have a set
// bit; the writes of one word are one contiguous run of out.
//
// Values: bf16/fp16 are widened exactly (common/score_math.h) and accumulate is one
// round-to-nearest float32 add (__fadd_rn, as out.add_ in the reference), so the result is
// bit-identical to the CPU op and the reference.
//
// A directory that disagrees with the bits (or with nnz = out.numel()) is not detected here (the
// op does not synchronise), but every write stays inside [dir[c], dir[c+1]) ∩ [0, nnz).
#include "common/layout.h"
#include "cuda/device_common.cuh"

namespace wagle {
namespace cuda {
namespace {

constexpr int kGatherThreads = 128;     // 4 warps
constexpr int kWordsPerWarp = 32;  // 32 words of 32 bits = 1024 elements per warp
static_assert(kDirChunk == 4 * kWordsPerWarp * 32, "one block of 4 warps per directory chunk");

template <int D, bool Accumulate>
__global__ void __launch_bounds__(kGatherThreads)
    gather_masked_kernel(const void* __restrict__ src, int64_t n, const uint8_t* __restrict__ bits,
                         const int64_t* __restrict__ dir, float* __restrict__ out, int64_t nnz) {
  const int64_t chunk = blockIdx.x;
  const int warp = threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  const int64_t e_warp = chunk * kDirChunk + static_cast<int64_t>(warp) * kWordsPerWarp * 32;

  // ---- compact slots: word popcounts, warp scan, quarter totals through shared memory
  const uint32_t my_word = load_word32(bits, e_warp + 32 * lane, n);
  const int my_pc = __popc(my_word);
  const int incl = warp_inclusive_sum(my_pc, lane);
  __shared__ int quarter_total[kGatherThreads / kWarp];
  if (lane == kWarp - 1) quarter_total[warp] = incl;
  __syncthreads();
  int64_t before = 0;
#pragma unroll
  for (int q = 0; q < kGatherThreads / kWarp; ++q)
    if (q < warp) before += quarter_total[q];
  const int64_t k0 = dir[chunk];
  const int64_t k1 = dir[chunk + 1];
  const int64_t lo = k0 > 0 ? k0 : 0;
  const int64_t hi = k1 < nnz ? k1 : nnz;
  const int64_t warp_base = k0 + before;
  const int my_excl = incl - my_pc;

  uint32_t nonzero = __ballot_sync(0xFFFFFFFFu, my_word != 0u);  // warp-uniform
  while (nonzero != 0u) {
    const int j = __ffs(nonzero) - 1;
    nonzero &= nonzero - 1u;
    const uint32_t w = __shfl_sync(0xFFFFFFFFu, my_word, j);
    const int excl = __shfl_sync(0xFFFFFFFFu, my_excl, j);
    if (!((w >> lane) & 1u)) continue;  // bits beyond n are zero (load_word32): e < n below
    const int64_t e = e_warp + 32 * j + lane;
    const int64_t k = warp_base + excl + __popc(w & ((1u << lane) - 1u));
    if (k < lo || k >= hi) continue;  // corrupt directory: never out of bounds
    const float x = load_f<D>(src, e);
    out[k] = Accumulate ? __fadd_rn(out[k], x) : x;
  }
}

template <int D>
cudaError_t launch_dtype(const void* src, int64_t n, const uint8_t* bits, const int64_t* dir, float* out,
                         int64_t nnz, bool accumulate, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(dir_chunks(n)));
  if (accumulate) gather_masked_kernel<D, true><<<grid, kGatherThreads, 0, stream>>>(src, n, bits, dir, out, nnz);
  else gather_masked_kernel<D, false><<<grid, kGatherThreads, 0, stream>>>(src, n, bits, dir, out, nnz);
  return cudaGetLastError();
}

}  // namespace

cudaError_t gather_masked(int dtype, const void* src, int64_t n, const uint8_t* bits, const int64_t* dir,
                          float* out, int64_t nnz, bool accumulate, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  if (dir_chunks(n) > 0x7FFFFFFFLL) return cudaErrorInvalidValue;  // grid.x limit
  switch (dtype) {
    case kBF16: return launch_dtype<kBF16>(src, n, bits, dir, out, nnz, accumulate, stream);
    case kF16: return launch_dtype<kF16>(src, n, bits, dir, out, nnz, accumulate, stream);
    default: return launch_dtype<kF32>(src, n, bits, dir, out, nnz, accumulate, stream);
  }
}

}  // namespace cuda
}  // namespace wagle
