// Argument checks of the wagle ops, shared by the CPU kernels (csrc/cpu/*.cpp) and the CUDA
// bindings (csrc/cuda/bindings.cpp), so both devices accept and refuse exactly the same calls.
// wagle_ext.ops validates first and raises clear Python errors; these are the last line of
// defence for direct torch.ops.wagle.* callers, so a bad call never reaches a raw pointer.
//
// Every check takes the device the op runs on; tensors must be there (small scalar tensors may
// also be on the CPU where noted). Values that live in device memory (directory entries on CUDA)
// cannot be read here without a synchronisation: check_directory() runs where the directory is
// host memory, and the CUDA kernels verify the directory themselves (docs/conventions.md).
// Only ATen headers: no CUDA, so the CPU build and the CPU-only syntax check compile it.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <string>
#include <vector>

#include "common/adamw_math.h"
#include "common/layout.h"
#include "common/rounding_math.h"
#include "common/score_math.h"
#include "common/select_math.h"

namespace wagle {
namespace checks {

// ---- generic ------------------------------------------------------------------------------------
inline void check_on(const at::Tensor& t, const std::string& name, const at::Device& device) {
  TORCH_CHECK_VALUE(t.defined(), name, " is undefined");
  TORCH_CHECK_VALUE(t.device() == device, name, " is on ", t.device(), " but the op runs on ", device);
}

// A float32 / bfloat16 / float16 tensor on `device`.
inline void check_float(const at::Tensor& t, const std::string& name, const at::Device& device) {
  TORCH_CHECK_VALUE(t.defined(), name, " is undefined");
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16 ||
                       t.scalar_type() == at::kHalf,
                   name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  check_on(t, name, device);
}

// A one-element tensor on `device` or on the CPU (a step count, grad_scale, found_inf).
inline void check_scalar(const at::Tensor& t, const std::string& name, const at::Device& device) {
  TORCH_CHECK_VALUE(t.defined() && t.numel() == 1 && (t.device() == device || t.device().is_cpu()), name,
                    " must be a one-element tensor on ", device, device.is_cpu() ? "" : " or on the CPU");
}

// ---- attribution_score ----------------------------------------------------------------------------
inline int parse_score_kind(c10::string_view kind) {
  if (kind == "wagle") return kScoreWagle;
  if (kind == "wagle_hessian") return kScoreWagleHessian;
  if (kind == "snip") return kScoreSnip;
  if (kind == "gradient") return kScoreGradient;
  if (kind == "magnitude") return kScoreMagnitude;
  TORCH_CHECK_VALUE(false, "attribution_score: unknown kind '", std::string(kind),
                    "' (expected wagle, wagle_hessian, snip, gradient or magnitude)");
  return kScoreWagle;
}

// The inputs of one attribution_score_out call, checked and made contiguous. g_f, g_r and h share
// one dtype in the kernels: mixed dtypes (rare: accumulators are normally all fp32) are widened to
// fp32, which is exact, so results still equal the reference.
struct ScoreInputs {
  int kind;
  bool want_hist;  // an empty `hist` means scores only: the histogram work is skipped
  at::Tensor w, gf, gr, h;  // undefined when the kind does not read them
  at::ScalarType grad_dtype;
};

inline ScoreInputs score_inputs(const at::Tensor& weight, const c10::optional<at::Tensor>& grad_forget,
                                const c10::optional<at::Tensor>& grad_retain,
                                const c10::optional<at::Tensor>& hessian, c10::string_view kind_s,
                                const at::Tensor& out, const at::Tensor& hist) {
  ScoreInputs r{};
  r.kind = parse_score_kind(kind_s);
  check_float(weight, "weight", weight.device());
  const at::Device device = weight.device();
  const int64_t n = weight.numel();
  check_on(out, "out", device);
  TORCH_CHECK_VALUE(out.scalar_type() == at::kFloat && out.is_contiguous() && out.numel() == n,
                    "attribution_score_out: out must be a contiguous float32 tensor with ", n, " elements");
  check_on(hist, "hist", device);
  r.want_hist = hist.numel() != 0;
  TORCH_CHECK_VALUE(!r.want_hist || (hist.scalar_type() == at::kLong && hist.is_contiguous() &&
                                     hist.numel() == kHistSize),
                    "hist must be a contiguous int64 tensor with ", kHistSize,
                    " entries, or empty (scores only)");
  const bool need_gf = r.kind != kScoreMagnitude;
  const bool need_w = r.kind != kScoreGradient;
  const bool need_gr = r.kind == kScoreWagle || r.kind == kScoreWagleHessian;
  const bool need_h = r.kind == kScoreWagleHessian;
  auto grad_like = [&](const c10::optional<at::Tensor>& t, const char* name, bool needed) {
    if (!needed) return at::Tensor();
    TORCH_CHECK_VALUE(t.has_value() && t->defined(), "attribution_score: kind '", std::string(kind_s),
                      "' needs ", name);
    check_float(*t, name, device);
    TORCH_CHECK_VALUE(t->numel() == n, "attribution_score: ", name, " has ", t->numel(),
                      " elements, weight has ", n);
    return t->contiguous();
  };
  r.w = need_w ? weight.contiguous() : at::Tensor();
  r.gf = grad_like(grad_forget, "grad_forget", need_gf);
  r.gr = grad_like(grad_retain, "grad_retain", need_gr);
  r.h = grad_like(hessian, "hessian", need_h);
  r.grad_dtype = r.gf.defined() ? r.gf.scalar_type() : (r.gr.defined() ? r.gr.scalar_type() : at::kFloat);
  const bool mixed = (r.gr.defined() && r.gr.scalar_type() != r.grad_dtype) ||
                     (r.h.defined() && r.h.scalar_type() != r.grad_dtype);
  if (mixed) {
    r.grad_dtype = at::kFloat;
    if (r.gf.defined()) r.gf = r.gf.to(at::kFloat);
    if (r.gr.defined()) r.gr = r.gr.to(at::kFloat);
    if (r.h.defined()) r.h = r.h.to(at::kFloat);
  }
  return r;
}

// ---- selection primitives ---------------------------------------------------------------------------
// The score tensors of a list op, contiguous, each float on `device`.
inline std::vector<at::Tensor> score_list(at::TensorList scores, const char* op, const at::Device& device) {
  std::vector<at::Tensor> ts;
  ts.reserve(scores.size());
  for (size_t i = 0; i < scores.size(); ++i) {
    check_float(scores[i], std::string(op) + ": scores[" + std::to_string(i) + "]", device);
    ts.push_back(scores[i].contiguous());
  }
  return ts;
}

// `allow_zero`: radix_histogram takes prefix_bits 0 (the first level); topk_mask_collect does not.
inline void check_prefix(int64_t prefix, int64_t prefix_bits, const char* op, bool allow_zero) {
  if (allow_zero) {
    TORCH_CHECK_VALUE(valid_prefix_bits(prefix_bits), op, ": prefix_bits must be 0, 11 or 22, got ", prefix_bits);
  } else {
    TORCH_CHECK_VALUE(prefix_bits == 11 || prefix_bits == 22, op, ": prefix_bits must be 11 or 22, got ",
                      prefix_bits);
  }
  TORCH_CHECK_VALUE(prefix >= 0 && prefix < (int64_t(1) << prefix_bits), op, ": prefix ", prefix,
                    " does not fit in prefix_bits=", prefix_bits);
}

inline uint32_t key_arg(int64_t key, const char* op, const char* name) {
  TORCH_CHECK_VALUE(key >= 0 && key <= int64_t(0xFFFFFFFF), op, ": ", name,
                    " must be a uint32 key in [0, 2^32), got ", key);
  return static_cast<uint32_t>(key);
}

inline void check_ties_take(at::IntArrayRef ties_take, size_t num_scores) {
  TORCH_CHECK_VALUE(ties_take.size() == num_scores, "topk_mask_bits: ties_take has ", ties_take.size(),
                    " entries but scores has ", num_scores, " tensors");
  for (size_t i = 0; i < ties_take.size(); ++i)
    TORCH_CHECK_VALUE(ties_take[i] >= -1, "topk_mask_bits: ties_take[", i, "] must be >= -1, got ", ties_take[i]);
}

// ---- bit arrays -----------------------------------------------------------------------------------
inline void check_bool_mask(const at::Tensor& mask, const at::Device& device) {
  TORCH_CHECK_VALUE(mask.defined(), "pack_bits: mask is undefined");
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool, "pack_bits: mask must be bool, got ", mask.scalar_type());
  check_on(mask, "pack_bits: mask", device);
}

inline void check_bits(const at::Tensor& bits, int64_t numel, const char* op, const at::Device& device) {
  TORCH_CHECK_VALUE(bits.defined(), op, ": bits is undefined");
  TORCH_CHECK_TYPE(bits.scalar_type() == at::kByte, op, ": bits must be uint8, got ", bits.scalar_type());
  check_on(bits, std::string(op) + ": bits", device);
  TORCH_CHECK_VALUE(numel >= 0, op, ": numel must be >= 0, got ", numel);
  TORCH_CHECK_VALUE(numel <= bits.numel() * 8, op, ": ", bits.numel(), " bytes cannot hold ", numel, " bits");
}

// ---- mask layout: bits + directory (masked_adamw_, gather_masked_) ------------------------------------
// `what` names the pair in messages, e.g. "masked_adamw_: mask_bits[3]". Checks types and sizes.
inline void check_mask_layout(const at::Tensor& bits, const at::Tensor& dir, int64_t n, const std::string& bits_name,
                              const std::string& dir_name, const at::Device& device) {
  check_on(bits, bits_name, device);
  check_on(dir, dir_name, device);
  TORCH_CHECK_VALUE(bits.scalar_type() == at::kByte && bits.is_contiguous() && bits.numel() == bit_bytes(n),
                    bits_name, " must be a contiguous uint8 tensor with ", bit_bytes(n), " bytes for ", n,
                    " elements, got ", bits.scalar_type(), "[", bits.numel(), "]");
  TORCH_CHECK_VALUE(dir.scalar_type() == at::kLong && dir.is_contiguous() && dir.numel() == dir_chunks(n) + 1,
                    dir_name, " must be a contiguous int64 tensor with ", dir_chunks(n) + 1, " entries (one per ",
                    kDirChunk, " elements, plus the total), got ", dir.scalar_type(), "[", dir.numel(), "]");
}

// The values of a directory in host memory: starts at 0, never decreases, at most kDirChunk per
// chunk. Returns nnz (the last entry).
inline int64_t check_directory(const int64_t* d, int64_t nchunks, const std::string& dir_name) {
  TORCH_CHECK_VALUE(d[0] == 0, dir_name, "[0] must be 0");
  for (int64_t c = 0; c < nchunks; ++c)
    TORCH_CHECK_VALUE(d[c + 1] >= d[c] && d[c + 1] - d[c] <= kDirChunk, dir_name,
                      " is not a valid directory (entry ", c + 1, ")");
  return d[nchunks];
}

// ---- masked_adamw_ ---------------------------------------------------------------------------------
inline int parse_weight_decay_mode(c10::string_view mode) {
  if (mode == "masked") return kDecayMasked;
  if (mode == "all") return kDecayAll;
  if (mode == "none") return kDecayNone;
  TORCH_CHECK_VALUE(false, "masked_adamw_: weight_decay_mode must be 'masked', 'all' or 'none', got '",
                    std::string(mode), "'");
  return kDecayMasked;
}

inline void check_adamw_lists(size_t nt, size_t grads, size_t exp_avgs, size_t exp_avg_sqs, size_t max_exp_avg_sqs,
                              size_t state_steps, size_t mask_bits, size_t chunk_offsets, size_t step_offsets,
                              bool amsgrad, int64_t torch_tail) {
  TORCH_CHECK_VALUE(grads == nt && exp_avgs == nt && exp_avg_sqs == nt && state_steps == nt && mask_bits == nt &&
                        chunk_offsets == nt && step_offsets == nt,
                    "masked_adamw_: every tensor list must have ", nt, " entries (one per param)");
  TORCH_CHECK_VALUE(amsgrad ? max_exp_avg_sqs == nt : max_exp_avg_sqs == 0,
                    "masked_adamw_: max_exp_avg_sqs must have one tensor per param with amsgrad and be empty without");
  TORCH_CHECK_VALUE(torch_tail >= 0, "masked_adamw_: torch_tail must be >= 0");
}

inline at::ScalarType adamw_param_dtype(const at::Tensor& p0) {
  TORCH_CHECK_VALUE(p0.defined(), "masked_adamw_: params[0] is undefined");
  const at::ScalarType dt = p0.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
                   "masked_adamw_: params must be float32, bfloat16 or float16, got ", dt);
  return dt;
}

