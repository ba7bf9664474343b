// Memory layouts every back end shares (docs/conventions.md): the bit arrays of a PackedMask and
// the chunk directory that addresses compact state and compact gradients. Torch-free and
// WAGLE_HD, so CPU code, CUDA kernels and the torch-facing bindings all use these definitions;
// Python and the Triton kernels use wagle_ext/kernels/reference.py MASKED_ADAMW_CHUNK.
#pragma once
#include <stdint.h>

#if defined(__CUDACC__)
#define WAGLE_HD __host__ __device__ __forceinline__
#else
#define WAGLE_HD inline __attribute__((always_inline))
#endif

namespace wagle {

// Elements per directory (chunk_offsets) entry: entry c = selected elements before element
// kDirChunk * c, the last entry = nnz. A multiple of 64 (CPU mask words) and of 1024 (4 CUDA warps
// of 32 32-bit words).
constexpr int64_t kDirChunk = 4096;

// Entries of a directory over n elements, excluding the final nnz entry.
WAGLE_HD int64_t dir_chunks(int64_t n) { return (n + kDirChunk - 1) / kDirChunk; }

// Bytes of a bit array over n elements (bit j of byte i = element 8i + j).
WAGLE_HD int64_t bit_bytes(int64_t n) { return (n + 7) / 8; }

}  // namespace wagle
