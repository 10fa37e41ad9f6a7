// The CPU row kernel of chunked linear cross-entropy, on class-major logits.
//
// Why a second layout: a chunk's logits are one GEMM, X_c W^T with X_c (n, D) a chunk of rows and W
// (V, D) the head. With n small (128 rows at N=4096, D=1024, V=32000, where memory allows no more),
// MKL computes it as W X_c^T, a (V, n) class-major result, markedly faster on this 2-core AVX2 machine
// than the (n, V) row-major one: the three GEMMs of a chunk (logits, input gradient, weight gradient)
// took 0.72x the CPU time with every operand class-major (bench/bench_linear_cross_entropy.py shows the
// end-to-end figure). The input and weight gradients read the gradient as G_c = (class-major)^T and
// (class-major) @ X_c, both plain BLAS operand layouts, so the whole chunk stays class-major.
//
// Layout: logits_t is (C, n) contiguous; column i holds row i's C logits with stride n. A work item is
// a group of kLanes vectors of adjacent columns (32 fp32 rows), which it owns alone: its stats pass reads
// the group's columns class block by class block (a block of kClassBlock classes, 16 KB, stays in L1
// for the two passes over it: max, then sum of exp), and its gradient pass writes them in place. Every
// column's stats are merged in class order by one thread, so the result does not depend on the thread
// count. Columns past the last full group take the scalar path (one element at a time with
// ce::update_stats). The math is cross_entropy_math.h's, the same steps as the row kernel's in
// cross_entropy.cpp, with the per-row constants held per lane.
#define FL_CPU_VEC 1
#include "fusedloss/checks.h"
#include "fusedloss/cpu_utils.h"
#include "fusedloss/cross_entropy_math.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>

namespace fusedloss {
namespace {

using at::vec::Vectorized;

constexpr int kLanes = 4;                // vectors per group: four independent dependency chains
constexpr int64_t kClassBlock = 128;     // 128 classes x 32 fp32 columns = 16 KB
// Block stats are merged into a super-block's, and super-blocks into the column's: a sum over C
// classes then adds at most 128 + 16 + C / 2048 terms in sequence, not C / 128 (a sequential fp32 sum
// of a thousand block sums lost 1e-4 of a gradient at C = 131072).
constexpr int64_t kSuperBlock = 16;

template <typename acc_t>
struct Column {
  const acc_t* w;
  const int64_t* t;
  const acc_t* g;
  int64_t g_stride;
  acc_t W;
  acc_t* loss;
  acc_t* lse;
};

// Loss, lse and gradient coefficients of column `col` from its merged stats; false when ignored.
template <typename acc_t>
bool finish_column(const acc_t* x, int64_t n, int64_t col, const ce::RowStats<acc_t>& r, const Column<acc_t>& k,
                   const ce::Options<acc_t>& o, ce::GradCoefs<acc_t>* coefs, acc_t* z_y_out, acc_t* w_y_out) {
  const int64_t y = k.t[col];
  if (ce::is_ignored(y, o)) {
    k.loss[col] = 0;
    k.lse[col] = 0;
    return false;
  }
  const acc_t z_y = ce::transform_logit<acc_t>(x[y * n + col], o);
  const acc_t w_y = k.w ? k.w[y] : acc_t(1);
  acc_t log_s;
  ce::row_loss(r, z_y, w_y, o, k.loss + col, k.lse + col, &log_s);
  *coefs = ce::grad_coefs<acc_t>(r.max, log_s, w_y, k.W, k.g ? k.g[col * k.g_stride] : acc_t(1), acc_t(0), o);
  *z_y_out = z_y;
  *w_y_out = w_y;
  return true;
}

// One group of kLanes * Vec::size() adjacent columns starting at c0.
template <typename acc_t>
void group(acc_t* x, int64_t C, int64_t n, int64_t c0, const Column<acc_t>& k, const ce::Options<acc_t>& o) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t L = Vec::size();
  constexpr int64_t G = kLanes * L;
  const bool smoothing = o.smoothing > acc_t(0);
  const Vec zero(acc_t(0)), ninf(-fl_inf<acc_t>());
  ce::RowStats<acc_t> stats[G], super[G];
  for (auto& s : stats) s = ce::empty_stats<acc_t>();
  for (auto& s : super) s = ce::empty_stats<acc_t>();
  alignas(64) acc_t bm[G], bs[G], bwd[G];
  for (int64_t b0 = 0; b0 < C; b0 += kClassBlock) {
    const int64_t b1 = std::min(C, b0 + kClassBlock);
    Vec m[kLanes];
    for (int l = 0; l < kLanes; ++l) m[l] = ninf;
    for (int64_t c = b0; c < b1; ++c) {
      const acc_t* xc = x + c * n + c0;
      for (int l = 0; l < kLanes; ++l) m[l] = fl_max(m[l], ce::transform_logit<acc_t>(Vec::loadu(xc + l * L), o));
    }
    // A column whose block is all -inf sums exp(z - 0) = 0 instead of exp(-inf - -inf) = NaN.
    Vec vm[kLanes], s[kLanes], wd[kLanes];
    for (int l = 0; l < kLanes; ++l) {
      vm[l] = Vec::blendv(m[l], zero, m[l] == ninf);
      s[l] = zero;
      wd[l] = zero;
    }
    acc_t sw = 0;
    for (int64_t c = b0; c < b1; ++c) {
      const acc_t* xc = x + c * n + c0;
      const Vec wc(k.w ? k.w[c] : acc_t(1));
      for (int l = 0; l < kLanes; ++l) {
        const Vec d = ce::transform_logit<acc_t>(Vec::loadu(xc + l * L), o) - vm[l];
        s[l] = s[l] + fl_exp(d);
        if (smoothing) wd[l] = wd[l] + wc * d;
      }
      if (smoothing) sw += k.w ? k.w[c] : acc_t(1);
    }
    for (int l = 0; l < kLanes; ++l) {
      m[l].store(bm + l * L);
      s[l].store(bs + l * L);
      wd[l].store(bwd + l * L);
    }
    for (int64_t i = 0; i < G; ++i) {
      const ce::RowStats<acc_t> piece{bm[i], bm[i] == -fl_inf<acc_t>() ? acc_t(0) : bs[i], bwd[i], sw};
      super[i] = ce::merge_stats(super[i], piece);
    }
    if ((b0 / kClassBlock) % kSuperBlock == kSuperBlock - 1 || b1 == C) {
      for (int64_t i = 0; i < G; ++i) {
        stats[i] = ce::merge_stats(stats[i], super[i]);
        super[i] = ce::empty_stats<acc_t>();
      }
    }
  }

