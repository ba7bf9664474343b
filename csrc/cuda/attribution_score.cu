// CUDA kernel of wagle::attribution_score(_out) (docs/kernels.md 4.1): one pass over the inputs that
// writes the fp32 score and accumulates the 11-bit key histogram used by selection.
//
// Grid-stride over 8-element vectors (16-byte loads: 2 x float4 for fp32, 1 x uint4 for bf16/fp16)
// when every pointer is 16-byte aligned, else scalar loads; int64 indices throughout. The
// histogram is a 2049-bin uint32 array in shared memory per block (8 KB), flushed once per block
// with atomicAdd on the nonzero bins; the all-zero bucket is counted in a register, and lanes of a
// warp that hit the same bucket add once together (__match_any_sync, hist_add_warp_aggregated), so
// clustered scores do not serialise on one shared counter. An empty hist (null) skips all of it.
// Bytes per element (fp32): 16 for wagle (w, g_f, g_r read; score written), 20 with a Hessian.
#include "cuda/device_common.cuh"

namespace wagle {
namespace cuda {
namespace {

template <int Kind, int DW, int DG>
__global__ void __launch_bounds__(kThreads)
    // No __restrict__: with inplace scoring `out` IS `gf` (attribution_scores(out=grads_forget)),
    // and restrict on aliasing pointers lets nvcc use non-coherent loads (docs/pitfalls.md K21).
    score_kernel(const void* w, const void* gf, const void* gr, const void* h, float gamma, float eps, float* out,
                 int64_t n, bool vec, unsigned long long* hist) {
  constexpr bool kNeedW = Kind != kScoreGradient;
  constexpr bool kNeedGf = Kind != kScoreMagnitude;
  constexpr bool kNeedGr = Kind == kScoreWagle || Kind == kScoreWagleHessian;
  constexpr bool kNeedH = Kind == kScoreWagleHessian;
  const bool want_hist = hist != nullptr;  // null: scores only (an empty hist tensor), no histogram work
  __shared__ uint32_t sh[kHistSize];
  if (want_hist) {
    for (int i = threadIdx.x; i < kHistSize; i += blockDim.x) sh[i] = 0;
    __syncthreads();
  }
  uint32_t zeros = 0;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  int64_t scalar_begin = 0;
  if (vec) {
    const int64_t nv = n / 8;
    for (int64_t v = tid; v < nv; v += stride) {
      float wv[8] = {0.f}, gfv[8] = {0.f}, grv[8] = {0.f}, hv[8] = {0.f}, s[8];
      if (kNeedW) load8_f<DW>(w, v, wv);
      if (kNeedGf) load8_f<DG>(gf, v, gfv);
      if (kNeedGr) load8_f<DG>(gr, v, grv);
      if (kNeedH) load8_f<DG>(h, v, hv);
#pragma unroll
      for (int j = 0; j < 8; ++j) s[j] = ::wagle::attribution_score<Kind>(wv[j], gfv[j], grv[j], hv[j], gamma, eps);
      float4* o = reinterpret_cast<float4*>(out) + 2 * v;
      o[0] = make_float4(s[0], s[1], s[2], s[3]);
      o[1] = make_float4(s[4], s[5], s[6], s[7]);
      if (want_hist) {
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const uint32_t b = score_bucket(s[j]);
          if (b == kZeroBucket) ++zeros;
          else hist_add_warp_aggregated(sh, b);
        }
      }
    }
    scalar_begin = nv * 8;
  }
  for (int64_t i = scalar_begin + tid; i < n; i += stride) {
    const float wv = kNeedW ? load_f<DW>(w, i) : 0.f;
    const float gfv = kNeedGf ? load_f<DG>(gf, i) : 0.f;
    const float grv = kNeedGr ? load_f<DG>(gr, i) : 0.f;
    const float hv = kNeedH ? load_f<DG>(h, i) : 0.f;
    const float s = ::wagle::attribution_score<Kind>(wv, gfv, grv, hv, gamma, eps);
    out[i] = s;
    if (want_hist) {
      const uint32_t b = score_bucket(s);
      if (b == kZeroBucket) ++zeros;
      else hist_add_warp_aggregated(sh, b);
    }
  }
  if (!want_hist) return;
  if (zeros) atomicAdd(sh + kZeroBucket, zeros);
  __syncthreads();
  flush_hist(sh, hist);
}

bool aligned16(const void* p) { return p == nullptr || (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <int Kind, int DW, int DG>
cudaError_t launch(const void* w, const void* gf, const void* gr, const void* h, float gamma, float eps,
                   float* out, int64_t n, unsigned long long* hist, cudaStream_t stream) {
  const bool vec = aligned16(w) && aligned16(gf) && aligned16(gr) && aligned16(h) && aligned16(out);
  // Per-block shared counters are uint32: keep every block under 2^31 elements.
  int blocks = grid_blocks(vec ? n / 8 + 1 : n, kThreads);
  const int64_t min_blocks = n / (int64_t(1) << 31) + 1;
  if (blocks < min_blocks) blocks = static_cast<int>(min_blocks);
  score_kernel<Kind, DW, DG><<<blocks, kThreads, 0, stream>>>(w, gf, gr, h, gamma, eps, out, n, vec, hist);
  return cudaGetLastError();
}

template <int DW, int DG>
cudaError_t by_kind(int kind, const void* w, const void* gf, const void* gr, const void* h, float gamma,
                    float eps, float* out, int64_t n, unsigned long long* hist, cudaStream_t stream) {
  switch (kind) {
    case kScoreWagle: return launch<kScoreWagle, DW, DG>(w, gf, gr, h, gamma, eps, out, n, hist, stream);
    case kScoreWagleHessian:
      return launch<kScoreWagleHessian, DW, DG>(w, gf, gr, h, gamma, eps, out, n, hist, stream);
    case kScoreSnip: return launch<kScoreSnip, DW, DG>(w, gf, gr, h, gamma, eps, out, n, hist, stream);
    case kScoreGradient: return launch<kScoreGradient, DW, DG>(w, gf, gr, h, gamma, eps, out, n, hist, stream);
    case kScoreMagnitude: return launch<kScoreMagnitude, DW, DG>(w, gf, gr, h, gamma, eps, out, n, hist, stream);
    default: return cudaErrorInvalidValue;
  }
}

template <int DW>
cudaError_t by_grad_dtype(int g_dtype, int kind, const void* w, const void* gf, const void* gr, const void* h,
                          float gamma, float eps, float* out, int64_t n, unsigned long long* hist,
                          cudaStream_t stream) {
  switch (g_dtype) {
    case kF32: return by_kind<DW, kF32>(kind, w, gf, gr, h, gamma, eps, out, n, hist, stream);
    case kBF16: return by_kind<DW, kBF16>(kind, w, gf, gr, h, gamma, eps, out, n, hist, stream);
    case kF16: return by_kind<DW, kF16>(kind, w, gf, gr, h, gamma, eps, out, n, hist, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t attribution_score(int kind, int w_dtype, int g_dtype, const void* w, const void* gf,
                              const void* gr, const void* h, float gamma, float eps, float* out,
                              int64_t n, unsigned long long* hist, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  switch (w_dtype) {
    case kF32: return by_grad_dtype<kF32>(g_dtype, kind, w, gf, gr, h, gamma, eps, out, n, hist, stream);
    case kBF16: return by_grad_dtype<kBF16>(g_dtype, kind, w, gf, gr, h, gamma, eps, out, n, hist, stream);
    case kF16: return by_grad_dtype<kF16>(g_dtype, kind, w, gf, gr, h, gamma, eps, out, n, hist, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace wagle
