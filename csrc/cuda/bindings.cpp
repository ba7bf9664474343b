// Torch-facing launchers of the CUDA kernels: TORCH_LIBRARY_IMPL(wagle, CUDA, m) for every op of
// csrc/ops.cpp except cpu_isa and the device-neutral functional attribution_score (ops.cpp).
// Input checks (common/checks.h), the device guard and the current stream live here; the kernels (csrc/cuda/*.cu, declared in kernels.h) are torch-free. Built only when setup.py
// resolves WAGLE_CUDA on (a CUDA torch and CUDA_HOME): the CPU torch wheel lacks the CUDA headers,
// so this file is not compiled on CPU-only machines (tools/check_cuda_compile.sh covers the .cu).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "common/adamw_math.h"
#include "common/checks.h"
#include "common/layout.h"
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

void check_ok(cudaError_t err) { C10_CUDA_CHECK(err); }

unsigned long long* hist_ptr(at::Tensor& hist) {
  return reinterpret_cast<unsigned long long*>(hist.data_ptr<int64_t>());
}

// ---- attribution_score ----------------------------------------------------------------------------
void attribution_score_out_cuda(const at::Tensor& weight, const c10::optional<at::Tensor>& grad_forget,
                                const c10::optional<at::Tensor>& grad_retain,
                                const c10::optional<at::Tensor>& hessian, c10::string_view kind_s, double gamma,
                                double eps, at::Tensor& out, at::Tensor& hist) {
  TORCH_CHECK_VALUE(weight.defined() && weight.is_cuda(), "weight must be a CUDA tensor for the CUDA kernel");
  const checks::ScoreInputs in = checks::score_inputs(weight, grad_forget, grad_retain, hessian, kind_s, out, hist);
  const at::Device device = weight.device();
  const int w_dtype = dtype_code(weight, "weight");
  const int64_t n = weight.numel();
  c10::cuda::CUDAGuard guard(device);
  const at::Tensor &w = in.w, &gf = in.gf, &gr = in.gr, &h = in.h;
  const at::ScalarType tg = in.grad_dtype;
  if (n == 0) return;
  const int g_dtype = tg == at::kBFloat16 ? kBF16 : (tg == at::kHalf ? kF16 : kF32);
  check_ok(attribution_score(in.kind, w_dtype, g_dtype, w.defined() ? w.data_ptr() : nullptr,
                             gf.defined() ? gf.data_ptr() : nullptr, gr.defined() ? gr.data_ptr() : nullptr,
                             h.defined() ? h.data_ptr() : nullptr, static_cast<float>(gamma),
                             static_cast<float>(eps), out.data_ptr<float>(), n, in.want_hist ? hist_ptr(hist) : nullptr,
                             at::cuda::getCurrentCUDAStream()));
}

// ---- selection primitives -------------------------------------------------------------------------
// The device of a score list (the dispatcher cannot route an empty list here), every tensor checked.
at::Device list_device(at::TensorList scores, const char* op) {
  TORCH_CHECK_VALUE(!scores.empty(), op, ": scores must not be empty");
  TORCH_CHECK_VALUE(scores[0].defined() && scores[0].is_cuda(), op, ": scores must be CUDA tensors");
  const at::Device device = scores[0].device();
  checks::score_list(scores, op, device);
  return device;
}

at::Tensor radix_histogram_cuda(at::TensorList scores, int64_t prefix, int64_t prefix_bits) {
  const at::Device device = list_device(scores, "radix_histogram");
  checks::check_prefix(prefix, prefix_bits, "radix_histogram", /*allow_zero=*/true);
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
  const uint32_t k = checks::key_arg(key, "count_key", "key");
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
  const uint32_t thr = checks::key_arg(threshold_key, "topk_mask_bits", "threshold_key");
  checks::check_ties_take(ties_take, scores.size());
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
  checks::check_bool_mask(mask, mask.device());
  c10::cuda::CUDAGuard guard(mask.device());
  const at::Tensor m = mask.contiguous();
  at::Tensor bits = at::empty({(m.numel() + 7) / 8}, m.options().dtype(at::kByte));
  check_ok(pack_bits(reinterpret_cast<const uint8_t*>(m.data_ptr()), m.numel(), bits.data_ptr<uint8_t>(),
                     at::cuda::getCurrentCUDAStream()));
  return bits;
}

