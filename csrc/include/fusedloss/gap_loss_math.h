#pragma once
// Per-row math of the multi-class gap hinge loss, shared by the CPU and CUDA kernels;
// fusedloss/triton/gap_loss.py follows the same steps with the same names.
//
// For one row x of C scores, target y, class weights w (1 without), margin, power p in {1, 2}:
//   (1) h_j     = x_j - x_y + margin                          the gap of class j to the target
//   (2) term_j  = max(0, h_j)^p, taken as 0 unless h_j > 0 (so a NaN score adds nothing, as in
//                 torch's multi_margin_loss kernels)
//   (3) loss    = scale * sum_{j != y} term_j                 (mode "sum", the default)
//       loss    = scale * max_{j != y} term_j                 (mode "max", Crammer-Singer)
//       scale   = w_y / C with class_normalize (then it equals torch's multi_margin_loss), w_y otherwise
//   (4) gradient, with upstream g: slope_j = d term_j / d h_j = [h_j > 0] (p = 1), 2 h_j [h_j > 0] (p = 2)
//       (strict > 0 at the hinge, torch's convention);
//         d loss / d x_j = g scale slope_j          for j != y (mode "max": only j = argmax_{j != y} h_j)
//         d loss / d x_y = -sum_{j != y} d loss / d x_j
//       so the backward streams the row once, writing each j's gradient while summing them for y.
// Classes j != y are visited as two ranges, [0, y) and (y, C): no masking of y inside the loops.
// A row whose target is ignore_index has loss 0 and gradient 0.

#include "fusedloss/common.h"

namespace fusedloss {
namespace gap {

template <typename acc_t>
struct Options {
  int64_t num_classes;
  int64_t ignore_index;
  acc_t margin;
  int p;
  bool class_normalize;
  bool max_mode;
};

// The per-call options from the op's arguments (the schema's double margin and int64 p).
template <typename acc_t>
inline Options<acc_t> make_options(int64_t C, double margin, int64_t p, int64_t ignore_index, bool class_normalize,
                                   bool max_mode) {
  return Options<acc_t>{C, ignore_index, static_cast<acc_t>(margin), static_cast<int>(p), class_normalize, max_mode};
}

// (2) and the slope of (4), on a scalar or an at::vec vector.
template <typename T>
FL_HOST_DEVICE T hinge_term(const T& h, int p) {
  const T r = fl_positive_part(h);
  return p == 1 ? r : r * r;
}

template <typename T>
FL_HOST_DEVICE T hinge_slope(const T& h, int p) {
  return p == 1 ? fl_step(h) : fl_positive_part(h) * T(2);
}

// The row's scale in (3).
template <typename acc_t>
FL_HOST_DEVICE acc_t row_scale(acc_t w_y, const Options<acc_t>& o) {
  return o.class_normalize ? w_y / acc_t(o.num_classes) : w_y;
}

template <typename acc_t>
FL_HOST_DEVICE bool is_ignored(int64_t y, const Options<acc_t>& o) {
  return y == o.ignore_index;
}

template <typename acc_t>
FL_HOST_DEVICE bool target_in_range(int64_t y, const Options<acc_t>& o) {
  return y >= 0 && y < o.num_classes;
}

}  // namespace gap
}  // namespace fusedloss
