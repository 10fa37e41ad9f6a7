// CPU kernels of SigLIP's sigmoid pairwise loss (fusedloss::siglip_{fwd,bwd}), and the ops' schemas.
// The math and its derivation are in fusedloss/siglip_math.h, shared with the CUDA kernels; this file
// decides the tiling, the parallel split and the merge orders, as csrc/cpu/info_nce.cpp does.
//
// T = Q K^T (N x M) is never held: kBQ x kBK tiles of it go through a per-thread buffer that stays in
// L2 (tile products through BLAS, see info_nce.cpp for the measurement that chose it). Extra memory:
// the tile, per-row float64 sums, and in the backward one (M, D) partial key gradient per thread
// beyond the first.
//
// Parallel split: the query tiles are cut into P = min(threads, query tiles) contiguous parts, one per
// thread. A part owns its query rows (their loss, their gradient rows and their partial sums of (3));
// the key gradient, which every part touches, goes to a per-part buffer summed afterwards in part order.
// No atomics. The row outputs and d scale / d bias (summed per row, then over rows in index order)
// depend only on the key tiling, fixed at kBK; dK's bits depend on the thread count (the grouping of
// query tiles), as InfoNCE's do.
#define FL_CPU_VEC 1
#include "fusedloss/cpu_utils.h"
#include "fusedloss/siglip_checks.h"
#include "fusedloss/siglip_math.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

TORCH_LIBRARY_FRAGMENT(fusedloss, m) {
  // SigLIP (fusedloss/siglip_math.h): the per-query losses loss_i = sum_j softplus(-y_ij (scale q_i . k_j
  // + bias)), y = +1 at j == labels_i (labels (N,) int64; None: labels_i = i, which needs M >= N) and -1
  // elsewhere, without materializing the (N, M) logits. query (N, D) and key (M, D) contiguous float32 or
  // float64; scale and bias 0-dim tensors in that dtype or float64 on the same device (learnable, never
  // read on the host off the CPU). Returns (N,) in the inputs' dtype; the reduction is the caller's.
  m.def("siglip_fwd(Tensor query, Tensor key, Tensor scale, Tensor bias, Tensor? labels=None) -> Tensor");
  // Gradients of sum_i grad_rows_i loss_i: grad_query (N, D), grad_key (M, D) in the inputs' dtype,
  // grad_scale in scale's dtype and grad_bias in bias's dtype (0-dim, summed in float64).
  m.def("siglip_bwd(Tensor grad_rows, Tensor query, Tensor key, Tensor scale, Tensor bias, Tensor? labels=None) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
}

namespace fusedloss {
namespace {

using at::vec::Vectorized;
using cpu::reduce_sum;

// Tile of T: kBQ query rows x kBK key rows (as info_nce.cpp: 128 x 256 fp32 fits a core's L2 with the
// operand tiles at D = 256).
constexpr int64_t kBQ = 128;
constexpr int64_t kBK = 256;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Query rows per tile: kBQ, or fewer (a multiple of 16, at least 32) so that every thread gets a tile.
int64_t query_tile_rows(int64_t N) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t per_thread = (ceil_div(N, threads) + 15) / 16 * 16;
  return std::clamp<int64_t>(per_thread, 32, kBQ);
}

int64_t num_parts(int64_t query_tiles) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), query_tiles));
}

template <typename acc_t>
at::Tensor view2d(const acc_t* p, int64_t rows, int64_t cols) {
  const auto dt = std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat;
  return at::from_blob(const_cast<acc_t*>(p), {rows, cols}, at::TensorOptions().dtype(dt));
}

// tile (nq x nk, row stride nk) = Q_t K_t^T, unscaled; the forward and the backward make the same call
// on the same shapes, so the backward's z is the forward's bit for bit.
template <typename acc_t>
void tile_products(const acc_t* q, const acc_t* k, int64_t nq, int64_t nk, int64_t D, acc_t* tile) {
  auto out = view2d(tile, nq, nk);
  if (D == 0) {
    out.zero_();
    return;
  }
  at::addmm_out(out, out, view2d(q, nq, D), view2d(k, nk, D).t(), /*beta=*/0, /*alpha=*/1);
}