// masked_adamw_master_: master_weights is empty (no master copy: masked_adamw_) or has one compact
// fp32 tensor per param (checked with check_state as "master_weights"), for bfloat16/float16 params
// only (an fp32 param is its own master); rounding_seeds is empty (round to nearest even) or has
// one seed per param (stochastic rounding; needs master_weights). Returns the Rounding mode.
inline int check_master_lists(size_t nt, size_t master_weights, size_t rounding_seeds, const at::Tensor& p0) {
  TORCH_CHECK_VALUE(master_weights == 0 || master_weights == nt, "masked_adamw_master_: master_weights must have ", nt,
                    " entries (one per param) or none, got ", master_weights);
  TORCH_CHECK_VALUE(rounding_seeds == 0 || (rounding_seeds == nt && master_weights == nt),
                    "masked_adamw_master_: rounding_seeds must be empty (round to nearest even) or have one seed per "
                    "param together with master_weights, got ", rounding_seeds, " seeds and ", master_weights,
                    " master tensors for ", nt, " params");
  if (master_weights == 0 || nt == 0) return kRoundNoMaster;
  TORCH_CHECK_TYPE(p0.defined() && (p0.scalar_type() == at::kBFloat16 || p0.scalar_type() == at::kHalf),
                   "masked_adamw_master_: master weights are for bfloat16/float16 params, got ",
                   p0.defined() ? c10::toString(p0.scalar_type()) : "an undefined tensor");
  return rounding_seeds == 0 ? kRoundNearest : kRoundStochastic;
}