void check_bits(const at::Tensor& bits, int64_t numel, const char* op) {
  TORCH_CHECK_VALUE(bits.defined() && bits.is_cuda(), op, ": bits must be a CUDA tensor");
  checks::check_bits(bits, numel, op, bits.device());
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


// ---- masked_adamw_ -------------------------------------------------------------------------------
// One launch for the whole list (csrc/cuda/masked_adamw.cu): per-tensor metadata with the
// coefficients computed here by the CPU op's own adamw_coeffs(), copied to the device through a
// pinned buffer (non-blocking), and a 2-int error flag read back once (the one synchronisation).
// state_steps may live on the CPU (MaskedAdamW keeps them there: no synchronisation) or on the
// device (one batched D2H copy). grad_scale / found_inf are read on the device by the kernel.
// compact_grads: grads[i] is a contiguous float32[nnz] tensor (gather_masked_'s layout).
void masked_adamw_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                       at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
                       at::TensorList mask_bits, at::TensorList chunk_offsets, at::TensorList step_offsets,
                       double lr, double beta1, double beta2, double weight_decay, double eps, bool amsgrad,
                       bool maximize, c10::string_view weight_decay_mode, const c10::optional<at::Tensor>& grad_scale,
                       const c10::optional<at::Tensor>& found_inf, int64_t torch_tail, bool compact_grads) {
  const size_t nt = params.size();
  const int mode = checks::parse_weight_decay_mode(weight_decay_mode);
  checks::check_adamw_lists(nt, grads.size(), exp_avgs.size(), exp_avg_sqs.size(), max_exp_avg_sqs.size(),
                            state_steps.size(), mask_bits.size(), chunk_offsets.size(), step_offsets.size(), amsgrad,
                            torch_tail);
  if (nt == 0) return;
  TORCH_CHECK_VALUE(params[0].defined() && params[0].is_cuda(), "masked_adamw_: params must be CUDA tensors");
  const at::Device device = params[0].device();
  const c10::cuda::CUDAGuard guard(device);
  const at::ScalarType param_dtype = checks::adamw_param_dtype(params[0]);
  const int dt = dtype_code(params[0], "params[0]");
  const double wd_eff = mode == kDecayNone ? 0.0 : weight_decay;

  // Steps: torch reads `double step = state_step.item<float>()`; device steps in one D2H copy.
  std::vector<double> steps(nt);
  {
    std::vector<at::Tensor> dev_steps;
    std::vector<size_t> dev_idx;
    for (size_t i = 0; i < nt; ++i) {
      const at::Tensor& st = state_steps[i];
      checks::check_scalar(st, "masked_adamw_: state_steps[" + std::to_string(i) + "]", device);
      if (st.device().is_cpu()) {
        steps[i] = static_cast<double>(st.to(at::kFloat).item<float>());
      } else {
        dev_steps.push_back(st.reshape({1}).to(at::kFloat));
        dev_idx.push_back(i);
      }
    }
    if (!dev_steps.empty()) {
      const at::Tensor host = at::cat(dev_steps).cpu();
      const float* h = host.data_ptr<float>();
      for (size_t j = 0; j < dev_idx.size(); ++j) steps[dev_idx[j]] = static_cast<double>(h[j]);
    }
  }

  std::vector<AdamwTensorMeta> meta;
  meta.reserve(nt);
  int64_t total_chunks = 0;
  int64_t table_steps = 0;  // largest integral step among tensors with per-element offsets
  for (size_t i = 0; i < nt; ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& g = grads[i];
    checks::check_param_grad(p, g, param_dtype, compact_grads, i, device);
    const int64_t n = p.numel();
    const at::Tensor& bits = mask_bits[i];
    const at::Tensor& dir = chunk_offsets[i];
    const int64_t nchunks = dir_chunks(n);
    const bool dense = bits.numel() == 0 && dir.numel() == 0;
    // dir[last] is on the device: sizes are checked against the state (nnz = exp_avgs[i].numel(),
    // n for a dense param), and the kernel checks the directory itself (error flag below).
    const int64_t nnz = dense ? n : exp_avgs[i].numel();
    if (compact_grads) checks::check_compact_grad_numel(g, nnz, i);
    checks::check_state(exp_avgs[i], nnz, "exp_avgs", i, device);
    checks::check_state(exp_avg_sqs[i], nnz, "exp_avg_sqs", i, device);
    if (amsgrad) checks::check_state(max_exp_avg_sqs[i], nnz, "max_exp_avg_sqs", i, device);
    AdamwTensorMeta a{};
    if (!dense) {
      checks::check_mask_layout(bits, dir, n, "masked_adamw_: mask_bits[" + std::to_string(i) + "]",
                                "masked_adamw_: chunk_offsets[" + std::to_string(i) + "]", device);
      a.bits = bits.data_ptr<uint8_t>();
      a.dir = dir.data_ptr<int64_t>();
    }
    const at::Tensor& offs = step_offsets[i];
    if (checks::check_step_offsets(offs, nnz, i, device)) {
      TORCH_CHECK_VALUE(steps[i] >= 1.0 && steps[i] == static_cast<double>(static_cast<int64_t>(steps[i])) &&
                            steps[i] < 1e8,
                        "masked_adamw_: per-element step offsets need an integral step in [1, 1e8), got ",
                        steps[i], " for params[", i, "]");
      a.offsets = offs.data_ptr<int32_t>();
      a.step_int = static_cast<int64_t>(steps[i]);
      table_steps = std::max(table_steps, a.step_int);
    }
    a.p = p.data_ptr();
    a.g = g.data_ptr();
    a.m = exp_avgs[i].data_ptr<float>();
    a.v = exp_avg_sqs[i].data_ptr<float>();
    a.vmax = amsgrad ? max_exp_avg_sqs[i].data_ptr<float>() : nullptr;
    a.n = n;
    a.nnz = nnz;
    a.tail_start = torch_tail > 0 ? n - n % torch_tail : n;
    a.c = adamw_coeffs(lr, beta1, beta2, wd_eff, eps, steps[i]);
    a.decay_all = (!dense && mode == kDecayAll && a.c.decay != 1.0f) ? 1 : 0;
    if (n == 0 || (nnz == 0 && !a.decay_all)) continue;  // nothing to read or write
    a.chunk_begin = total_chunks;
    total_chunks += nchunks;
    meta.push_back(a);
  }
  if (meta.empty()) return;
  TORCH_CHECK_VALUE(meta.size() <= static_cast<size_t>(0x7FFFFFFF), "masked_adamw_: too many tensors in one call");

  // One pinned host buffer: metadata, then the per-step coefficient table (if any offsets).
  const int64_t meta_bytes = static_cast<int64_t>(meta.size() * sizeof(AdamwTensorMeta));
  const int64_t table_len = table_steps > 0 ? table_steps + 1 : 0;
  const int64_t table_off = (meta_bytes + 15) / 16 * 16;
  const at::Tensor host = at::empty({table_off + table_len * 2 * static_cast<int64_t>(sizeof(float))},
                                    at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr<uint8_t>(), meta.data(), meta_bytes);
  if (table_len > 0) {
    float* tab = reinterpret_cast<float*>(host.data_ptr<uint8_t>() + table_off);
    tab[0] = 0.0f;  // step 0 is never valid (the kernel flags it)
    tab[1] = 1.0f;
    for (int64_t s = 1; s < table_len; ++s) {
      const AdamwCoeffs c = adamw_coeffs(lr, beta1, beta2, wd_eff, eps, static_cast<double>(s));
      tab[2 * s] = c.neg_step_size;
      tab[2 * s + 1] = c.bc2_sqrt;
    }
  }
  const at::Tensor dev = host.to(at::TensorOptions().device(device), /*non_blocking=*/true);  // the caching host allocator
                                                                    // keeps `host` alive until done
  at::Tensor scale_f, found_f;
  AdamwListArgs args{};
  if (grad_scale.has_value() && grad_scale->defined()) {
    checks::check_scalar(*grad_scale, "masked_adamw_: grad_scale", device);
    scale_f = grad_scale->reshape({1}).to(device, at::kFloat);
    args.grad_scale = scale_f.data_ptr<float>();
  }
  if (found_inf.has_value() && found_inf->defined()) {
    checks::check_scalar(*found_inf, "masked_adamw_: found_inf", device);
    found_f = found_inf->reshape({1}).to(device, at::kFloat);
    args.found_inf = found_f.data_ptr<float>();
  }
  at::Tensor err = at::zeros({2}, at::TensorOptions().dtype(at::kInt).device(device));
  args.step_table = table_len > 0 ? reinterpret_cast<const float*>(dev.data_ptr<uint8_t>() + table_off) : nullptr;
  args.table_len = table_len;
  args.error = err.data_ptr<int>();
  args.maximize = maximize;
  args.compact_grads = compact_grads;
  check_ok(masked_adamw(dt, reinterpret_cast<const AdamwTensorMeta*>(dev.data_ptr<uint8_t>()),
                        static_cast<int>(meta.size()), total_chunks, amsgrad, args,
                        at::cuda::getCurrentCUDAStream()));
  const at::Tensor err_h = err.cpu();  // synchronises (like the CPU op, a bad directory raises)
  const int* e = err_h.data_ptr<int>();
  TORCH_CHECK_VALUE(e[0] == 0, "masked_adamw_: chunk_offsets do not match mask_bits (or the size of exp_avgs) in ", e[0],
                    " chunk(s) (rebuild the directory from the mask); the state may be partially updated");
  TORCH_CHECK_VALUE(e[1] == 0, "masked_adamw_: ", e[1], " step_offsets are outside [0, step); the state may "
                    "be partially updated");
}
// ---- end masked_adamw_ ----------------------------------------------------------------------------

