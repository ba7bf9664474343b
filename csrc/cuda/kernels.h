// Torch-free CUDA kernels of the wagle ops: raw device pointers, int64 sizes, an explicit stream.
// They are compiled (and compile-checked in CI, tools/check_cuda_compile.sh) without any torch
// header; the torch-facing launchers with input checks live in csrc/cuda/bindings.cpp, built only
// in CUDA builds. Every entry point returns the launch's cudaError_t (cudaSuccess or the first
// error), never throws, and is asynchronous on `stream`.
//
// Element dtypes are passed as DType codes. Histograms and counters are the int64 tensors of the
// op contract (csrc/ops.cpp), addressed as unsigned long long for atomicAdd (counts are >= 0, so
// the bit patterns agree).
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

#include "common/adamw_math.h"
#include "cuda/kernel_args.h"

namespace wagle {
namespace cuda {

// ---- attribution scores (attribution_score.cu) ------------------------------------------------
// out[i] = attribution_score<kind>(w[i], gf[i], gr[i], h[i]) (common/score_math.h) for i < n, and
// hist[score_bucket(out[i])] += 1 (hist: 2049 int64 on device, ADDED to; null = scores only). Unused inputs (by kind)
// may be null. w has dtype w_dtype; gf, gr, h share g_dtype. One launch.
cudaError_t attribution_score(int kind, int w_dtype, int g_dtype, const void* w, const void* gf,
                              const void* gr, const void* h, float gamma, float eps, float* out,
                              int64_t n, unsigned long long* hist, cudaStream_t stream);

// ---- selection primitives (select_topk.cu) ----------------------------------------------------
// ADDS to hist (2049 int64) the digit histogram of the keys of scores[0..n) whose top prefix_bits
// bits equal prefix (prefix_bits 0: digit key >> 21 and NaN counter at 2048; 11: (key >> 10) &
// 0x7FF; 22: key & 0x3FF). One launch.
cudaError_t radix_histogram(const void* scores, int dtype, int64_t n, uint32_t prefix,
                            int prefix_bits, unsigned long long* hist, cudaStream_t stream);

// ADDS to *count the number of elements whose key equals `key` (NaN never does). One launch.
cudaError_t count_key(const void* scores, int dtype, int64_t n, uint32_t key,
                      unsigned long long* count, cudaStream_t stream);

// Bytes of device scratch topk_mask_bits needs for n elements (0 unless 0 < ties_take).
int64_t topk_mask_bits_workspace_bytes(int64_t n, int64_t ties_take);

// Writes bits[0 .. ceil(n/8)) (every byte, padding bits zero): bit i set where key(scores[i]) is
// strictly better than threshold_key (greater if largest, else smaller) or equals it and is among
// the first ties_take such elements in index order (ties_take < 0: all of them). NaN never set.
// ties_take > 0 needs `workspace` of topk_mask_bits_workspace_bytes(n, ties_take) bytes: three
// launches (count ties per chunk, exclusive scan, mask); otherwise one launch.
cudaError_t topk_mask_bits(const void* scores, int dtype, int64_t n, uint32_t threshold_key,
                           bool largest, int64_t ties_take, uint8_t* bits, void* workspace,
                           cudaStream_t stream);

// ---- bit arrays (bits.cu) ---------------------------------------------------------------------
// mask: n bytes of 0/1 (torch.bool) -> bits[0 .. ceil(n/8)).
cudaError_t pack_bits(const uint8_t* mask, int64_t n, uint8_t* bits, cudaStream_t stream);
// bits -> mask[0..n) as 0/1 bytes.
cudaError_t unpack_bits(const uint8_t* bits, int64_t n, uint8_t* mask, cudaStream_t stream);
// ADDS to *count the number of set bits among the first n bits.
cudaError_t popcount_bits(const uint8_t* bits, int64_t n, unsigned long long* count,
                          cudaStream_t stream);

// ---- masked AdamW (masked_adamw.cu): AdamwTensorMeta, AdamwListArgs in cuda/kernel_args.h ----------
// One masked AdamW step over num_tensors tensors of one dtype in ONE launch (one block per
// 4096-element chunk; total_chunks = sum of ceil(n/4096) over the tensors that have work, and
// meta[i].chunk_begin their prefix sums). Same arithmetic as the CPU op, bit for bit.
cudaError_t masked_adamw(int dtype, const AdamwTensorMeta* meta, int num_tensors, int64_t total_chunks,
                         bool amsgrad, const AdamwListArgs& args, cudaStream_t stream);

// ---- compact gradients (gather_masked.cu) -------------------------------------------------------
// out[k] = float(src[e_k]) (accumulate: out[k] += float(src[e_k]), one float32 add) for the k-th
// selected element e_k of bits (n elements of dtype, contiguous; bits ceil(n/8) bytes, dir
// ceil(n/4096)+1 entries as masked_adamw's, on the device). Writes only out[0..nnz), inside each
// chunk's [dir[c], dir[c+1]); a directory that disagrees with the bits is not reported. One launch.
cudaError_t gather_masked(int dtype, const void* src, int64_t n, const uint8_t* bits, const int64_t* dir,
                          float* out, int64_t nnz, bool accumulate, cudaStream_t stream);

}  // namespace cuda
}  // namespace wagle