// params[i] and grads[i]: dtypes (one call per dtype; compact grads are float32), device, contiguity.
// Sizes of compact grads are checked against nnz by the caller (check_grad_numel).
inline void check_param_grad(const at::Tensor& p, const at::Tensor& g, at::ScalarType dt, bool compact_grads,
                             size_t i, const at::Device& device) {
  check_on(p, "masked_adamw_: params[" + std::to_string(i) + "]", device);
  check_on(g, "masked_adamw_: grads[" + std::to_string(i) + "]", device);
  const at::ScalarType gdt = compact_grads ? at::kFloat : dt;
  TORCH_CHECK_TYPE(p.scalar_type() == dt && g.scalar_type() == gdt, "masked_adamw_: params[", i, "] must be ", dt,
                   " and grads[", i, "] ", gdt, ", got ", p.scalar_type(), " and ", g.scalar_type(),
                   " (one call per dtype; compact grads are float32)");
  TORCH_CHECK_VALUE(p.is_contiguous() && g.is_contiguous(), "masked_adamw_: params[", i, "] and grads[", i,
                    "] must be contiguous");
  TORCH_CHECK_VALUE(compact_grads || g.numel() == p.numel(), "masked_adamw_: grads[", i, "] has ", g.numel(),
                    " elements, params[", i, "] has ", p.numel());
}

