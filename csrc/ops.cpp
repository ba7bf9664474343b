// Every op schema of the `wagle` library, in one place (pytorch/extension-cpp convention).
// Implementations: csrc/cpu/<op>.cpp (TORCH_LIBRARY_IMPL(wagle, CPU, m)) and, in CUDA builds,
// csrc/cuda/bindings.cpp (TORCH_LIBRARY_IMPL(wagle, CUDA, m)). Fake (meta) kernels and the Python
// entry points live in wagle_ext/ops.py; the executable spec of every op is
// wagle_ext/kernels/reference.py.
#include <Python.h>
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#include "common/score_math.h"
#include "cpu/cpu_dispatch.h"

extern "C" {
// Importing wagle_ext._C runs the static TORCH_LIBRARY initialisers below; the module itself is
// empty (no pybind11), so the shared object works with the CPython limited API.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace {
std::string cpu_isa_name() { return wagle::cpu::isa_name(wagle::cpu::cpu_isa()); }

// The functional attribution_score, once for every device (CompositeExplicitAutograd): allocate the
// outputs beside `weight` and run that device's attribution_score_out through the dispatcher.
std::tuple<at::Tensor, at::Tensor> attribution_score_functional(const at::Tensor& weight,
                                                                const std::optional<at::Tensor>& grad_forget,
                                                                const std::optional<at::Tensor>& grad_retain,
                                                                const std::optional<at::Tensor>& hessian,
                                                                c10::string_view kind, double gamma, double eps) {
  static const auto out_op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("wagle::attribution_score_out", "")
          .typed<void(const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                      const std::optional<at::Tensor>&, c10::string_view, double, double, at::Tensor&, at::Tensor&)>();
  TORCH_CHECK_VALUE(weight.defined(), "attribution_score: weight is undefined");
  at::Tensor out = at::empty(weight.sizes(), weight.options().dtype(at::kFloat));
  at::Tensor hist = at::zeros({wagle::kHistSize}, weight.options().dtype(at::kLong));
  out_op.call(weight, grad_forget, grad_retain, hessian, kind, gamma, eps, out, hist);
  return {out, hist};
}
}  // namespace

