// Host-only build of the CUDA bindings' checks (csrc/cuda/host_plan.h) for tests/test_cuda_contract.py:
// no CUDA header, no kernel. Each op here has the schema of its wagle op (csrc/ops.cpp) and runs
// exactly the host::plan_* function the CUDA binding (csrc/cuda/bindings.cpp) runs before a launch,
// with the CPU as the op's device type, then returns what the plan computed instead of launching.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "cuda/host_plan.h"

namespace {
using namespace wagle::cuda;

std::vector<int64_t> attribution_score_out(const at::Tensor& weight, const c10::optional<at::Tensor>& grad_forget,
                                           const c10::optional<at::Tensor>& grad_retain,
                                           const c10::optional<at::Tensor>& hessian, c10::string_view kind,
                                           double /*gamma*/, double /*eps*/, const at::Tensor& out,
                                           const at::Tensor& hist) {
  const host::ScorePlan p =
      host::plan_attribution_score(weight, grad_forget, grad_retain, hessian, kind, out, hist, c10::kCPU);
  return {p.in.kind, p.w_dtype, p.g_dtype, p.in.want_hist ? 1 : 0, p.n};
}

int64_t radix_histogram(at::TensorList scores, int64_t prefix, int64_t prefix_bits) {
  return static_cast<int64_t>(host::plan_radix_histogram(scores, prefix, prefix_bits, c10::kCPU).size());
}

int64_t count_key(at::TensorList scores, int64_t key) {
  uint32_t k = 0;
  return static_cast<int64_t>(host::plan_count_key(scores, key, &k, c10::kCPU).size());
}

int64_t topk_mask_bits(at::TensorList scores, int64_t threshold_key, bool /*largest*/, at::IntArrayRef ties_take) {
  uint32_t thr = 0;
  return static_cast<int64_t>(host::plan_topk_mask_bits(scores, threshold_key, ties_take, &thr, c10::kCPU).size());
}

void pack_bits(const at::Tensor& mask) { host::plan_pack_bits(mask, c10::kCPU); }
void unpack_bits(const at::Tensor& bits, int64_t numel) { host::plan_bits(bits, numel, "unpack_bits", c10::kCPU); }
void popcount_bits(const at::Tensor& bits, int64_t numel) { host::plan_bits(bits, numel, "popcount_bits", c10::kCPU); }

// [tensors with work, total chunks, table_lo, table rows, validated (a device read happened)]
std::vector<int64_t> masked_adamw_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                   at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                                   at::TensorList state_steps, at::TensorList mask_bits, at::TensorList chunk_offsets,
                                   at::TensorList step_offsets, double lr, double beta1, double beta2,
                                   double weight_decay, double eps, bool amsgrad, bool /*maximize*/,
                                   c10::string_view weight_decay_mode, const c10::optional<at::Tensor>& grad_scale,
                                   const c10::optional<at::Tensor>& found_inf, int64_t torch_tail,
                                   bool compact_grads) {
  const host::AdamwPlan p = host::plan_masked_adamw(
      params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, mask_bits, chunk_offsets, step_offsets, lr,
      beta1, beta2, weight_decay, eps, amsgrad, weight_decay_mode, grad_scale, found_inf, torch_tail, compact_grads,
      c10::kCPU);
  return {static_cast<int64_t>(p.meta.size()), p.total_chunks, p.table_lo, static_cast<int64_t>(p.table.size() / 2),
          p.validated ? 1 : 0};
}

// masked_adamw_master_: the same plan with master weights; [... as masked_adamw_, rounding mode,
// sr_key of the first tensor with work (low 63 bits, 0 without stochastic rounding)].
std::vector<int64_t> masked_adamw_master_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                          at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                                          at::TensorList state_steps, at::TensorList mask_bits,
                                          at::TensorList chunk_offsets, at::TensorList step_offsets,
                                          at::TensorList master_weights, double lr, double beta1, double beta2,
                                          double weight_decay, double eps, bool amsgrad, bool /*maximize*/,
                                          c10::string_view weight_decay_mode,
                                          const c10::optional<at::Tensor>& grad_scale,
                                          const c10::optional<at::Tensor>& found_inf, int64_t torch_tail,
                                          bool compact_grads, at::IntArrayRef rounding_seeds) {
  const host::AdamwPlan p = host::plan_masked_adamw(
      params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, mask_bits, chunk_offsets, step_offsets, lr,
      beta1, beta2, weight_decay, eps, amsgrad, weight_decay_mode, grad_scale, found_inf, torch_tail, compact_grads,
      c10::kCPU, master_weights, rounding_seeds);
  const int64_t key = p.meta.empty() ? 0 : static_cast<int64_t>(p.meta[0].sr_key >> 1);
  return {static_cast<int64_t>(p.meta.size()), p.total_chunks, p.table_lo, static_cast<int64_t>(p.table.size() / 2),
          p.validated ? 1 : 0, p.rounding, key};
}