inline void check_compact_grad_numel(const at::Tensor& g, int64_t nnz, size_t i) {
  TORCH_CHECK_VALUE(g.numel() == nnz, "masked_adamw_: grads[", i, "] has ", g.numel(),
                    " elements, compact grads need one per selected element (", nnz, ")");
}

// exp_avgs[i] / exp_avg_sqs[i] / max_exp_avg_sqs[i]: contiguous float32[nnz] on the device.
inline void check_state(const at::Tensor& t, int64_t nnz, const char* name, size_t i, const at::Device& device) {
  check_on(t, std::string("masked_adamw_: ") + name + "[" + std::to_string(i) + "]", device);
  TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == nnz, "masked_adamw_: ", name,
                    "[", i, "] must be a contiguous float32 tensor with ", nnz,
                    " elements (one per selected element), got ", t.scalar_type(), " with ", t.numel());
}

// step_offsets[i]: empty, or contiguous int32[nnz] on the device.
inline bool check_step_offsets(const at::Tensor& offs, int64_t nnz, size_t i, const at::Device& device) {
  if (offs.numel() == 0) return false;
  check_on(offs, "masked_adamw_: step_offsets[" + std::to_string(i) + "]", device);
  TORCH_CHECK_VALUE(offs.scalar_type() == at::kInt && offs.is_contiguous() && offs.numel() == nnz,
                    "masked_adamw_: step_offsets[", i, "] must be a contiguous int32 tensor with ", nnz,
                    " entries, or empty");
  return true;
}