  // Per-lane gradient constants; an ignored column gets a zero mask and is written as zeros.
  alignas(64) acc_t cmax[G], clog_s[G], cscale[G], csmooth[G], live[G], z_y[G], w_y[G];
  ce::GradCoefs<acc_t> coefs[G];
  for (int64_t i = 0; i < G; ++i) {
    const bool ok = finish_column(x, n, c0 + i, stats[i], k, o, coefs + i, z_y + i, w_y + i);
    live[i] = ok ? acc_t(1) : acc_t(0);
    cmax[i] = ok ? coefs[i].max : acc_t(0);
    clog_s[i] = ok ? coefs[i].log_s : acc_t(0);
    cscale[i] = ok ? coefs[i].p_scale : acc_t(0);
    csmooth[i] = ok ? coefs[i].smooth : acc_t(0);
  }
  Vec vmax[kLanes], vlog_s[kLanes], vscale[kLanes], vsmooth[kLanes], vlive[kLanes];
  for (int l = 0; l < kLanes; ++l) {
    vmax[l] = Vec::loadu(cmax + l * L);
    vlog_s[l] = Vec::loadu(clog_s + l * L);
    vscale[l] = Vec::loadu(cscale + l * L);
    vsmooth[l] = Vec::loadu(csmooth + l * L);
    vlive[l] = Vec::loadu(live + l * L) != zero;
  }
  for (int64_t c = 0; c < C; ++c) {
    acc_t* xc = x + c * n + c0;
    const Vec wc(k.w ? k.w[c] : acc_t(1));
    for (int l = 0; l < kLanes; ++l) {
      // ce::grad_element with the row constants per lane.
      const Vec z = ce::transform_logit<acc_t>(Vec::loadu(xc + l * L), o);
      const Vec p = fl_exp((z - vmax[l]) - vlog_s[l]);
      const Vec gv = (p * vscale[l] - vsmooth[l] * wc) * ce::transform_grad<acc_t>(z, o);
      Vec::blendv(zero, gv, vlive[l]).store(xc + l * L);
    }
  }
  for (int64_t i = 0; i < G; ++i) {
    if (live[i] != acc_t(0)) x[k.t[c0 + i] * n + c0 + i] = ce::grad_target<acc_t>(z_y[i], w_y[i], coefs[i], o);
  }
}

// Columns [c0, c1) one element at a time (the columns past the last full group).
template <typename acc_t>
void scalar_columns(acc_t* x, int64_t C, int64_t n, int64_t c0, int64_t c1, const Column<acc_t>& k,
                    const ce::Options<acc_t>& o) {
  const bool smoothing = o.smoothing > acc_t(0);
  for (int64_t col = c0; col < c1; ++col) {
    // Blocks and super-blocks as in group(), for the same accuracy on long columns.
    auto r = ce::empty_stats<acc_t>(), sup = ce::empty_stats<acc_t>();
    for (int64_t b0 = 0; b0 < C; b0 += kClassBlock) {
      const int64_t b1 = std::min(C, b0 + kClassBlock);
      auto block = ce::empty_stats<acc_t>();
      for (int64_t c = b0; c < b1; ++c) {
        ce::update_stats(block, ce::transform_logit<acc_t>(x[c * n + col], o), k.w ? k.w[c] : acc_t(1), smoothing);
      }
      sup = ce::merge_stats(sup, block);
      if ((b0 / kClassBlock) % kSuperBlock == kSuperBlock - 1 || b1 == C) {
        r = ce::merge_stats(r, sup);
        sup = ce::empty_stats<acc_t>();
      }
    }
    ce::GradCoefs<acc_t> coefs;
    acc_t z_y, w_y;
    if (!finish_column(x, n, col, r, k, o, &coefs, &z_y, &w_y)) {
      for (int64_t c = 0; c < C; ++c) x[c * n + col] = 0;
      continue;
    }
    for (int64_t c = 0; c < C; ++c) {
      const acc_t z = ce::transform_logit<acc_t>(x[c * n + col], o);
      x[c * n + col] = ce::grad_element<acc_t>(z, k.w ? k.w[c] : acc_t(1), coefs, o);
    }
    x[k.t[col] * n + col] = ce::grad_target<acc_t>(z_y, w_y, coefs, o);
  }
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd_grad_cols_cpu(at::Tensor& logits_t, const at::Tensor& target,
                                                                   const std::optional<at::Tensor>& weight,
                                                                   const std::optional<at::Tensor>& grad_scale,
                                                                   int64_t ignore_index, double label_smoothing,
                                                                   double z_loss, double softcap, double temperature) {
  TORCH_CHECK(logits_t.dim() == 2, "fusedloss: logits_t must be 2-D (C, N), got ", logits_t.dim(), "-D");
  TORCH_CHECK(logits_t.is_contiguous(), "fusedloss: cross_entropy_fwd_grad_cols_ writes the gradient over logits_t ",
              "in place, so logits_t must be contiguous (C, N)");
  TORCH_CHECK(logits_t.scalar_type() == at::kFloat || logits_t.scalar_type() == at::kDouble,
              "fusedloss: logits_t must be float32 or float64 (the accumulation dtype), got ", logits_t.scalar_type());
  const int64_t C = logits_t.size(0), n = logits_t.size(1);
  const at::Tensor logits = logits_t.t();  // the (N, C) view the row kernel's checks speak of
  check_ce_target_weight(logits, n, C, target, weight);
  if (grad_scale.has_value()) check_row_grad(*grad_scale, logits, "grad_scale");
  auto loss = at::empty({n}, logits_t.options());
  auto lse = at::empty({n}, logits_t.options());
  if (n == 0) return {loss, lse};
  AT_DISPATCH_FLOATING_TYPES(logits_t.scalar_type(), "cross_entropy_fwd_grad_cols_cpu", [&] {
    using acc_t = scalar_t;
    const auto o = ce::Options<acc_t>{C,
                                      ignore_index,
                                      static_cast<acc_t>(label_smoothing),
                                      static_cast<acc_t>(z_loss),
                                      static_cast<acc_t>(softcap),
                                      static_cast<acc_t>(1.0 / temperature)};
    acc_t* x = logits_t.mutable_data_ptr<acc_t>();
    const int64_t* t = target.const_data_ptr<int64_t>();
    // Before anything is overwritten: a bad target leaves the logits as they were.
    cpu::check_targets(t, n, C, ignore_index);
    const acc_t* w = weight.has_value() ? weight->const_data_ptr<acc_t>() : nullptr;
    acc_t W = static_cast<acc_t>(C);
    if (w != nullptr) {
      W = 0;
      for (int64_t j = 0; j < C; ++j) W += w[j];
    }
    const Column<acc_t> k{w,
                          t,
                          grad_scale.has_value() ? grad_scale->const_data_ptr<acc_t>() : nullptr,
                          grad_scale.has_value() ? grad_scale->stride(0) : 0,
                          W,
                          loss.mutable_data_ptr<acc_t>(),
                          lse.mutable_data_ptr<acc_t>()};
    constexpr int64_t G = kLanes * Vectorized<acc_t>::size();
    const int64_t groups = n / G;
    // Work items: every full group, then one item for the remaining columns.
    at::parallel_for(0, groups + 1, 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        if (item < groups) {
          group<acc_t>(x, C, n, item * G, k, o);
        } else {
          scalar_columns<acc_t>(x, C, n, groups * G, n, k, o);
        }
      }
    });
  });
  return {loss, lse};
}

}  // namespace
}  // namespace fusedloss

TORCH_LIBRARY_IMPL(fusedloss, CPU, m) {
  m.impl("cross_entropy_fwd_grad_cols_", &fusedloss::cross_entropy_fwd_grad_cols_cpu);
}
