#pragma once
// torch's "sum" and "mean" of per-row losses, as one pass over the rows that the CPU and CUDA
// reduction kernels share (csrc/cpu/reduce.cpp, csrc/cuda/reduce.cu).
//
// With l_i the row losses (0 on ignored rows), y_i the targets, w the class weights and u_i the
// per-token weights (both 1 when absent), kept_i = [y_i != ignore_index]:
//   sum  = sum_i kept_i u_i l_i
//   mass = sum_i kept_i u_i w_{y_i}            (torch's weighted-mean denominator; the count without w, u)
//   mean = sum / mass                           (0 / 0 = NaN when every row is ignored, as in torch)
// Both are accumulated in double: the partial sums are merged in a fixed order that does not depend
// on the thread count (CPU) or the launch (CUDA), so the result is deterministic, and a double
// accumulator keeps a sum over millions of fp32 rows at fp32 accuracy, so the reduced loss is
// rounded once, to the accumulation dtype, at the end.
#include "fusedloss/common.h"

namespace fusedloss {
namespace reduce {

// at::Reduction's values, which the Python API passes (torch.nn._reduction.get_enum).
constexpr int64_t kNone = 0;
constexpr int64_t kMean = 1;
constexpr int64_t kSum = 2;

struct Partial {
  double sum;
  double mass;
};

FL_HOST_DEVICE Partial merge(Partial a, Partial b) { return Partial{a.sum + b.sum, a.mass + b.mass}; }

// Row i's contribution. A target outside [0, C) that is not ignored already has a NaN loss (the
// row kernels' convention on the GPU; the CPU kernels raise first): its class weight is read at a
// clamped index, so no out-of-bounds read happens here either.
template <typename acc_t>
FL_HOST_DEVICE Partial row_partial(int64_t i, const acc_t* loss, const int64_t* target, const acc_t* weight,
                                   int64_t num_weights, const acc_t* token_weight, int64_t ignore_index) {
  const int64_t y = target[i];
  if (y == ignore_index) return Partial{0.0, 0.0};
  const double u = token_weight ? static_cast<double>(token_weight[i]) : 1.0;
  double w = 1.0;
  if (weight) {
    const int64_t yc = y < 0 ? 0 : (y >= num_weights ? num_weights - 1 : y);
    w = static_cast<double>(weight[yc]);
  }
  return Partial{u * static_cast<double>(loss[i]), u * w};
}

FL_HOST_DEVICE double finish(Partial p, bool mean) { return mean ? p.sum / p.mass : p.sum; }

}  // namespace reduce
}  // namespace fusedloss