// The values of step_offsets[i] in host memory: each in [0, step), so every element's own step count
// `step - offset` is >= 1 (the CUDA and Triton kernels flag the same condition on the device).
// Each tensor against ITS OWN step, never the largest step of the list.
inline void check_step_offset_values(const int32_t* offs, int64_t nnz, double step, size_t i) {
  int64_t bad = 0;
  for (int64_t k = 0; k < nnz; ++k) bad += (offs[k] < 0 || static_cast<double>(offs[k]) >= step) ? 1 : 0;
  TORCH_CHECK_VALUE(bad == 0, "masked_adamw_: ", bad, " step_offsets[", i, "] entries are outside [0, step) (step ",
                    step, ")");
}

// The same condition from the range [lo, hi] of step_offsets[i] (nnz > 0), for callers that keep
// the range and not the values (the CUDA bindings read it from the device once per offsets tensor).
inline void check_step_offset_range(int64_t lo, int64_t hi, double step, size_t i) {
  TORCH_CHECK_VALUE(lo >= 0 && static_cast<double>(hi) < step, "masked_adamw_: step_offsets[", i,
                    "] entries are outside [0, step) (range [", lo, ", ", hi, "], step ", step, ")");
}

// ---- gather_masked_ --------------------------------------------------------------------------------
// Everything but the directory's values and out's size (nnz = dir[last], host memory on CPU only).
inline void check_gather(const at::Tensor& out, const at::Tensor& src, const at::Tensor& bits,
                         const at::Tensor& chunk_offsets, const at::Device& device) {
  TORCH_CHECK_VALUE(src.defined(), "gather_masked_: src is undefined");
  const at::ScalarType dt = src.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
                   "gather_masked_: src must be float32, bfloat16 or float16, got ", dt);
  check_on(src, "gather_masked_: src", device);
  check_on(out, "gather_masked_: out", device);
  TORCH_CHECK_TYPE(out.scalar_type() == at::kFloat, "gather_masked_: out must be float32, got ", out.scalar_type());
  TORCH_CHECK_VALUE(out.is_contiguous(), "gather_masked_: out must be contiguous");
  TORCH_CHECK_VALUE(src.is_contiguous(), "gather_masked_: src must be contiguous");
  check_mask_layout(bits, chunk_offsets, src.numel(), "gather_masked_: bits", "gather_masked_: chunk_offsets", device);
}

}  // namespace checks
}  // namespace wagle
