// Every op schema of the `wagle` library, in one place (pytorch/extension-cpp convention).
// Implementations: csrc/cpu/<op>.cpp (TORCH_LIBRARY_IMPL(wagle, CPU, m)) and, in CUDA builds,
// csrc/cuda/bindings.cpp (TORCH_LIBRARY_IMPL(wagle, CUDA, m)). Fake (meta) kernels and the Python
// entry points live in wagle_ext/ops.py; the executable spec of every op is
// wagle_ext/kernels/reference.py.
#include <Python.h>
#include <torch/library.h>

#include <string>

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
}  // namespace

TORCH_LIBRARY(wagle, m) {
  // SIMD path the CPU kernels take on this machine: "avx512" | "avx2" | "default".
  m.def("cpu_isa() -> str", &cpu_isa_name);

  // ---- attribution scores -------------------------------------------------------------------
  // kind: "wagle" | "wagle_hessian" | "snip" | "gradient" | "magnitude".
  // Writes the fp32 score of every element of `weight` into `out` (same numel, contiguous fp32)
  // and ADDS the 11-bit key histogram of those scores into `hist` (int64[2049]; entry 2048 counts
  // NaN scores) in the same pass.
  m.def(
      "attribution_score_out(Tensor weight, Tensor? grad_forget, Tensor? grad_retain, "
      "Tensor? hessian, str kind, float gamma, float eps, Tensor(a!) out, Tensor(b!) hist) -> ()");
  // Functional form: returns (scores fp32 shaped like weight, hist int64[2049]).
  m.def(
      "attribution_score(Tensor weight, Tensor? grad_forget, Tensor? grad_retain, "
      "Tensor? hessian, str kind, float gamma, float eps) -> (Tensor, Tensor)");

  // ---- selection ----------------------------------------------------------------------------
  // Adds the 11-bit key histogram of `scores` (any float dtype) into hist (int64[2049]).
  m.def("score_histogram_(Tensor scores, Tensor(a!) hist) -> ()");
  // Exact top-k over the concatenation of `scores` (global index = tensor order, then flat
  // index); ties at the threshold go to the lowest global index. Returns one uint8 bit array per
  // tensor (ceil(numel/8) bytes, bit j of byte i = element 8*i+j). `hist` (optional) is the
  // summed histogram of all the scores, e.g. from attribution_score; it saves one pass.
  m.def("select_topk_bits(Tensor[] scores, int k, bool largest, Tensor? hist) -> Tensor[]");
  // bool[numel] -> uint8[ceil(numel/8)] and back.
  m.def("pack_bits(Tensor mask) -> Tensor");
  m.def("unpack_bits(Tensor bits, int numel) -> Tensor");
  // Number of set bits among the first `numel` bits.
  m.def("popcount_bits(Tensor bits, int numel) -> int");
}