// ---- gather_masked_ (compact gradients) -----------------------------------------------------------
// One launch (csrc/cuda/gather_masked.cu), no synchronisation: chunk_offsets[-1] lives on the
// device, so out.numel() is not compared with it here (wagle_ext.ops.gather_masked skips that host
// read on CUDA too); the kernel never writes outside out or a chunk's directory range.
void gather_masked_cuda(at::Tensor& out, const at::Tensor& src, const at::Tensor& bits,
                        const at::Tensor& chunk_offsets, bool accumulate) {
  TORCH_CHECK_VALUE(src.defined() && src.is_cuda(), "gather_masked_: src must be a CUDA tensor");
  const at::Device device = src.device();
  checks::check_gather(out, src, bits, chunk_offsets, device);
  const int dt = dtype_code(src, "gather_masked_: src");
  const int64_t n = src.numel();
  const int64_t nchunks = dir_chunks(n);
  TORCH_CHECK_VALUE(nchunks <= 0x7FFFFFFFLL, "gather_masked_: src has too many elements (", n, ")");
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(device);
  check_ok(gather_masked(dt, src.data_ptr(), n, bits.data_ptr<uint8_t>(), chunk_offsets.data_ptr<int64_t>(),
                         out.data_ptr<float>(), out.numel(), accumulate, at::cuda::getCurrentCUDAStream()));
}
}  // namespace
}  // namespace cuda
}  // namespace wagle

TORCH_LIBRARY_IMPL(wagle, CUDA, m) {
  m.impl("attribution_score_out", &wagle::cuda::attribution_score_out_cuda);
  m.impl("radix_histogram", &wagle::cuda::radix_histogram_cuda);
  m.impl("count_key", &wagle::cuda::count_key_cuda);
  m.impl("topk_mask_bits", &wagle::cuda::topk_mask_bits_cuda);
  m.impl("pack_bits", &wagle::cuda::pack_bits_cuda);
  m.impl("unpack_bits", &wagle::cuda::unpack_bits_cuda);
  m.impl("popcount_bits", &wagle::cuda::popcount_bits_cuda);
  m.impl("masked_adamw_", &wagle::cuda::masked_adamw_cuda);
  m.impl("gather_masked_", &wagle::cuda::gather_masked_cuda);
}
