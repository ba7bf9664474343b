// Host side of the CUDA bindings (csrc/cuda/bindings.cpp): every argument check and every value the
// launchers compute before a launch, written against ATen only -- no CUDA header, no stream, no
// kernel -- and parametrised by the device type the op runs on. bindings.cpp calls these with
// c10::kCUDA and then launches; tests/test_cuda_contract.py compiles this header with g++ against
// a CPU torch and calls the same functions with c10::kCPU on the argument forms wagle_ext.ops
// sends, so a CUDA-only validation drift (issue 20: findings 1, 4, 6) fails a test on machines
// without a GPU.
//
// Values that live in device memory (directory entries, step offsets) are validated here on the
// host, BEFORE the kernel runs, so a bad call raises with the state untouched -- like the CPU op.
// Reading them costs one device->host copy (a synchronisation), so each result is cached per
// tensor (ValidationCache: the TensorImpl, its version counter and data pointer) and a steady
// training loop that passes the same masks, directories and offsets every step validates once.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <c10/util/intrusive_ptr.h>

#include <algorithm>
#include <cstring>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "common/adamw_math.h"
#include "common/checks.h"
#include "common/layout.h"
#include "common/score_math.h"
#include "cuda/kernel_args.h"

namespace wagle {
namespace cuda {
namespace host {

inline int dtype_code(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return kF32;
    case at::kBFloat16: return kBF16;
    case at::kHalf: return kF16;
    default:
      TORCH_CHECK_TYPE(false, name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
  return kF32;
}

// The device of an op's first tensor, which must be of the binding's device type.
inline at::Device op_device(const at::Tensor& t, c10::DeviceType want, const std::string& what) {
  TORCH_CHECK_VALUE(t.defined() && t.device().type() == want, what, " must be a ", c10::DeviceTypeName(want),
                    " tensor for the ", c10::DeviceTypeName(want), " kernel");
  return t.device();
}

// ---- validated-value cache --------------------------------------------------------------------------
// Results of host-side validations of device tensors, keyed by TensorImpl. An entry holds a weak
// reference to the TensorImpl, so its address cannot be reused by another tensor while the entry
// lives; the version counter (bumped by every in-place op) and the data pointer must still match.
// Inference tensors have no version counter: they are validated on every call.
class ValidationCache {
 public:
  struct Value {
    int64_t a = 0, b = 0;
  };

  bool find(const at::Tensor& t, const at::Tensor* partner, Value* out) {
    if (!cacheable(t) || (partner != nullptr && !cacheable(*partner))) return false;
    std::lock_guard<std::mutex> lock(mu_);
    auto it = map_.find(t.unsafeGetTensorImpl());
    if (it == map_.end()) return false;
    const Entry& e = it->second;
    if (!e.self.matches(t)) return false;
    if ((partner != nullptr) != e.has_partner || (partner != nullptr && !e.partner.matches(*partner))) return false;
    *out = e.value;
    return true;
  }

  void store(const at::Tensor& t, const at::Tensor* partner, Value v) {
    if (!cacheable(t) || (partner != nullptr && !cacheable(*partner))) return;
    std::lock_guard<std::mutex> lock(mu_);
    if (map_.size() >= kMaxEntries) evict();
    Entry e{Stamp(t), partner != nullptr ? Stamp(*partner) : Stamp(), partner != nullptr, v};
    map_[t.unsafeGetTensorImpl()] = std::move(e);
  }

  size_t size() {
    std::lock_guard<std::mutex> lock(mu_);
    return map_.size();
  }

  void clear() {
    std::lock_guard<std::mutex> lock(mu_);
    map_.clear();
  }

 private:
  static constexpr size_t kMaxEntries = 4096;
  using WeakImpl = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;

  struct Stamp {
    WeakImpl weak{c10::intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>()};
    int64_t version = -1;
    const void* data = nullptr;
    int64_t numel = -1;
    Stamp() = default;
    explicit Stamp(const at::Tensor& t)
        : weak(t.getIntrusivePtr()), version(static_cast<int64_t>(t._version())), data(t.data_ptr()),
          numel(t.numel()) {}
    bool matches(const at::Tensor& t) const {
      return !weak.expired() && weak._unsafe_get_target() == t.unsafeGetTensorImpl() &&
             version == static_cast<int64_t>(t._version()) && data == t.data_ptr() && numel == t.numel();
    }
  };

  struct Entry {
    Stamp self, partner;
    bool has_partner = false;
    Value value;
  };

  static bool cacheable(const at::Tensor& t) { return t.defined() && !t.is_inference(); }

  void evict() {  // drop entries of freed tensors; all of them if that is not enough
    for (auto it = map_.begin(); it != map_.end();) {
      if (it->second.self.weak.expired() || (it->second.has_partner && it->second.partner.weak.expired()))
        it = map_.erase(it);
      else
        ++it;
    }
    if (map_.size() >= kMaxEntries / 2) map_.clear();
  }

  std::mutex mu_;
  std::unordered_map<const c10::TensorImpl*, Entry> map_;
};

inline ValidationCache& validation_cache() {
  static ValidationCache cache;
  return cache;
}

// Selected elements per directory chunk of a bit array over n elements (int64[dir_chunks(n)] on the
// bits' device; padding bits beyond n are not counted, as the kernels never trust them). Byte
// popcounts by SWAR on uint8 tensors: temporaries of n/8 bytes.
inline at::Tensor chunk_popcounts(const at::Tensor& bits, int64_t n) {
  const int64_t nchunks = dir_chunks(n);
  const int64_t nbytes = bit_bytes(n);
  at::Tensor b = bits;
  if (n % 8 != 0) {
    b = bits.clone();
    b.narrow(0, nbytes - 1, 1).bitwise_and_((1 << (n % 8)) - 1);
  }
  at::Tensor x = b - at::bitwise_and(at::bitwise_right_shift(b, 1), 0x55);
  x = at::bitwise_and(x, 0x33) + at::bitwise_and(at::bitwise_right_shift(x, 2), 0x33);
  x = at::bitwise_and(x + at::bitwise_right_shift(x, 4), 0x0F);
  const int64_t per_chunk = kDirChunk / 8;
  x = at::constant_pad_nd(x, {0, nchunks * per_chunk - nbytes}, 0);
  return x.view({nchunks, per_chunk}).sum(at::IntArrayRef{1}, /*keepdim=*/false, at::kLong);
}

// nnz of a (bits, directory) pair after the full check, cached: the layout (checks.h), dir[0] == 0,
// entries non-decreasing by at most kDirChunk (checks::check_directory, the CPU op's own check), and
// every chunk's count equal to the popcount of its bits. The first call for a pair copies the
// directory and the chunk counts to the host (one synchronisation); `*validated` is then set.
inline int64_t validated_nnz(const at::Tensor& bits, const at::Tensor& dir, int64_t n, const std::string& dir_name,
                             bool* validated) {
  ValidationCache& cache = validation_cache();
  ValidationCache::Value v;
  if (cache.find(dir, &bits, &v)) return v.a;
  const int64_t nchunks = dir_chunks(n);
  const at::Tensor host = at::cat({dir, chunk_popcounts(bits, n)}).to(at::kCPU);
  const int64_t* d = host.data_ptr<int64_t>();
  const int64_t nnz = checks::check_directory(d, nchunks, dir_name);
  const int64_t* counts = d + nchunks + 1;
  for (int64_t c = 0; c < nchunks; ++c)
    TORCH_CHECK_VALUE(d[c + 1] - d[c] == counts[c], dir_name, " do not match the mask bits in chunk ", c, " (",
                      d[c + 1] - d[c], " selected in the directory, ", counts[c],
                      " in the bits): rebuild the directory from the mask");
  v.a = nnz;
  cache.store(dir, &bits, v);
  if (validated != nullptr) *validated = true;
  return nnz;
}

// [min, max] of a non-empty int32 step_offsets tensor, cached (one synchronisation the first time).
inline std::pair<int64_t, int64_t> offsets_range(const at::Tensor& offs, bool* validated) {
  ValidationCache& cache = validation_cache();
  ValidationCache::Value v;
  if (cache.find(offs, nullptr, &v)) return {v.a, v.b};
  const auto mm = at::aminmax(offs);
  const at::Tensor host = at::stack({std::get<0>(mm), std::get<1>(mm)}).to(at::kLong).to(at::kCPU);
  v.a = host.data_ptr<int64_t>()[0];
  v.b = host.data_ptr<int64_t>()[1];
  cache.store(offs, nullptr, v);
  if (validated != nullptr) *validated = true;
  return {v.a, v.b};
}

// ---- per-step coefficient table (masked_adamw_ with step_offsets) ------------------------------------
// Element k of tensor i uses step s = step_i - offsets[k], s in [step_i - max_off_i, step_i - min_off_i]:
// the table holds only those rows (not every step since the start of training), and the two pow()
// per row are cached by (beta1, beta2) over a window that slides with the step, so a call computes
// one division per row (the lr may change every step with a scheduler).
class StepTableCache {
 public:
  // 2 floats per step s in [lo, hi]: (neg_step_size, bc2_sqrt), bit-identical to adamw_coeffs().
  std::vector<float> rows(double lr, double beta1, double beta2, int64_t lo, int64_t hi) {
    std::lock_guard<std::mutex> lock(mu_);
    const int64_t have_hi = lo_ + static_cast<int64_t>(bc1_.size()) - 1;
    if (beta1 != beta1_ || beta2 != beta2_ || lo < lo_ || hi > have_hi) {
      beta1_ = beta1;
      beta2_ = beta2;
      lo_ = lo;
      const int64_t len = hi - lo + 1 + kAhead;
      bc1_.resize(static_cast<size_t>(len));
      bc2s_.resize(static_cast<size_t>(len));
      for (int64_t r = 0; r < len; ++r) {
        bc1_[r] = adamw_bc1(beta1, static_cast<double>(lo + r));
        bc2s_[r] = adamw_bc2_sqrt(beta2, static_cast<double>(lo + r));
      }
      ++rebuilds_;
    }
    std::vector<float> out(static_cast<size_t>(2 * (hi - lo + 1)));
    for (int64_t s = lo; s <= hi; ++s) {
      out[2 * (s - lo)] = adamw_neg_step_size(lr, bc1_[s - lo_]);
      out[2 * (s - lo) + 1] = bc2s_[s - lo_];
    }
    return out;
  }

  int64_t rebuilds() {
    std::lock_guard<std::mutex> lock(mu_);
    return rebuilds_;
  }

 private:
  static constexpr int64_t kAhead = 256;  // rows computed beyond hi: the next steps hit the cache
  std::mutex mu_;
  double beta1_ = -1.0, beta2_ = -1.0;
  int64_t lo_ = 1;
  std::vector<double> bc1_;
  std::vector<float> bc2s_;
  int64_t rebuilds_ = 0;
};

inline StepTableCache& step_table_cache() {
  static StepTableCache cache;
  return cache;
}

// ---- attribution_score_out --------------------------------------------------------------------------
struct ScorePlan {
  checks::ScoreInputs in;
  int w_dtype = kF32, g_dtype = kF32;
  int64_t n = 0;
};

inline ScorePlan plan_attribution_score(const at::Tensor& weight, const c10::optional<at::Tensor>& grad_forget,
                                        const c10::optional<at::Tensor>& grad_retain,
                                        const c10::optional<at::Tensor>& hessian, c10::string_view kind,
                                        const at::Tensor& out, const at::Tensor& hist, c10::DeviceType want) {
  op_device(weight, want, "attribution_score: weight");
  ScorePlan p;
  p.in = checks::score_inputs(weight, grad_forget, grad_retain, hessian, kind, out, hist);
  p.w_dtype = dtype_code(weight, "weight");
  const at::ScalarType tg = p.in.grad_dtype;
  p.g_dtype = tg == at::kBFloat16 ? kBF16 : (tg == at::kHalf ? kF16 : kF32);
  p.n = weight.numel();
  return p;
}

// ---- selection primitives ---------------------------------------------------------------------------
// The device of a score list (the dispatcher cannot route an empty list to a device kernel); the
// contiguous tensors, every one checked.
inline std::vector<at::Tensor> plan_score_list(at::TensorList scores, const char* op, c10::DeviceType want) {
  TORCH_CHECK_VALUE(!scores.empty(), op, ": scores must not be empty");
  const at::Device device = op_device(scores[0], want, std::string(op) + ": scores[0]");
  return checks::score_list(scores, op, device);
}

inline std::vector<at::Tensor> plan_radix_histogram(at::TensorList scores, int64_t prefix, int64_t prefix_bits,
                                                    c10::DeviceType want) {
  std::vector<at::Tensor> ts = plan_score_list(scores, "radix_histogram", want);
  checks::check_prefix(prefix, prefix_bits, "radix_histogram", /*allow_zero=*/true);
  return ts;
}

inline std::vector<at::Tensor> plan_count_key(at::TensorList scores, int64_t key, uint32_t* k, c10::DeviceType want) {
  std::vector<at::Tensor> ts = plan_score_list(scores, "count_key", want);
  *k = checks::key_arg(key, "count_key", "key");
  return ts;
}

inline std::vector<at::Tensor> plan_topk_mask_bits(at::TensorList scores, int64_t threshold_key,
                                                   at::IntArrayRef ties_take, uint32_t* thr, c10::DeviceType want) {
  std::vector<at::Tensor> ts = plan_score_list(scores, "topk_mask_bits", want);
  *thr = checks::key_arg(threshold_key, "topk_mask_bits", "threshold_key");
  checks::check_ties_take(ties_take, scores.size());
  return ts;
}

// ---- bit arrays -------------------------------------------------------------------------------------
inline void plan_pack_bits(const at::Tensor& mask, c10::DeviceType want) {
  op_device(mask, want, "pack_bits: mask");
  checks::check_bool_mask(mask, mask.device());
}

inline void plan_bits(const at::Tensor& bits, int64_t numel, const char* op, c10::DeviceType want) {
  op_device(bits, want, std::string(op) + ": bits");
  checks::check_bits(bits, numel, op, bits.device());
}

// ---- masked_adamw_ ----------------------------------------------------------------------------------
struct AdamwPlan {
  at::Device device{at::kCPU};
  int dtype = kF32;
  std::vector<AdamwTensorMeta> meta;  // tensors with work only, chunk_begin increasing
  int64_t total_chunks = 0;
  int64_t table_lo = 0;               // step of the table's first row (tables empty without offsets)
  std::vector<float> table;           // 2 floats per step in [table_lo, table_lo + rows)
  at::Tensor grad_scale, found_inf;   // one-element float32 on the device, or undefined
  bool validated = false;             // a directory or offsets tensor was read back in this call
  int rounding = kRoundNoMaster;      // master weights of the call (common/rounding_math.h)
};

inline AdamwPlan plan_masked_adamw(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                   at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                                   at::TensorList state_steps, at::TensorList mask_bits,
                                   at::TensorList chunk_offsets, at::TensorList step_offsets, double lr, double beta1,
                                   double beta2, double weight_decay, double eps, bool amsgrad,
                                   c10::string_view weight_decay_mode, const c10::optional<at::Tensor>& grad_scale,
                                   const c10::optional<at::Tensor>& found_inf, int64_t torch_tail, bool compact_grads,
                                   c10::DeviceType want, at::TensorList master_weights = {},
                                   at::IntArrayRef rounding_seeds = {}) {
  AdamwPlan plan;
  const size_t nt = params.size();
  const int mode = checks::parse_weight_decay_mode(weight_decay_mode);
  checks::check_adamw_lists(nt, grads.size(), exp_avgs.size(), exp_avg_sqs.size(), max_exp_avg_sqs.size(),
                            state_steps.size(), mask_bits.size(), chunk_offsets.size(), step_offsets.size(), amsgrad,
                            torch_tail);
  // masked_adamw_master_: the same list rules as the CPU op (common/checks.h).
  const int rounding = checks::check_master_lists(nt, master_weights.size(), rounding_seeds.size(),
                                                  nt ? params[0] : at::Tensor());
  plan.rounding = rounding;
  if (nt == 0) return plan;
  const at::Device device = op_device(params[0], want, "masked_adamw_: params[0]");
  plan.device = device;
  const at::ScalarType param_dtype = checks::adamw_param_dtype(params[0]);
  plan.dtype = dtype_code(params[0], "params[0]");
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
      const at::Tensor host = at::cat(dev_steps).to(at::kCPU);
      const float* h = host.data_ptr<float>();
      for (size_t j = 0; j < dev_idx.size(); ++j) steps[dev_idx[j]] = static_cast<double>(h[j]);
    }
  }

