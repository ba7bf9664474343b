// Torch-facing launchers of the CUDA kernels: TORCH_LIBRARY_IMPL(wagle, CUDA, m) for every op of
// csrc/ops.cpp except cpu_isa. Input checks, the device guard and the current stream live here;
// the kernels (csrc/cuda/*.cu, declared in kernels.h) are torch-free. Built only when setup.py
// resolves WAGLE_CUDA on (a CUDA torch and CUDA_HOME): the CPU torch wheel lacks the CUDA headers,
// so this file is not compiled on CPU-only machines (tools/check_cuda_compile.sh covers the .cu).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "common/score_math.h"
#include "cuda/kernels.h"

namespace wagle {
namespace cuda {
namespace {

int dtype_code(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return kF32;
    case at::kBFloat16: return kBF16;
    case at::kHalf: return kF16;
    default:
      TORCH_CHECK_TYPE(false, name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
  return kF32;
}

void check_cuda(const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK_VALUE(t.defined(), name, " is undefined");
  TORCH_CHECK_VALUE(t.device() == device, name, " is on ", t.device(), " but the op runs on ", device);
}

void check_ok(cudaError_t err) { C10_CUDA_CHECK(err); }

unsigned long long* hist_ptr(at::Tensor& hist) {
  return reinterpret_cast<unsigned long long*>(hist.data_ptr<int64_t>());
}

int parse_kind(c10::string_view kind) {
  if (kind == "wagle") return kScoreWagle;
  if (kind == "wagle_hessian") return kScoreWagleHessian;
  if (kind == "snip") return kScoreSnip;
  if (kind == "gradient") return kScoreGradient;
  if (kind == "magnitude") return kScoreMagnitude;
  TORCH_CHECK_VALUE(false, "attribution_score: unknown kind '", std::string(kind),
                    "' (expected wagle, wagle_hessian, snip, gradient or magnitude)");
  return kScoreWagle;
}

// ---- attribution_score ----------------------------------------------------------------------------
void attribution_score_out_cuda(const at::Tensor& weight, const c10::optional<at::Tensor>& grad_forget,
                                const c10::optional<at::Tensor>& grad_retain,
                                const c10::optional<at::Tensor>& hessian, c10::string_view kind_s, double gamma,
                                double eps, at::Tensor& out, at::Tensor& hist) {
  const int kind = parse_kind(kind_s);
  const bool need_gf = kind != kScoreMagnitude;
  const bool need_w = kind != kScoreGradient;
  const bool need_gr = kind == kScoreWagle || kind == kScoreWagleHessian;
  const bool need_h = kind == kScoreWagleHessian;
  TORCH_CHECK_VALUE(weight.defined() && weight.is_cuda(), "weight must be a CUDA tensor for the CUDA kernel");
  const at::Device device = weight.device();
  const int w_dtype = dtype_code(weight, "weight");
  const int64_t n = weight.numel();
  check_cuda(out, "out", device);
  check_cuda(hist, "hist", device);
  TORCH_CHECK_VALUE(out.scalar_type() == at::kFloat && out.is_contiguous() && out.numel() == n,
                    "attribution_score_out: out must be a contiguous float32 tensor with ", n, " elements");
  TORCH_CHECK_VALUE(hist.scalar_type() == at::kLong && hist.is_contiguous() && hist.numel() == kHistSize,
                    "hist must be a contiguous int64 tensor with ", kHistSize, " entries");
  auto grad_like = [&](const c10::optional<at::Tensor>& t, const char* name, bool needed) {
    if (!needed) return at::Tensor();
    TORCH_CHECK_VALUE(t.has_value() && t->defined(), "attribution_score: kind '", std::string(kind_s),
                      "' needs ", name);
    check_cuda(*t, name, device);
    dtype_code(*t, name);
    TORCH_CHECK_VALUE(t->numel() == n, "attribution_score: ", name, " has ", t->numel(), " elements, weight has ", n);
    return t->contiguous();
  };
  c10::cuda::CUDAGuard guard(device);
  at::Tensor w = need_w ? weight.contiguous() : at::Tensor();
  at::Tensor gf = grad_like(grad_forget, "grad_forget", need_gf);
  at::Tensor gr = grad_like(grad_retain, "grad_retain", need_gr);
  at::Tensor h = grad_like(hessian, "hessian", need_h);
  // g_f, g_r and h share one dtype in the kernel (as on the CPU); convert the odd one out.
  at::ScalarType tg = at::kFloat;
  if (gf.defined()) tg = gf.scalar_type();
  else if (gr.defined()) tg = gr.scalar_type();
  if (gr.defined() && gr.scalar_type() != tg) gr = gr.to(tg);
  if (h.defined() && h.scalar_type() != tg) h = h.to(tg);
  if (n == 0) return;
  const int g_dtype = tg == at::kBFloat16 ? kBF16 : (tg == at::kHalf ? kF16 : kF32);
  check_ok(attribution_score(kind, w_dtype, g_dtype, w.defined() ? w.data_ptr() : nullptr,
                             gf.defined() ? gf.data_ptr() : nullptr, gr.defined() ? gr.data_ptr() : nullptr,
                             h.defined() ? h.data_ptr() : nullptr, static_cast<float>(gamma),
                             static_cast<float>(eps), out.data_ptr<float>(), n, hist_ptr(hist),
                             at::cuda::getCurrentCUDAStream()));
}

std::tuple<at::Tensor, at::Tensor> attribution_score_cuda(const at::Tensor& weight,
                                                          const c10::optional<at::Tensor>& grad_forget,
                                                          const c10::optional<at::Tensor>& grad_retain,
                                                          const c10::optional<at::Tensor>& hessian,
                                                          c10::string_view kind, double gamma, double eps) {
  at::Tensor out = at::empty(weight.sizes(), weight.options().dtype(at::kFloat));
  at::Tensor hist = at::zeros({kHistSize}, weight.options().dtype(at::kLong));
  attribution_score_out_cuda(weight, grad_forget, grad_retain, hessian, kind, gamma, eps, out, hist);
  return {out, hist};
}

// ---- selection primitives -------------------------------------------------------------------------
at::Device list_device(at::TensorList scores, const char* op) {
  TORCH_CHECK_VALUE(!scores.empty(), op, ": scores must not be empty");
  TORCH_CHECK_VALUE(scores[0].defined() && scores[0].is_cuda(), op, ": scores must be CUDA tensors");
  const at::Device device = scores[0].device();
  for (size_t i = 0; i < scores.size(); ++i) {
    check_cuda(scores[i], "scores[i]", device);
    dtype_code(scores[i], "scores[i]");
  }
  return device;
}

uint32_t key_arg(int64_t key, const char* name) {
  TORCH_CHECK_VALUE(key >= 0 && key <= 0xFFFFFFFFLL, name, " must be a uint32 key in [0, 2^32), got ", key);
  return static_cast<uint32_t>(key);
}

at::Tensor radix_histogram_cuda(at::TensorList scores, int64_t prefix, int64_t prefix_bits) {
  const at::Device device = list_device(scores, "radix_histogram");
  TORCH_CHECK_VALUE(prefix_bits == 0 || prefix_bits == 11 || prefix_bits == 22,
                    "radix_histogram: prefix_bits must be 0, 11 or 22, got ", prefix_bits);
  TORCH_CHECK_VALUE(prefix >= 0 && (prefix_bits == 0 ? prefix == 0 : prefix < (int64_t(1) << prefix_bits)),
                    "radix_histogram: prefix ", prefix, " does not fit in ", prefix_bits, " bits");
  c10::cuda::CUDAGuard guard(device);
  at::Tensor hist = at::zeros({kHistSize}, scores[0].options().dtype(at::kLong));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  for (const at::Tensor& t : scores) {  // one launch per tensor
    const at::Tensor s = t.contiguous();
    check_ok(radix_histogram(s.data_ptr(), dtype_code(s, "scores[i]"), s.numel(), static_cast<uint32_t>(prefix),
                             static_cast<int>(prefix_bits), hist_ptr(hist), stream));
  }
  return hist;
}

at::Tensor count_key_cuda(at::TensorList scores, int64_t key) {
  const at::Device device = list_device(scores, "count_key");
  const uint32_t k = key_arg(key, "count_key: key");
  c10::cuda::CUDAGuard guard(device);
  at::Tensor counts = at::zeros({static_cast<int64_t>(scores.size())}, scores[0].options().dtype(at::kLong));
  auto* c = reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  for (size_t i = 0; i < scores.size(); ++i) {
    const at::Tensor s = scores[i].contiguous();
    check_ok(count_key(s.data_ptr(), dtype_code(s, "scores[i]"), s.numel(), k, c + i, stream));
  }
  return counts;
}

std::vector<at::Tensor> topk_mask_bits_cuda(at::TensorList scores, int64_t threshold_key, bool largest,
                                            at::IntArrayRef ties_take) {
  const at::Device device = list_device(scores, "topk_mask_bits");
  const uint32_t thr = key_arg(threshold_key, "topk_mask_bits: threshold_key");
  TORCH_CHECK_VALUE(ties_take.size() == scores.size(), "topk_mask_bits: ties_take has ", ties_take.size(),
                    " entries but scores has ", scores.size());
  c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  std::vector<at::Tensor> out;
  out.reserve(scores.size());
  for (size_t i = 0; i < scores.size(); ++i) {
    const at::Tensor s = scores[i].contiguous();
    const int64_t n = s.numel();
    at::Tensor bits = at::empty({(n + 7) / 8}, s.options().dtype(at::kByte));
    const int64_t ws_bytes = topk_mask_bits_workspace_bytes(n, ties_take[i]);
    at::Tensor ws = ws_bytes > 0 ? at::empty({ws_bytes}, s.options().dtype(at::kByte)) : at::Tensor();
    check_ok(topk_mask_bits(s.data_ptr(), dtype_code(s, "scores[i]"), n, thr, largest, ties_take[i],
                            bits.data_ptr<uint8_t>(), ws.defined() ? ws.data_ptr() : nullptr, stream));
    out.push_back(bits);
  }
  return out;
}

// ---- bit arrays -----------------------------------------------------------------------------------
at::Tensor pack_bits_cuda(const at::Tensor& mask) {
  TORCH_CHECK_VALUE(mask.defined() && mask.is_cuda(), "pack_bits: mask must be a CUDA tensor");
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool, "pack_bits expects a bool tensor, got ", mask.scalar_type());
  c10::cuda::CUDAGuard guard(mask.device());
  const at::Tensor m = mask.contiguous();
  at::Tensor bits = at::empty({(m.numel() + 7) / 8}, m.options().dtype(at::kByte));
  check_ok(pack_bits(reinterpret_cast<const uint8_t*>(m.data_ptr()), m.numel(), bits.data_ptr<uint8_t>(),
                     at::cuda::getCurrentCUDAStream()));
  return bits;
}

void check_bits(const at::Tensor& bits, int64_t numel, const char* op) {
  TORCH_CHECK_VALUE(bits.defined() && bits.is_cuda(), op, ": bits must be a CUDA tensor");
  TORCH_CHECK_TYPE(bits.scalar_type() == at::kByte, op, " expects uint8 bits, got ", bits.scalar_type());
  TORCH_CHECK_VALUE(numel >= 0 && bits.numel() * 8 >= numel, op, ": ", bits.numel(), " bytes cannot hold ",
                    numel, " bits");
}

at::Tensor unpack_bits_cuda(const at::Tensor& bits, int64_t numel) {
  check_bits(bits, numel, "unpack_bits");
  c10::cuda::CUDAGuard guard(bits.device());
  const at::Tensor b = bits.contiguous();
  at::Tensor mask = at::empty({numel}, b.options().dtype(at::kBool));
  check_ok(unpack_bits(b.data_ptr<uint8_t>(), numel, reinterpret_cast<uint8_t*>(mask.data_ptr()),
                       at::cuda::getCurrentCUDAStream()));
  return mask;
}

int64_t popcount_bits_cuda(const at::Tensor& bits, int64_t numel) {
  check_bits(bits, numel, "popcount_bits");
  c10::cuda::CUDAGuard guard(bits.device());
  const at::Tensor b = bits.contiguous();
  at::Tensor count = at::zeros({1}, b.options().dtype(at::kLong));
  check_ok(popcount_bits(b.data_ptr<uint8_t>(), numel, reinterpret_cast<unsigned long long*>(count.data_ptr<int64_t>()),
                         at::cuda::getCurrentCUDAStream()));
  return count.item<int64_t>();  // synchronises: the op returns a Python int
}

}  // namespace
}  // namespace cuda
}  // namespace wagle

TORCH_LIBRARY_IMPL(wagle, CUDA, m) {
  m.impl("attribution_score_out", &wagle::cuda::attribution_score_out_cuda);
  m.impl("attribution_score", &wagle::cuda::attribution_score_cuda);
  m.impl("radix_histogram", &wagle::cuda::radix_histogram_cuda);
  m.impl("count_key", &wagle::cuda::count_key_cuda);
  m.impl("topk_mask_bits", &wagle::cuda::topk_mask_bits_cuda);
  m.impl("pack_bits", &wagle::cuda::pack_bits_cuda);
  m.impl("unpack_bits", &wagle::cuda::unpack_bits_cuda);
  m.impl("popcount_bits", &wagle::cuda::popcount_bits_cuda);
}
