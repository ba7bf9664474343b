// Plain argument structs of the CUDA kernels (kernels.h), without any CUDA or torch header, so the
// host-side planning of the bindings (cuda/host_plan.h) compiles on machines without a CUDA
// toolkit: the contract test (tests/test_cuda_contract.py) builds it with g++ against a CPU torch.
#pragma once
#include <stdint.h>

#include "common/adamw_math.h"

namespace wagle {
namespace cuda {

enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

// ---- masked AdamW (masked_adamw.cu) -----------------------------------------------------------
// One tensor of a masked_adamw_ list, as the kernel reads it from device memory (the launcher
// copies an array of these, one per tensor, to the device before the single launch).
struct AdamwTensorMeta {
  void* p;                 // params (DType of the call), n elements, contiguous
  void* g;                 // grads, same dtype and size (written back with grad_scale); with
                           // AdamwListArgs::compact_grads float32[nnz] at the compact slot
  float* m;                // compact exp_avg, nnz entries
  float* v;                // compact exp_avg_sq, nnz entries
  float* vmax;             // compact max_exp_avg_sq (amsgrad), else null
  const uint8_t* bits;     // PackedMask bits, ceil(n/8) bytes; null: dense (nnz == n)
  const int64_t* dir;      // chunk directory, ceil(n/4096)+1 entries; null when dense
  const int32_t* offsets;  // per-element step offsets (nnz), or null
  int64_t n;               // elements
  int64_t nnz;             // entries of m/v (slots are kept below it whatever dir says)
  int64_t tail_start;      // elements >= tail_start use torch's scalar-tail form of v
  int64_t chunk_begin;     // first global chunk (= block index) of this tensor; increasing
  int64_t step_int;        // integral step, for step_table lookups with offsets
  AdamwCoeffs c;           // host-computed coefficients of the tensor's step (adamw_coeffs)
  int32_t decay_all;       // weight_decay_mode="all" and decay != 1: p *= decay on unselected
  int32_t rounding;        // common/rounding_math.h Rounding: kRoundNoMaster (mw null), or how p
                           // is written from the master value (nearest even / stochastic)
  float* mw;               // compact fp32 master weights (nnz entries, like m), or null
  uint64_t sr_key;         // stochastic rounding: sr_key(seed, step) of this tensor and call
};

// Per-call arguments shared by every tensor of the list.
struct AdamwListArgs {
  const float* grad_scale;  // device float32 scalar, or null
  const float* found_inf;   // device float32 scalar, or null (== 1: the kernel does nothing)
  const float* step_table;  // device float32 [table_len][2]: (neg_step_size, bc2_sqrt) of step
                            // table_lo + r in row r: only the steps the offsets can reach
                            // (host_plan.h), not every step since the start of training
  int64_t table_lo;         // step of row 0 (>= 1)
  int64_t table_len;        // rows of step_table (0 without per-element offsets)
  int* error;               // device int32[2] or null, ADDED to: [0] chunks whose dir disagrees
                            // with the bits, [1] elements whose step offset is outside [0, step).
                            // The host validated both before the launch (host_plan.h), so this is
                            // a second line of defence, read only in checked calls
  bool maximize;
  bool compact_grads;       // grads are float32[nnz] indexed like m/v (gather_masked's layout)
};

}  // namespace cuda
}  // namespace wagle