  int64_t table_lo = INT64_MAX, table_hi = 0;  // steps the offsets reach, over all tensors
  for (size_t i = 0; i < nt; ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& g = grads[i];
    checks::check_param_grad(p, g, param_dtype, compact_grads, i, device);
    const int64_t n = p.numel();
    const at::Tensor& bits = mask_bits[i];
    const at::Tensor& dir = chunk_offsets[i];
    const int64_t nchunks = dir_chunks(n);
    const bool dense = bits.numel() == 0 && dir.numel() == 0;
    AdamwTensorMeta a{};
    int64_t nnz = n;
    if (!dense) {
      const std::string dir_name = "masked_adamw_: chunk_offsets[" + std::to_string(i) + "]";
      checks::check_mask_layout(bits, dir, n, "masked_adamw_: mask_bits[" + std::to_string(i) + "]", dir_name, device);
      nnz = validated_nnz(bits, dir, n, dir_name, &plan.validated);  // dir[0] == 0, dir == bits, nnz = dir[last]
      a.bits = bits.data_ptr<uint8_t>();
      a.dir = dir.data_ptr<int64_t>();
    }
    if (compact_grads) checks::check_compact_grad_numel(g, nnz, i);
    checks::check_state(exp_avgs[i], nnz, "exp_avgs", i, device);  // the state has exactly dir[last] entries
    checks::check_state(exp_avg_sqs[i], nnz, "exp_avg_sqs", i, device);
    if (amsgrad) checks::check_state(max_exp_avg_sqs[i], nnz, "max_exp_avg_sqs", i, device);
    a.rounding = rounding;
    if (rounding != kRoundNoMaster) {
      checks::check_state(master_weights[i], nnz, "master_weights", i, device);  // compact, like m
      a.mw = master_weights[i].data_ptr<float>();
      if (rounding == kRoundStochastic)
        a.sr_key = sr_key(static_cast<uint64_t>(rounding_seeds[i]), static_cast<int64_t>(steps[i]));
    }
    const at::Tensor& offs = step_offsets[i];
    if (checks::check_step_offsets(offs, nnz, i, device)) {
      TORCH_CHECK_VALUE(steps[i] >= 1.0 && steps[i] == static_cast<double>(static_cast<int64_t>(steps[i])) &&
                            steps[i] < 1e8,
                        "masked_adamw_: per-element step offsets need an integral step in [1, 1e8), got ", steps[i],
                        " for params[", i, "]");
      const auto range = offsets_range(offs, &plan.validated);
      checks::check_step_offset_range(range.first, range.second, steps[i], i);  // this tensor's own step
      a.offsets = offs.data_ptr<int32_t>();
      a.step_int = static_cast<int64_t>(steps[i]);
      table_lo = std::min(table_lo, a.step_int - range.second);
      table_hi = std::max(table_hi, a.step_int - range.first);
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
    a.chunk_begin = plan.total_chunks;
    plan.total_chunks += nchunks;
    plan.meta.push_back(a);
  }
  TORCH_CHECK_VALUE(plan.meta.size() <= static_cast<size_t>(0x7FFFFFFF), "masked_adamw_: too many tensors in one call");
  TORCH_CHECK_VALUE(plan.total_chunks <= 0x7FFFFFFFLL, "masked_adamw_: too many elements in one call");
  if (table_hi >= table_lo) {
    plan.table_lo = table_lo;
    plan.table = step_table_cache().rows(lr, beta1, beta2, table_lo, table_hi);
  }
  if (grad_scale.has_value() && grad_scale->defined()) {
    checks::check_scalar(*grad_scale, "masked_adamw_: grad_scale", device);
    plan.grad_scale = grad_scale->reshape({1}).to(device, at::kFloat);
  }
  if (found_inf.has_value() && found_inf->defined()) {
    checks::check_scalar(*found_inf, "masked_adamw_: found_inf", device);
    plan.found_inf = found_inf->reshape({1}).to(device, at::kFloat);
  }
  return plan;
}

// ---- gather_masked_ ---------------------------------------------------------------------------------
// Everything the CPU op checks, out.numel() == dir[last] included (validated_nnz: cached).
inline void plan_gather_masked(const at::Tensor& out, const at::Tensor& src, const at::Tensor& bits,
                               const at::Tensor& chunk_offsets, c10::DeviceType want, bool* validated) {
  const at::Device device = op_device(src, want, "gather_masked_: src");
  checks::check_gather(out, src, bits, chunk_offsets, device);
  const int64_t n = src.numel();
  TORCH_CHECK_VALUE(dir_chunks(n) <= 0x7FFFFFFFLL, "gather_masked_: src has too many elements (", n, ")");
  const int64_t nnz = validated_nnz(bits, chunk_offsets, n, "gather_masked_: chunk_offsets", validated);
  TORCH_CHECK_VALUE(out.numel() == nnz, "gather_masked_: out must be a contiguous float32 tensor with ", nnz,
                    " entries (the mask's popcount), got ", out.numel());
}

}  // namespace host
}  // namespace cuda
}  // namespace wagle
