// CUDA kernels of the selection primitives (csrc/ops.cpp): radix_histogram, count_key,
// topk_mask_bits. The exact-k orchestration (11+11+10-bit MSD radix with early stop, tie quotas per
// tensor in flat-index order) is _select_bits in wagle_ext/ops.py; these kernels only have to be
// exact, and then the masks are bit-identical to the CPU op by construction.
//
// Keys are common/score_math.h float_key (order-preserving uint32, -0.0 == +0.0); NaN never has a
// key. One launch per tensor (three for a mask pass with a tie quota).
#include "cuda/device_common.cuh"

namespace wagle {
namespace cuda {
namespace {

// ---- radix_histogram ----------------------------------------------------------------------------
template <int D>
__global__ void __launch_bounds__(kThreads)
    radix_histogram_kernel(const void* __restrict__ scores, int64_t n, uint32_t prefix, int prefix_bits,
                           int shift, uint32_t digit_mask, unsigned long long* __restrict__ hist) {
  __shared__ uint32_t sh[kHistSize];
  for (int i = threadIdx.x; i < kHistSize; i += blockDim.x) sh[i] = 0;
  __syncthreads();
  uint32_t nans = 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float x = load_f<D>(scores, i);
    if (x != x) {
      ++nans;
      continue;
    }
    const uint32_t key = float_key(x);
    if (prefix_bits > 0 && (key >> (32 - prefix_bits)) != prefix) continue;
    hist_add_warp_aggregated(sh, (key >> shift) & digit_mask);  // lanes with one digit add once
  }
  // NaN scores are counted only by the top-level (prefix_bits == 0) histogram.
  if (prefix_bits == 0 && nans) atomicAdd(sh + kHistNaN, nans);
  __syncthreads();
  flush_hist(sh, hist);
}

// ---- count_key ----------------------------------------------------------------------------------
template <int D>
__global__ void __launch_bounds__(kThreads)
    count_key_kernel(const void* __restrict__ scores, int64_t n, uint32_t key,
                     unsigned long long* __restrict__ count) {
  unsigned long long c = 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float x = load_f<D>(scores, i);
    c += (x == x && float_key(x) == key) ? 1u : 0u;
  }
  c = warp_sum(c);
  if ((threadIdx.x & (kWarp - 1)) == 0 && c) atomicAdd(count, c);
}

// ---- topk_mask_bits -----------------------------------------------------------------------------
// Each block owns one chunk of kChunk consecutive elements, walked in tiles of kThreads; each warp
// turns 32 consecutive elements into one 32-bit word with __ballot_sync. With a tie quota the
// rank of a tie = ties in earlier chunks (count + exclusive scan kernels) + ties earlier in this
// chunk (warp ballots + a per-tile scan over the block's warps), so ties are taken in flat-index
// order exactly as the CPU op does.
constexpr int64_t kChunk = 8192;
constexpr int kWarpsPerBlock = kThreads / kWarp;
enum TieMode : int { kTiesNone = 0, kTiesAll = 1, kTiesQuota = 2 };

template <int D>
__device__ __forceinline__ void classify(const void* scores, int64_t i, int64_t n, uint32_t threshold,
                                         bool largest, bool& better, bool& eq) {
  better = eq = false;
  if (i < n) {
    const float x = load_f<D>(scores, i);
    if (x == x) {
      const uint32_t key = float_key(x);
      better = largest ? key > threshold : key < threshold;
      eq = key == threshold;
    }
  }
}

template <int D>
__global__ void __launch_bounds__(kThreads)
    count_ties_kernel(const void* __restrict__ scores, int64_t n, uint32_t threshold,
                      uint32_t* __restrict__ chunk_ties) {
  __shared__ uint32_t warp_ties[kWarpsPerBlock];
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * kChunk;
  uint32_t c = 0;
  for (int64_t t = 0; t < kChunk; t += kThreads) {
    bool better, eq;
    classify<D>(scores, begin + t + threadIdx.x, n, threshold, true, better, eq);
    c += eq ? 1u : 0u;
  }
  c = static_cast<uint32_t>(warp_sum(c));
  if ((threadIdx.x & (kWarp - 1)) == 0) warp_ties[threadIdx.x / kWarp] = c;
  __syncthreads();
  if (threadIdx.x == 0) {
    uint32_t s = 0;
    for (int w = 0; w < kWarpsPerBlock; ++w) s += warp_ties[w];
    chunk_ties[blockIdx.x] = s;
  }
}

// Exclusive prefix sum of m uint32 counts into uint64, by one block of kScanThreads: each thread
// sums a contiguous run, a shared-memory scan combines the runs, then each thread writes its run.
// m = n / 8192 chunks (about 850K for 7B elements), so one block is enough.
constexpr int kScanThreads = 1024;
__global__ void __launch_bounds__(kScanThreads)
    exclusive_scan_kernel(const uint32_t* __restrict__ in, unsigned long long* __restrict__ out, int64_t m) {
  __shared__ unsigned long long sums[kScanThreads];
  const int t = threadIdx.x;
  const int64_t per = (m + kScanThreads - 1) / kScanThreads;
  const int64_t b = t * per;
  const int64_t e = b + per < m ? b + per : m;
  unsigned long long s = 0;
  for (int64_t i = b; i < e; ++i) s += in[i];
  sums[t] = s;
  __syncthreads();
  for (int off = 1; off < kScanThreads; off *= 2) {
    const unsigned long long v = t >= off ? sums[t - off] : 0ull;
    __syncthreads();
    sums[t] += v;
    __syncthreads();
  }
  unsigned long long base = t ? sums[t - 1] : 0ull;
  for (int64_t i = b; i < e; ++i) {
    out[i] = base;
    base += in[i];
  }
}

template <int D, int Mode>
__global__ void __launch_bounds__(kThreads)
    mask_kernel(const void* __restrict__ scores, int64_t n, uint32_t threshold, bool largest,
                unsigned long long take, const unsigned long long* __restrict__ ties_before,
                uint8_t* __restrict__ bits) {
  __shared__ uint32_t warp_ties[kWarpsPerBlock];
  const int lane = threadIdx.x & (kWarp - 1);
  const int warp = threadIdx.x / kWarp;
  const int64_t nbytes = (n + 7) / 8;
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * kChunk;
  unsigned long long rank_base = Mode == kTiesQuota ? ties_before[blockIdx.x] : 0ull;
  const uint32_t lanes_below = (1u << lane) - 1u;
  for (int64_t t = 0; t < kChunk && begin + t < n; t += kThreads) {  // uniform per block
    const int64_t word_first = begin + t + warp * kWarp;
    const int64_t i = word_first + lane;
    bool better, eq;
    classify<D>(scores, i, n, threshold, largest, better, eq);
    bool sel = better;
    if (Mode == kTiesAll) sel = sel || eq;
    if (Mode == kTiesQuota) {
      const uint32_t eq_ballot = __ballot_sync(0xFFFFFFFFu, eq);
      if (lane == 0) warp_ties[warp] = __popc(eq_ballot);
      __syncthreads();
      unsigned long long before = rank_base;
      uint32_t tile_ties = 0;
      for (int w = 0; w < kWarpsPerBlock; ++w) {
        if (w < warp) before += warp_ties[w];
        tile_ties += warp_ties[w];
      }
      before += __popc(eq_ballot & lanes_below);
      sel = sel || (eq && before < take);
      rank_base += tile_ties;
      __syncthreads();  // warp_ties is rewritten by the next tile
    }
    const uint32_t word = __ballot_sync(0xFFFFFFFFu, sel);
    // Lanes 0..3 store the word's 4 bytes (byte stores: no alignment assumption on `bits`).
    const int64_t byte = word_first / 8 + lane;
    if (lane < 4 && byte < nbytes) bits[byte] = static_cast<uint8_t>(word >> (8 * lane));
  }
}

template <int D>
cudaError_t radix_histogram_t(const void* s, int64_t n, uint32_t prefix, int prefix_bits,
                              unsigned long long* hist, cudaStream_t stream) {
  int shift, width;
  switch (prefix_bits) {
    case 0: shift = 21; width = 11; break;
    case 11: shift = 10; width = 11; break;
    case 22: shift = 0; width = 10; break;
    default: return cudaErrorInvalidValue;
  }
  int blocks = grid_blocks(n, kThreads);
  const int64_t min_blocks = n / (int64_t(1) << 31) + 1;  // uint32 shared counters
  if (blocks < min_blocks) blocks = static_cast<int>(min_blocks);
  radix_histogram_kernel<D><<<blocks, kThreads, 0, stream>>>(s, n, prefix, prefix_bits, shift,
                                                             (1u << width) - 1u, hist);
  return cudaGetLastError();
}

template <int D>
cudaError_t count_key_t(const void* s, int64_t n, uint32_t key, unsigned long long* count, cudaStream_t stream) {
  count_key_kernel<D><<<grid_blocks(n, kThreads), kThreads, 0, stream>>>(s, n, key, count);
  return cudaGetLastError();
}

int64_t num_chunks(int64_t n) { return (n + kChunk - 1) / kChunk; }
int64_t scan_offset(int64_t chunks) { return (chunks * 4 + 15) / 16 * 16; }

template <int D>
cudaError_t topk_mask_bits_t(const void* s, int64_t n, uint32_t threshold, bool largest, int64_t take,
                             uint8_t* bits, void* workspace, cudaStream_t stream) {
  const int64_t chunks = num_chunks(n);
  if (chunks > 0x7FFFFFFF) return cudaErrorInvalidValue;
  const unsigned int grid = static_cast<unsigned int>(chunks);
  if (take < 0) {
    mask_kernel<D, kTiesAll><<<grid, kThreads, 0, stream>>>(s, n, threshold, largest, 0, nullptr, bits);
  } else if (take == 0) {
    mask_kernel<D, kTiesNone><<<grid, kThreads, 0, stream>>>(s, n, threshold, largest, 0, nullptr, bits);
  } else {
    if (workspace == nullptr) return cudaErrorInvalidValue;
    uint32_t* chunk_ties = static_cast<uint32_t*>(workspace);
    unsigned long long* ties_before =
        reinterpret_cast<unsigned long long*>(static_cast<char*>(workspace) + scan_offset(chunks));
    count_ties_kernel<D><<<grid, kThreads, 0, stream>>>(s, n, threshold, chunk_ties);
    exclusive_scan_kernel<<<1, kScanThreads, 0, stream>>>(chunk_ties, ties_before, chunks);
    mask_kernel<D, kTiesQuota><<<grid, kThreads, 0, stream>>>(
        s, n, threshold, largest, static_cast<unsigned long long>(take), ties_before, bits);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t radix_histogram(const void* scores, int dtype, int64_t n, uint32_t prefix, int prefix_bits,
                            unsigned long long* hist, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  switch (dtype) {
    case kF32: return radix_histogram_t<kF32>(scores, n, prefix, prefix_bits, hist, stream);
    case kBF16: return radix_histogram_t<kBF16>(scores, n, prefix, prefix_bits, hist, stream);
    case kF16: return radix_histogram_t<kF16>(scores, n, prefix, prefix_bits, hist, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t count_key(const void* scores, int dtype, int64_t n, uint32_t key, unsigned long long* count,
                      cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  switch (dtype) {
    case kF32: return count_key_t<kF32>(scores, n, key, count, stream);
    case kBF16: return count_key_t<kBF16>(scores, n, key, count, stream);
    case kF16: return count_key_t<kF16>(scores, n, key, count, stream);
    default: return cudaErrorInvalidValue;
  }
}

int64_t topk_mask_bits_workspace_bytes(int64_t n, int64_t ties_take) {
  if (n <= 0 || ties_take <= 0) return 0;
  const int64_t chunks = num_chunks(n);
  return scan_offset(chunks) + chunks * 8;
}

cudaError_t topk_mask_bits(const void* scores, int dtype, int64_t n, uint32_t threshold_key, bool largest,
                           int64_t ties_take, uint8_t* bits, void* workspace, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  switch (dtype) {
    case kF32: return topk_mask_bits_t<kF32>(scores, n, threshold_key, largest, ties_take, bits, workspace, stream);
    case kBF16: return topk_mask_bits_t<kBF16>(scores, n, threshold_key, largest, ties_take, bits, workspace, stream);
    case kF16: return topk_mask_bits_t<kF16>(scores, n, threshold_key, largest, ties_take, bits, workspace, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace wagle