int64_t gather_masked_(const at::Tensor& out, const at::Tensor& src, const at::Tensor& bits,
                       const at::Tensor& chunk_offsets, bool /*accumulate*/) {
  bool validated = false;
  host::plan_gather_masked(out, src, bits, chunk_offsets, c10::kCPU, &validated);
  return validated ? 1 : 0;
}

// The cached per-step rows against adamw_coeffs() itself: [lo, hi] rows as float32[rows, 2].
at::Tensor step_table(double lr, double beta1, double beta2, int64_t lo, int64_t hi) {
  const std::vector<float> rows = host::step_table_cache().rows(lr, beta1, beta2, lo, hi);
  return at::tensor(at::ArrayRef<float>(rows)).view({-1, 2});
}

at::Tensor adamw_coeff_rows(double lr, double beta1, double beta2, int64_t lo, int64_t hi) {
  std::vector<float> rows;
  for (int64_t s = lo; s <= hi; ++s) {
    const wagle::AdamwCoeffs c = wagle::adamw_coeffs(lr, beta1, beta2, 0.0, 1e-8, static_cast<double>(s));
    rows.push_back(c.neg_step_size);
    rows.push_back(c.bc2_sqrt);
  }
  return at::tensor(at::ArrayRef<float>(rows)).view({-1, 2});
}

int64_t table_rebuilds() { return host::step_table_cache().rebuilds(); }
int64_t cache_size() { return static_cast<int64_t>(host::validation_cache().size()); }
void cache_clear() { host::validation_cache().clear(); }
}  // namespace

TORCH_LIBRARY(wagle_cuda_contract, m) {
  m.def("attribution_score_out(Tensor weight, Tensor? grad_forget, Tensor? grad_retain, Tensor? hessian, str kind, "
        "float gamma, float eps, Tensor out, Tensor hist) -> int[]",
        &attribution_score_out);
  m.def("radix_histogram(Tensor[] scores, int prefix, int prefix_bits) -> int", &radix_histogram);
  m.def("count_key(Tensor[] scores, int key) -> int", &count_key);
  m.def("topk_mask_bits(Tensor[] scores, int threshold_key, bool largest, int[] ties_take) -> int", &topk_mask_bits);
  m.def("pack_bits(Tensor mask) -> ()", &pack_bits);
  m.def("unpack_bits(Tensor bits, int numel) -> ()", &unpack_bits);
  m.def("popcount_bits(Tensor bits, int numel) -> ()", &popcount_bits);
  m.def("masked_adamw(Tensor[] params, Tensor[] grads, Tensor[] exp_avgs, Tensor[] exp_avg_sqs, "
        "Tensor[] max_exp_avg_sqs, Tensor[] state_steps, Tensor[] mask_bits, Tensor[] chunk_offsets, "
        "Tensor[] step_offsets, *, float lr, float beta1, float beta2, float weight_decay, float eps, bool amsgrad, "
        "bool maximize, str weight_decay_mode, Tensor? grad_scale=None, Tensor? found_inf=None, int torch_tail=8, "
        "bool compact_grads=False) -> int[]",
        &masked_adamw_);
  m.def("masked_adamw_master(Tensor[] params, Tensor[] grads, Tensor[] exp_avgs, Tensor[] exp_avg_sqs, "
        "Tensor[] max_exp_avg_sqs, Tensor[] state_steps, Tensor[] mask_bits, Tensor[] chunk_offsets, "
        "Tensor[] step_offsets, Tensor[] master_weights, *, float lr, float beta1, float beta2, float weight_decay, "
        "float eps, bool amsgrad, bool maximize, str weight_decay_mode, Tensor? grad_scale=None, "
        "Tensor? found_inf=None, int torch_tail=8, bool compact_grads=False, int[] rounding_seeds=[]) -> int[]",
        &masked_adamw_master_);
  m.def("gather_masked(Tensor out, Tensor src, Tensor bits, Tensor chunk_offsets, bool accumulate) -> int",
        &gather_masked_);
  m.def("step_table(float lr, float beta1, float beta2, int lo, int hi) -> Tensor", &step_table);
  m.def("adamw_coeff_rows(float lr, float beta1, float beta2, int lo, int hi) -> Tensor", &adamw_coeff_rows);
  m.def("table_rebuilds() -> int", &table_rebuilds);
  m.def("cache_size() -> int", &cache_size);
  m.def("cache_clear() -> ()", &cache_clear);
}