// The vector forms of siglip::softplus and siglip::sigmoid, step for step (fl_exp is exp_u20 here).
template <typename acc_t>
Vectorized<acc_t> softplus_vec(const Vectorized<acc_t>& x) {
  const Vectorized<acc_t> zero(acc_t(0));
  return fl_positive_part(x) + fl_exp(zero - x.abs()).log1p();
}

template <typename acc_t>
Vectorized<acc_t> sigmoid_vec(const Vectorized<acc_t>& x) {
  using Vec = Vectorized<acc_t>;
  const Vec zero(acc_t(0)), one(acc_t(1));
  const Vec e = fl_exp(zero - x.abs());
  const Vec r = one / (one + e);
  return Vec::blendv(e * r, r, x >= zero);
}

// The column of the row's positive inside a tile of columns [j0, j0 + nk), or -1.
inline int64_t positive_column(const int64_t* labels, int64_t i, int64_t j0, int64_t nk) {
  const int64_t l = labels ? labels[i] : i;
  return l >= j0 && l < j0 + nk ? l - j0 : -1;
}

// (0) over one tile row: sum_j pair_loss(z_j), float32 (acc_t) in a fixed order. The vector holding the
// positive runs the scalar form, so that no term is subtracted back out.
template <typename acc_t>
acc_t row_loss(const acc_t* t, int64_t nk, acc_t scale, acc_t bias, int64_t pos_col) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const Vec vs(scale), vb(bias);
  Vec acc(acc_t(0));
  acc_t rest = 0;
  int64_t j = 0;
  for (; j + V <= nk; j += V) {
    if (pos_col >= j && pos_col < j + V) {
      for (int64_t c = j; c < j + V; ++c) rest += siglip::pair_loss(siglip::logit(t[c], scale, bias), c == pos_col);
      continue;
    }
    acc = acc + softplus_vec(vs * Vec::loadu(t + j) + vb);
  }
  for (; j < nk; ++j) rest += siglip::pair_loss(siglip::logit(t[j], scale, bias), j == pos_col);
  return reduce_sum(acc) + rest;
}

// (1) over one tile row, in place: on entry the unscaled products T_j, on exit w * dz_j with w = g_i *
// scale (what both products of (2) need). Adds sum_j dz_j T_j and sum_j dz_j (float32 for the tile) to
// *gt and *gs, the row's parts of (3) before the factor g_i.
template <typename acc_t>
void row_grad(acc_t* t, int64_t nk, acc_t scale, acc_t bias, int64_t pos_col, acc_t w, double* gt, double* gs) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const Vec vs(scale), vb(bias), vw(w);
  Vec at_(acc_t(0)), as_(acc_t(0));
  acc_t rt = 0, rs = 0;
  auto scalar = [&](int64_t c) {
    const acc_t dz = siglip::pair_grad(siglip::logit(t[c], scale, bias), c == pos_col);
    rt += dz * t[c];
    rs += dz;
    t[c] = dz * w;
  };
  int64_t j = 0;
  for (; j + V <= nk; j += V) {
    if (pos_col >= j && pos_col < j + V) {
      for (int64_t c = j; c < j + V; ++c) scalar(c);
      continue;
    }
    const Vec tv = Vec::loadu(t + j);
    const Vec dz = sigmoid_vec(vs * tv + vb);  // a negative's pair_grad
    at_ = at_ + dz * tv;
    as_ = as_ + dz;
    (dz * vw).store(t + j);
  }
  for (; j < nk; ++j) scalar(j);
  *gt += static_cast<double>(reduce_sum(at_) + rt);
  *gs += static_cast<double>(reduce_sum(as_) + rs);
}

