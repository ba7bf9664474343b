// CUDA kernels of the bit-array ops (csrc/ops.cpp): pack_bits, unpack_bits, popcount_bits.
// Bit j of byte i is element 8*i + j (little-endian bit order); padding bits are zero.
#include "cuda/device_common.cuh"

namespace wagle {
namespace cuda {
namespace {

// One thread per output byte: 8 mask bytes -> one bit byte.
__global__ void __launch_bounds__(kThreads)
    pack_kernel(const uint8_t* __restrict__ mask, int64_t n, uint8_t* __restrict__ bits) {
  const int64_t nbytes = (n + 7) / 8;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < nbytes; b += stride) {
    uint32_t v = 0;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int64_t i = 8 * b + j;
      if (i < n && mask[i]) v |= 1u << j;
    }
    bits[b] = static_cast<uint8_t>(v);
  }
}

// One thread per output element.
__global__ void __launch_bounds__(kThreads)
    unpack_kernel(const uint8_t* __restrict__ bits, int64_t n, uint8_t* __restrict__ mask) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    mask[i] = static_cast<uint8_t>((bits[i >> 3] >> (i & 7)) & 1u);
}

// Set bits among the first n: full bytes, the last byte masked to its n % 8 valid bits.
__global__ void __launch_bounds__(kThreads)
    popcount_kernel(const uint8_t* __restrict__ bits, int64_t n, unsigned long long* __restrict__ count) {
  const int64_t nbytes = (n + 7) / 8;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  unsigned long long c = 0;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < nbytes; b += stride) {
    uint32_t v = bits[b];
    const int64_t valid = n - 8 * b;
    if (valid < 8) v &= (1u << valid) - 1u;
    c += __popc(v);
  }
  c = warp_sum(c);
  if ((threadIdx.x & (kWarp - 1)) == 0 && c) atomicAdd(count, c);
}

}  // namespace

cudaError_t pack_bits(const uint8_t* mask, int64_t n, uint8_t* bits, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  pack_kernel<<<grid_blocks((n + 7) / 8, kThreads), kThreads, 0, stream>>>(mask, n, bits);
  return cudaGetLastError();
}

cudaError_t unpack_bits(const uint8_t* bits, int64_t n, uint8_t* mask, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  unpack_kernel<<<grid_blocks(n, kThreads), kThreads, 0, stream>>>(bits, n, mask);
  return cudaGetLastError();
}

cudaError_t popcount_bits(const uint8_t* bits, int64_t n, unsigned long long* count, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  popcount_kernel<<<grid_blocks((n + 7) / 8, kThreads), kThreads, 0, stream>>>(bits, n, count);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace wagle