TORCH_LIBRARY(wagle, m) {
  // SIMD path the CPU kernels take on this machine: "avx512" | "avx2" | "default".
  m.def("cpu_isa() -> str", &cpu_isa_name);

  // ---- attribution scores -------------------------------------------------------------------
  // kind: "wagle" | "wagle_hessian" | "snip" | "gradient" | "magnitude".
  // Writes the fp32 score of every element of `weight` into `out` (same numel, contiguous fp32)
  // and ADDS the 11-bit key histogram of those scores into `hist` (int64[2049]; entry 2048 counts
  // NaN scores) in the same pass; an empty `hist` skips the histogram (scores only).
  m.def(
      "attribution_score_out(Tensor weight, Tensor? grad_forget, Tensor? grad_retain, "
      "Tensor? hessian, str kind, float gamma, float eps, Tensor(a!) out, Tensor(b!) hist) -> ()");
  // Functional form: returns (scores fp32 shaped like weight, hist int64[2049]). One device-neutral
  // implementation (below) over attribution_score_out.
  m.def(
      "attribution_score(Tensor weight, Tensor? grad_forget, Tensor? grad_retain, "
      "Tensor? hessian, str kind, float gamma, float eps) -> (Tensor, Tensor)");

  // ---- selection primitives ------------------------------------------------------------------
  // Exact global top-k is orchestrated in Python (wagle_ext/ops.py) from three list ops, so the
  // same steps serve every back end and multi-process selection (all-reduce the histograms).
  // Keys are the order-preserving uint32 map of float scores (common/score_math.h float_key) and
  // are always UN-flipped here; `largest` only changes scan order and comparisons.
  //
  // Digit histogram of the keys whose top `prefix_bits` bits equal `prefix`: prefix_bits = 0
  // counts key >> 21 (11 bits); 11 counts (key >> 10) & 0x7FF; 22 counts key & 0x3FF (10 bits).
  // Returns int64[2049]; entry 2048 counts NaN scores (only when prefix_bits == 0).
  m.def("radix_histogram(Tensor[] scores, int prefix, int prefix_bits) -> Tensor");
  // Per tensor, the number of elements whose key equals `key`: int64[len(scores)].
  m.def("count_key(Tensor[] scores, int key) -> Tensor");
  // One uint8 bit array per tensor (ceil(numel/8) bytes, bit j of byte i = element 8*i+j): bit
  // set where the key is strictly better than `threshold_key` (greater if largest, else smaller),
  // plus the first ties_take[i] elements (flat index order) whose key equals it (-1 = all of them).
  m.def("topk_mask_bits(Tensor[] scores, int threshold_key, bool largest, int[] ties_take) -> Tensor[]");
  // Mask pass fused with the last refinement (CPU fast path, used when the boundary bucket is
  // small): bit arrays as topk_mask_bits for keys strictly better than every key of the bucket
  // whose top `prefix_bits` (11 or 22) bits equal `prefix`, plus that bucket's elements as
  // candidates in global order: (keys int64[c], tensor index int64[c], flat index int64[c]).
  m.def(
      "topk_mask_collect(Tensor[] scores, int prefix, int prefix_bits, bool largest) "
      "-> (Tensor[], Tensor, Tensor, Tensor)");
  // bool[numel] -> uint8[ceil(numel/8)] and back.
  m.def("pack_bits(Tensor mask) -> Tensor");
  m.def("unpack_bits(Tensor bits, int numel) -> Tensor");
  // Number of set bits among the first `numel` bits.
  m.def("popcount_bits(Tensor bits, int numel) -> int");

  // ---- masked AdamW ------------------------------------------------------------------------
  // AdamW on the elements selected by mask_bits[i] (uint8 PackedMask bits; an empty tensor = dense
  // param), with compact fp32 state: exp_avgs/exp_avg_sqs/max_exp_avg_sqs[i] hold one entry per
  // selected element, addressed through chunk_offsets[i] (int64[ceil(n/4096)+1]: compact index of
  // the first selected element of each 4096-element chunk; last entry = nnz; empty when dense).
  // Arithmetic identical to torch._fused_adamw_ on CPU (csrc/common/adamw_math.h); state_steps are
  // float32 scalars already incremented by the caller (torch convention); step_offsets[i] (int32,
  // one per selected element, or empty) gives elements their own step count `step - offset` after a
  // mask change. weight_decay_mode: "masked" (frozen weights never read or written) | "all"
  // (frozen weights also get p *= 1 - lr*wd) | "none". grad_scale: grads are divided by it and the
  // unscaled values written back (selected elements only); found_inf == 1 skips the whole call.
  // torch_tail: the last numel % torch_tail elements of each tensor use torch's scalar-tail
  // contraction (0 = none). compact_grads: grads[i] is a contiguous float32[nnz] tensor of the
  // selected elements' gradients in flat element order (what gather_masked_ writes), indexed like
  // the compact state, instead of a dense tensor shaped like params[i] (float32[numel] for a dense
  // param).
  m.def(
      "masked_adamw_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, "
      "Tensor(d!)[] exp_avg_sqs, Tensor(e!)[] max_exp_avg_sqs, Tensor[] state_steps, "
      "Tensor[] mask_bits, Tensor[] chunk_offsets, Tensor[] step_offsets, *, float lr, float beta1, "
      "float beta2, float weight_decay, float eps, bool amsgrad, bool maximize, "
      "str weight_decay_mode, Tensor? grad_scale=None, Tensor? found_inf=None, int torch_tail=8, "
      "bool compact_grads=False) -> ()");
  // masked_adamw_ with compact fp32 master weights (bfloat16/float16 params): master_weights[i] is
  // a contiguous float32 tensor laid out like exp_avgs[i] (one entry per selected element); the
  // update reads and writes it, and each selected parameter element is written as its rounding:
  // round to nearest even, or with rounding_seeds (one int per param) the counter-based stochastic
  // rounding of csrc/common/rounding_math.h keyed by (rounding_seeds[i], state step, flat index).
  // An empty master_weights list is masked_adamw_ itself. Unselected elements: as masked_adamw_.
  m.def(
      "masked_adamw_master_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, "
      "Tensor(d!)[] exp_avg_sqs, Tensor(e!)[] max_exp_avg_sqs, Tensor[] state_steps, "
      "Tensor[] mask_bits, Tensor[] chunk_offsets, Tensor[] step_offsets, Tensor(f!)[] master_weights, *, "
      "float lr, float beta1, float beta2, float weight_decay, float eps, bool amsgrad, bool maximize, "
      "str weight_decay_mode, Tensor? grad_scale=None, Tensor? found_inf=None, int torch_tail=8, "
      "bool compact_grads=False, int[] rounding_seeds=[]) -> ()");

  // ---- compact gradients -------------------------------------------------------------------
  // out[k] = src[e_k] (accumulate: out[k] += src[e_k]) for the k-th selected element e_k of the
  // mask (bits/chunk_offsets as masked_adamw_), in float32. `src`: the dense gradient, a
  // contiguous float32/bfloat16/float16 tensor of n elements (bits: uint8[ceil(n/8)]); `out`: a
  // contiguous float32[nnz]. One pass over the bits and the selected elements of src.
  m.def("gather_masked_(Tensor(a!) out, Tensor src, Tensor bits, Tensor chunk_offsets, bool accumulate) -> ()");
}

TORCH_LIBRARY_IMPL(wagle, CompositeExplicitAutograd, m) {
  m.impl("attribution_score", &attribution_score_functional);
}
