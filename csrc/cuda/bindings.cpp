// Torch-facing launchers of the CUDA kernels: TORCH_LIBRARY_IMPL(wagle, CUDA, m) for every op of
// csrc/ops.cpp except cpu_isa and the device-neutral functional attribution_score (ops.cpp).
// Input checks and every host-side value of a launch live in cuda/host_plan.h (ATen only, compiled
// on CPU-only machines by tests/test_cuda_contract.py); the device guard, pinned copies and the
// current stream live here; the kernels (csrc/cuda/*.cu, declared in kernels.h) are torch-free. Built only when setup.py
// resolves WAGLE_CUDA on (a CUDA torch and CUDA_HOME): the CPU torch wheel lacks the CUDA headers,
// so this file is not compiled on CPU-only machines (tools/check_cuda_compile.sh covers the .cu).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "common/adamw_math.h"
#include "common/checks.h"
#include "common/layout.h"
#include "common/score_math.h"
#include "cuda/host_plan.h"
#include "cuda/kernels.h"

namespace wagle {
namespace cuda {
namespace {

using host::dtype_code;

void check_ok(cudaError_t err) { C10_CUDA_CHECK(err); }

unsigned long long* hist_ptr(at::Tensor& hist) {
  return reinterpret_cast<unsigned long long*>(hist.data_ptr<int64_t>());
}

// ---- attribution_score ----------------------------------------------------------------------------
void attribution_score_out_cuda(const at::Tensor& weight, const c10::optional<at::Tensor>& grad_forget,
                                const c10::optional<at::Tensor>& grad_retain,
                                const c10::optional<at::Tensor>& hessian, c10::string_view kind_s, double gamma,
                                double eps, at::Tensor& out, at::Tensor& hist) {
  const host::ScorePlan p =
      host::plan_attribution_score(weight, grad_forget, grad_retain, hessian, kind_s, out, hist, c10::kCUDA);
  if (p.n == 0) return;
  c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor &w = p.in.w, &gf = p.in.gf, &gr = p.in.gr, &h = p.in.h;
  check_ok(attribution_score(p.in.kind, p.w_dtype, p.g_dtype, w.defined() ? w.data_ptr() : nullptr,
                             gf.defined() ? gf.data_ptr() : nullptr, gr.defined() ? gr.data_ptr() : nullptr,
                             h.defined() ? h.data_ptr() : nullptr, static_cast<float>(gamma), static_cast<float>(eps),
                             out.data_ptr<float>(), p.n, p.in.want_hist ? hist_ptr(hist) : nullptr,
                             at::cuda::getCurrentCUDAStream()));
}

// ---- selection primitives -------------------------------------------------------------------------
at::Tensor radix_histogram_cuda(at::TensorList scores, int64_t prefix, int64_t prefix_bits) {
  const std::vector<at::Tensor> ts = host::plan_radix_histogram(scores, prefix, prefix_bits, c10::kCUDA);
  c10::cuda::CUDAGuard guard(ts[0].device());
  at::Tensor hist = at::zeros({kHistSize}, ts[0].options().dtype(at::kLong));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  for (const at::Tensor& s : ts) {  // one launch per tensor
    check_ok(radix_histogram(s.data_ptr(), dtype_code(s, "scores[i]"), s.numel(), static_cast<uint32_t>(prefix),
                             static_cast<int>(prefix_bits), hist_ptr(hist), stream));
  }
  return hist;
}

at::Tensor count_key_cuda(at::TensorList scores, int64_t key) {
  uint32_t k = 0;
  const std::vector<at::Tensor> ts = host::plan_count_key(scores, key, &k, c10::kCUDA);
  c10::cuda::CUDAGuard guard(ts[0].device());
  at::Tensor counts = at::zeros({static_cast<int64_t>(ts.size())}, ts[0].options().dtype(at::kLong));
  auto* c = reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  for (size_t i = 0; i < ts.size(); ++i)
    check_ok(count_key(ts[i].data_ptr(), dtype_code(ts[i], "scores[i]"), ts[i].numel(), k, c + i, stream));
  return counts;
}

std::vector<at::Tensor> topk_mask_bits_cuda(at::TensorList scores, int64_t threshold_key, bool largest,
                                            at::IntArrayRef ties_take) {
  uint32_t thr = 0;
  const std::vector<at::Tensor> ts = host::plan_topk_mask_bits(scores, threshold_key, ties_take, &thr, c10::kCUDA);
  c10::cuda::CUDAGuard guard(ts[0].device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  std::vector<at::Tensor> out;
  out.reserve(ts.size());
  for (size_t i = 0; i < ts.size(); ++i) {
    const at::Tensor& s = ts[i];
    const int64_t n = s.numel();
    at::Tensor bits = at::empty({bit_bytes(n)}, s.options().dtype(at::kByte));
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
  host::plan_pack_bits(mask, c10::kCUDA);
  c10::cuda::CUDAGuard guard(mask.device());
  const at::Tensor m = mask.contiguous();
  at::Tensor bits = at::empty({(m.numel() + 7) / 8}, m.options().dtype(at::kByte));
  check_ok(pack_bits(reinterpret_cast<const uint8_t*>(m.data_ptr()), m.numel(), bits.data_ptr<uint8_t>(),
                     at::cuda::getCurrentCUDAStream()));
  return bits;
}

void check_bits(const at::Tensor& bits, int64_t numel, const char* op) { host::plan_bits(bits, numel, op, c10::kCUDA); }

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
// One launch for the whole list (csrc/cuda/masked_adamw.cu). host::plan_masked_adamw checks every
// argument -- directories against the bits and the state size, step offsets against each tensor's
// own step -- BEFORE the launch (cached per tensor: one synchronisation the first time a mask,
// directory or offsets tensor is seen), and computes the per-tensor metadata and the per-step rows
// the offsets reach. They go to the device through one pinned buffer (non-blocking). The kernel's
// error flag is a second line of defence; it is read back (a synchronisation) only in calls that
// validated something anyway, or in every call with WAGLE_CUDA_SYNC_CHECKS=1.
// state_steps may live on the CPU (MaskedAdamW keeps them there: no synchronisation) or on the
// device (one batched D2H copy). grad_scale / found_inf are read on the device by the kernel.
// compact_grads: grads[i] is a contiguous float32[nnz] tensor (gather_masked_'s layout).
bool sync_checks() {
  const char* e = std::getenv("WAGLE_CUDA_SYNC_CHECKS");
  return e != nullptr && e[0] != '\0' && std::strcmp(e, "0") != 0;
}

// masked_adamw_master_: master_weights (compact fp32, like exp_avgs) and rounding_seeds go into the
// per-tensor metadata (AdamwTensorMeta::mw / rounding / sr_key); masked_adamw_ passes none.
void masked_adamw_master_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                              at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
                              at::TensorList mask_bits, at::TensorList chunk_offsets, at::TensorList step_offsets,
                              at::TensorList master_weights, double lr, double beta1, double beta2,
                              double weight_decay, double eps, bool amsgrad, bool maximize,
                              c10::string_view weight_decay_mode, const c10::optional<at::Tensor>& grad_scale,
                              const c10::optional<at::Tensor>& found_inf, int64_t torch_tail, bool compact_grads,
                              at::IntArrayRef rounding_seeds) {
  c10::cuda::OptionalCUDAGuard guard;  // the validation reads run on the op's device too
  if (!params.empty() && params[0].defined() && params[0].is_cuda()) guard.set_device(params[0].device());
  const host::AdamwPlan plan = host::plan_masked_adamw(
      params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, mask_bits, chunk_offsets, step_offsets, lr,
      beta1, beta2, weight_decay, eps, amsgrad, weight_decay_mode, grad_scale, found_inf, torch_tail, compact_grads,
      c10::kCUDA, master_weights, rounding_seeds);
  if (plan.meta.empty()) return;

  // One pinned host buffer: metadata, then the per-step coefficient rows (if any offsets).
  const int64_t meta_bytes = static_cast<int64_t>(plan.meta.size() * sizeof(AdamwTensorMeta));
  const int64_t table_off = (meta_bytes + 15) / 16 * 16;
  const int64_t table_bytes = static_cast<int64_t>(plan.table.size() * sizeof(float));
  const at::Tensor host = at::empty({table_off + table_bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr<uint8_t>(), plan.meta.data(), meta_bytes);
  if (table_bytes > 0) std::memcpy(host.data_ptr<uint8_t>() + table_off, plan.table.data(), table_bytes);
  // The caching host allocator keeps `host` alive until the copy is done.
  const at::Tensor dev = host.to(at::TensorOptions().device(plan.device), /*non_blocking=*/true);

  AdamwListArgs args{};
  args.grad_scale = plan.grad_scale.defined() ? plan.grad_scale.data_ptr<float>() : nullptr;
  args.found_inf = plan.found_inf.defined() ? plan.found_inf.data_ptr<float>() : nullptr;
  args.step_table = table_bytes > 0 ? reinterpret_cast<const float*>(dev.data_ptr<uint8_t>() + table_off) : nullptr;
  args.table_lo = plan.table_lo;
  args.table_len = static_cast<int64_t>(plan.table.size() / 2);
  const bool read_flag = plan.validated || sync_checks();
  at::Tensor err;
  if (read_flag) {
    err = at::zeros({2}, at::TensorOptions().dtype(at::kInt).device(plan.device));
    args.error = err.data_ptr<int>();
  }
  args.maximize = maximize;
  args.compact_grads = compact_grads;
  check_ok(masked_adamw(plan.dtype, reinterpret_cast<const AdamwTensorMeta*>(dev.data_ptr<uint8_t>()),
                        static_cast<int>(plan.meta.size()), plan.total_chunks, amsgrad, args,
                        at::cuda::getCurrentCUDAStream()));
  if (!read_flag) return;
  const at::Tensor err_h = err.cpu();  // synchronises
  const int* e = err_h.data_ptr<int>();
  TORCH_CHECK(e[0] == 0, "masked_adamw_: internal error: the kernel found ", e[0], " chunk(s) whose chunk_offsets do "
              "not match mask_bits after the host check passed (a tensor changed behind its version counter?); the "
              "state may be partially updated");
  TORCH_CHECK(e[1] == 0, "masked_adamw_: internal error: the kernel found ", e[1], " step_offsets outside [0, step) "
              "after the host check passed; the state may be partially updated");
}

void masked_adamw_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                       at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
                       at::TensorList mask_bits, at::TensorList chunk_offsets, at::TensorList step_offsets,
                       double lr, double beta1, double beta2, double weight_decay, double eps, bool amsgrad,
                       bool maximize, c10::string_view weight_decay_mode, const c10::optional<at::Tensor>& grad_scale,
                       const c10::optional<at::Tensor>& found_inf, int64_t torch_tail, bool compact_grads) {
  masked_adamw_master_cuda(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, mask_bits,
                           chunk_offsets, step_offsets, {}, lr, beta1, beta2, weight_decay, eps, amsgrad, maximize,
                           weight_decay_mode, grad_scale, found_inf, torch_tail, compact_grads, {});
}
// ---- end masked_adamw_ ----------------------------------------------------------------------------

// ---- gather_masked_ (compact gradients) -----------------------------------------------------------
// One launch (csrc/cuda/gather_masked.cu). The directory is checked against the bits and out's size
// on the host first (host::plan_gather_masked, cached per (bits, directory): one synchronisation the
// first time a mask is seen, as masked_adamw_); the kernel never writes outside out or a chunk's
// directory range whatever the directory says.
void gather_masked_cuda(at::Tensor& out, const at::Tensor& src, const at::Tensor& bits,
                        const at::Tensor& chunk_offsets, bool accumulate) {
  c10::cuda::OptionalCUDAGuard guard;
  if (src.defined() && src.is_cuda()) guard.set_device(src.device());
  host::plan_gather_masked(out, src, bits, chunk_offsets, c10::kCUDA, nullptr);
  const int64_t n = src.numel();
  if (n == 0) return;
  check_ok(gather_masked(dtype_code(src, "gather_masked_: src"), src.data_ptr(), n, bits.data_ptr<uint8_t>(),
                         chunk_offsets.data_ptr<int64_t>(), out.data_ptr<float>(), out.numel(), accumulate,
                         at::cuda::getCurrentCUDAStream()));
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
  m.impl("masked_adamw_master_", &wagle::cuda::masked_adamw_master_cuda);
  m.impl("gather_masked_", &wagle::cuda::gather_masked_cuda);
}