template <typename acc_t>
void fwd_kernel(const acc_t* q, const acc_t* k, int64_t N, int64_t M, int64_t D, acc_t scale, acc_t bias,
                const int64_t* labels, acc_t* out) {
  const int64_t bq = query_tile_rows(N);
  const int64_t q_tiles = ceil_div(N, bq), k_tiles = ceil_div(M, kBK);
  at::parallel_for(0, q_tiles, 1, [&](int64_t t_begin, int64_t t_end) {
    std::vector<acc_t> tile(bq * kBK);
    std::vector<double> run(bq);
    for (int64_t qt = t_begin; qt < t_end; ++qt) {
      const int64_t i0 = qt * bq, nq = std::min(bq, N - i0);
      std::fill(run.begin(), run.end(), 0.0);
      for (int64_t kt = 0; kt < k_tiles; ++kt) {
        const int64_t j0 = kt * kBK, nk = std::min(kBK, M - j0);
        tile_products(q + i0 * D, k + j0 * D, nq, nk, D, tile.data());
        for (int64_t r = 0; r < nq; ++r) {
          run[r] += static_cast<double>(
              row_loss(tile.data() + r * nk, nk, scale, bias, positive_column(labels, i0 + r, j0, nk)));
        }
      }
      for (int64_t r = 0; r < nq; ++r) out[i0 + r] = static_cast<acc_t>(run[r]);
    }
  });
}

// Returns (d scale, d bias) of (3), each summed per row then over rows in index order, in float64.
template <typename acc_t>
std::pair<double, double> bwd_kernel(const acc_t* q, const acc_t* k, int64_t N, int64_t M, int64_t D, acc_t scale,
                                     acc_t bias, const int64_t* labels, const acc_t* g, acc_t* dq, acc_t* dk) {
  const int64_t bq = query_tile_rows(N);
  const int64_t q_tiles = ceil_div(N, bq), k_tiles = ceil_div(M, kBK);
  const int64_t parts = num_parts(q_tiles);
  // Part 0 accumulates into dk itself, the others into their own (M, D) buffers (from PyTorch's
  // allocator, so that memory profiles see them), zeroed by their own thread.
  const auto dt = std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat;
  auto extra_t = at::empty({parts > 1 ? (parts - 1) * M * D : 0}, at::TensorOptions().dtype(dt));
  acc_t* extra = static_cast<acc_t*>(extra_t.mutable_data_ptr());
  std::vector<double> row_gt(N), row_gs(N);  // (3) per query row, times g_i
  if (M * D == 0) std::fill(dk, dk + M * D, acc_t(0));
  at::parallel_for(0, parts, 1, [&](int64_t p_begin, int64_t p_end) {
    std::vector<acc_t> tile(bq * kBK);
    std::vector<double> gt(bq), gs(bq);
    for (int64_t p = p_begin; p < p_end; ++p) {
      acc_t* dkp = p == 0 ? dk : extra + (p - 1) * M * D;
      std::fill(dkp, dkp + M * D, acc_t(0));
      const int64_t t_begin = p * q_tiles / parts, t_end = (p + 1) * q_tiles / parts;
      for (int64_t qt = t_begin; qt < t_end; ++qt) {
        const int64_t i0 = qt * bq, nq = std::min(bq, N - i0);
        auto q_t = view2d(q + i0 * D, nq, D);
        auto dq_t = view2d(dq + i0 * D, nq, D);
        dq_t.zero_();
        std::fill(gt.begin(), gt.end(), 0.0);
        std::fill(gs.begin(), gs.end(), 0.0);
        for (int64_t kt = 0; kt < k_tiles; ++kt) {
          const int64_t j0 = kt * kBK, nk = std::min(kBK, M - j0);
          tile_products(q + i0 * D, k + j0 * D, nq, nk, D, tile.data());
          for (int64_t r = 0; r < nq; ++r) {
            acc_t* t = tile.data() + r * nk;
            const acc_t gr = g[i0 + r];
            if (gr == acc_t(0)) {  // no gradient from this row (a NaN g is not 0 and propagates)
              std::fill(t, t + nk, acc_t(0));
              continue;
            }
            row_grad(t, nk, scale, bias, positive_column(labels, i0 + r, j0, nk), gr * scale, &gt[r], &gs[r]);
          }
          if (D == 0) continue;
          auto p_t = view2d(tile.data(), nq, nk);
          dq_t.addmm_(p_t, view2d(k + j0 * D, nk, D));          // (2): dQ_t += (g scale dz) K_t
          view2d(dkp + j0 * D, nk, D).addmm_(p_t.t(), q_t);     // (2): dK_t += (g scale dz)^T Q_t
        }
        for (int64_t r = 0; r < nq; ++r) {
          const double gr = static_cast<double>(g[i0 + r]);
          row_gt[i0 + r] = gr == 0.0 ? 0.0 : gr * gt[r];
          row_gs[i0 + r] = gr == 0.0 ? 0.0 : gr * gs[r];
        }
      }
    }
  });
  if (parts > 1) {
    // dk = part 0 + part 1 + ... in this order, element by element.
    at::parallel_for(0, M * D, 16384, [&](int64_t begin, int64_t end) {
      for (int64_t p = 1; p < parts; ++p) {
        const acc_t* src = extra + (p - 1) * M * D;
        at::vec::map2([](auto a, auto b) { return a + b; }, dk + begin, dk + begin, src + begin, end - begin);
      }
    });
  }
  double dscale = 0, dbias = 0;
  for (int64_t i = 0; i < N; ++i) {
    dscale += row_gt[i];
    dbias += row_gs[i];
  }
  return {dscale, dbias};
}

