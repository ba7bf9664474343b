// Argument checks shared by the CPU ops. The Python layer (wagle_ext/ops.py) validates first and
// raises clear ValueError/TypeError; these are the last line of defence for direct
// torch.ops.wagle.* callers, so a bad call never reaches a raw pointer.
#pragma once
#include <torch/library.h>

#include "common/score_math.h"

namespace wagle {
namespace cpu {

inline void check_float_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.defined(), name, " is undefined");
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16 ||
                       t.scalar_type() == at::kHalf,
                   name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor for the CPU kernel");
}

inline void check_out_hist(const at::Tensor& hist) {
  TORCH_CHECK_VALUE(hist.scalar_type() == at::kLong && hist.is_contiguous() && hist.numel() == kHistSize,
                    "hist must be a contiguous int64 tensor with ", kHistSize, " entries");
}

}  // namespace cpu
}  // namespace wagle