at::Tensor siglip_fwd_cpu(const at::Tensor& query, const at::Tensor& key, const at::Tensor& scale,
                          const at::Tensor& bias, const std::optional<at::Tensor>& labels) {
  const auto acc = check_siglip_args(query, key, scale, bias);
  check_siglip_labels(labels, query, key);
  const int64_t N = query.size(0), M = key.size(0), D = query.size(1);
  auto out = at::empty({N}, query.options());
  const auto lab = labels ? labels->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(acc, "siglip_fwd_cpu", [&] {
    fwd_kernel<scalar_t>(query.const_data_ptr<scalar_t>(), key.const_data_ptr<scalar_t>(), N, M, D,
                         static_cast<scalar_t>(scale.item<double>()), static_cast<scalar_t>(bias.item<double>()),
                         labels ? lab.const_data_ptr<int64_t>() : nullptr, out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> siglip_bwd_cpu(
    const at::Tensor& grad_rows, const at::Tensor& query, const at::Tensor& key, const at::Tensor& scale,
    const at::Tensor& bias, const std::optional<at::Tensor>& labels) {
  const auto acc = check_siglip_args(query, key, scale, bias);
  check_siglip_labels(labels, query, key);
  check_siglip_grad(grad_rows, query);
  const int64_t N = query.size(0), M = key.size(0), D = query.size(1);
  const auto g = grad_rows.contiguous();
  const auto lab = labels ? labels->contiguous() : at::Tensor();
  auto dq = at::empty({N, D}, query.options());
  auto dk = at::empty({M, D}, query.options());
  auto dscale = at::empty({}, scale.options());
  auto dbias = at::empty({}, bias.options());
  cpu::advise_huge_pages(dq.mutable_data_ptr(), dq.nbytes());
  cpu::advise_huge_pages(dk.mutable_data_ptr(), dk.nbytes());
  AT_DISPATCH_FLOATING_TYPES(acc, "siglip_bwd_cpu", [&] {
    const auto [ds, db] = bwd_kernel<scalar_t>(
        query.const_data_ptr<scalar_t>(), key.const_data_ptr<scalar_t>(), N, M, D,
        static_cast<scalar_t>(scale.item<double>()), static_cast<scalar_t>(bias.item<double>()),
        labels ? lab.const_data_ptr<int64_t>() : nullptr, g.const_data_ptr<scalar_t>(),
        dq.mutable_data_ptr<scalar_t>(), dk.mutable_data_ptr<scalar_t>());
    dscale.fill_(ds);
    dbias.fill_(db);
  });
  return {dq, dk, dscale, dbias};
}

}  // namespace
}  // namespace fusedloss

TORCH_LIBRARY_IMPL(fusedloss, CPU, m) {
  m.impl("siglip_fwd", &fusedloss::siglip_fwd_cpu);
  m.impl("siglip_bwd", &fusedloss::siglip_bwd_cpu);
}
