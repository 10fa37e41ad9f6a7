// CPU kernels of InfoNCE's tiled log-sum-exp (fusedloss::info_nce_lse_{fwd,bwd}). The math and its
// derivation are in fusedloss/info_nce_math.h, shared with the CUDA kernels; this file decides the
// tiling, the parallel split and the merge orders.
//
// S = scale * Q K^T (N x M) is never held: it is computed kBQ x kBK tiles at a time into a per-thread
// buffer that stays in L2. Extra memory: the tile, O(M) column partials per thread in the forward,
// one (M, D) partial gradient of the keys per thread beyond the first in the backward, and float32
// copies of bf16/fp16 inputs (O((N + M) D)).
//
// Tile products go through BLAS (at::mm_out / addmm_ on views of the tiles: MKL's sgemm, one thread
// each inside the parallel region). Measured here (2-core EPYC, fp32, 128x256x256 tiles, one thread):
// about 80-90 GFLOP/s for each of Q K^T, P K and P^T Q, the same as one large 8192x8192x256 matmul
// on one thread (69-73 GFLOP/s); a blocked AVX2 loop of our own would have to reach MKL's register
// blocking to compete, so BLAS it is.
//
// Parallel split: the query tiles are cut into P = min(threads, query tiles) contiguous parts, one per
// thread. A part owns its query rows (their lse, their gradient rows) outright; what every part
// touches (the column lse partials of the forward, the key gradient of the backward, the gradient of
// scale) goes to a per-part buffer, summed afterwards in part order. No atomics: for a given thread
// count, every bit of every output is the same run after run. Across thread counts the bits of the
// column lse, dK and d scale differ (the query tiles are grouped differently), and so do the row
// outputs when N < 128 * threads (the query tile shrinks so that every thread gets one).
#define FL_CPU_VEC 1
#include "fusedloss/checks.h"
#include "fusedloss/cpu_utils.h"
#include "fusedloss/info_nce_math.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/neg.h>
#include <ATen/ops/sub.h>
#include <ATen/ops/gt.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/where.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

namespace fusedloss {
namespace {

using at::vec::Vectorized;
using cpu::reduce_max;
using cpu::reduce_sum;
using info_nce::Lse;

// Tile of S: kBQ query rows x kBK key rows. 128 x 256 fp32 is 128 KB, with the 128 x D query tile
// and the 256 x D key tile (D = 256: 128 + 256 KB) it fits the 512 KB L2 of a core; larger tiles did
// not make MKL faster (see the measurement above).
constexpr int64_t kBQ = 128;
constexpr int64_t kBK = 256;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Query rows per tile: kBQ, or fewer when N is small, so that every thread gets a tile (N = 256
// queries against a large key queue would otherwise leave all but two threads idle). At least 32
// rows, a multiple of 16 (MKL's efficiency drops little down to 64 x 256 tiles, measured).
int64_t query_tile_rows(int64_t N) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t per_thread = (ceil_div(N, threads) + 15) / 16 * 16;
  return std::clamp<int64_t>(per_thread, 32, kBQ);
}

// The number of parts the query tiles are split into (one per thread), and part p's tile range.
int64_t num_parts(int64_t query_tiles) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), query_tiles));
}
std::pair<int64_t, int64_t> part_tiles(int64_t p, int64_t parts, int64_t tiles) {
  return {p * tiles / parts, (p + 1) * tiles / parts};
}

template <typename acc_t>
at::Tensor view2d(const acc_t* p, int64_t rows, int64_t cols) {
  const auto dt = std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat;
  return at::from_blob(const_cast<acc_t*>(p), {rows, cols}, at::TensorOptions().dtype(dt));
}

// tile (nq x nk, row stride nk) = Q_t K_t^T, unscaled. The forward and the backward compute it with
// the same call on the same shapes and scale it the same way (s = t * scale, elementwise), so the
// backward's S is bitwise the forward's: exp(S_ij - lse_i) of a one-key row is exactly 1.
template <typename acc_t>
void tile_products(const acc_t* q, const acc_t* k, int64_t nq, int64_t nk, int64_t D, acc_t* tile) {
  auto out = view2d(tile, nq, nk);
  if (D == 0) {
    out.zero_();
    return;
  }
  // beta = 0: BLAS does not read the buffer's stale contents (no NaN from them).
  at::addmm_out(out, out, view2d(q, nq, D), view2d(k, nk, D).t(), /*beta=*/0, /*alpha=*/1);
}

template <typename acc_t>
void scale_tile(acc_t* tile, int64_t n, acc_t scale) {
  at::vec::map([scale](auto t) { return t * decltype(t)(scale); }, tile, tile, n);
}

// ---- forward ----------------------------------------------------------------------------------

// Row direction of one tile: each row's (max, sum exp(s - max)) merged into its running lse.
template <typename acc_t>
void merge_tile_rows(const acc_t* tile, int64_t nq, int64_t nk, Lse<acc_t>* run) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const int64_t nv = nk - nk % V;
  for (int64_t r = 0; r < nq; ++r) {
    const acc_t* s = tile + r * nk;
    Vec vmax(-fl_inf<acc_t>());
    for (int64_t j = 0; j < nv; j += V) vmax = fl_max(vmax, Vec::loadu(s + j));
    acc_t m = reduce_max(vmax);
    for (int64_t j = nv; j < nk; ++j) m = fl_max(m, s[j]);
    // An all -inf row part (or a NaN max) is passed on as is: merge ignores -inf parts and lets NaN win.
    acc_t sum = 0;
    if (m != -fl_inf<acc_t>()) {
      const Vec vm(m);
      Vec s0(acc_t(0)), s1(acc_t(0));
      int64_t j = 0;
      for (; j + 2 * V <= nv; j += 2 * V) {
        s0 = s0 + fl_exp(Vec::loadu(s + j) - vm);
        s1 = s1 + fl_exp(Vec::loadu(s + j + V) - vm);
      }
      for (; j < nv; j += V) s0 = s0 + fl_exp(Vec::loadu(s + j) - vm);
      sum = reduce_sum(s0 + s1);
      for (j = nv; j < nk; ++j) sum += fl_exp(s[j] - m);
    }
    run[r] = info_nce::merge_part(run[r], m, sum);
  }
}

// Column direction of one tile: each column's (max, sum exp(s - max)) over the tile's rows, merged
// into the part's running column lse. Row-major sweeps over the tile with per-column vectors.
template <typename acc_t>
void merge_tile_cols(const acc_t* tile, int64_t nq, int64_t nk, acc_t* cmax, acc_t* csum, Lse<acc_t>* run) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const int64_t nv = nk - nk % V;
  std::fill(cmax, cmax + nk, -fl_inf<acc_t>());
  std::fill(csum, csum + nk, acc_t(0));
  for (int64_t r = 0; r < nq; ++r) {
    const acc_t* s = tile + r * nk;
    for (int64_t j = 0; j < nv; j += V) fl_max(Vec::loadu(cmax + j), Vec::loadu(s + j)).store(cmax + j);
    for (int64_t j = nv; j < nk; ++j) cmax[j] = fl_max(cmax[j], s[j]);
  }
  // exp(-inf - -inf) is NaN in a column that is all -inf; merge_part ignores that part's sum.
  for (int64_t r = 0; r < nq; ++r) {
    const acc_t* s = tile + r * nk;
    for (int64_t j = 0; j < nv; j += V) {
      (Vec::loadu(csum + j) + fl_exp(Vec::loadu(s + j) - Vec::loadu(cmax + j))).store(csum + j);
    }
    for (int64_t j = nv; j < nk; ++j) csum[j] += fl_exp(s[j] - cmax[j]);
  }
  for (int64_t j = 0; j < nk; ++j) run[j] = info_nce::merge_part(run[j], cmax[j], csum[j]);
}

// Which keys are query i's positives (info_nce_math.h's P(i)): key labels_i (i without labels), or with
// key groups every key j with key_groups_j == labels_i.
struct Positives {
  const int64_t* labels;
  const int64_t* key_groups;
  int64_t label(int64_t i) const { return labels ? labels[i] : i; }
  // f(j) for every positive column j of label's row in the tile's columns [j0, j0 + nk), j tile-relative.
  template <typename F>
  void in_tile(int64_t label, int64_t j0, int64_t nk, F&& f) const {
    if (key_groups == nullptr) {
      if (label >= j0 && label < j0 + nk) f(label - j0);
      return;
    }
    for (int64_t j = 0; j < nk; ++j) {
      if (key_groups[j0 + j] == label) f(j);
    }
  }
};

template <typename acc_t>
void lse_fwd_kernel(const acc_t* q, const acc_t* k, int64_t N, int64_t M, int64_t D, acc_t scale, bool cols,
                    const Positives& P, acc_t* lse_r, acc_t* lse_c, acc_t* pos, int64_t* npos) {
  const int64_t bq = query_tile_rows(N);
  const int64_t q_tiles = ceil_div(N, bq), k_tiles = ceil_div(M, kBK);
  const int64_t parts = num_parts(q_tiles);
  std::vector<Lse<acc_t>> col_run(cols ? parts * M : 0, info_nce::empty_lse<acc_t>());
  at::parallel_for(0, parts, 1, [&](int64_t p_begin, int64_t p_end) {
    std::vector<acc_t> tile(kBQ * kBK), cmax(kBK), csum(kBK);
    std::vector<Lse<acc_t>> row_run(kBQ);
    std::vector<double> pos_sum(kBQ);
    std::vector<int64_t> pos_count(kBQ);
    for (int64_t p = p_begin; p < p_end; ++p) {
      const auto [t_begin, t_end] = part_tiles(p, parts, q_tiles);
      for (int64_t qt = t_begin; qt < t_end; ++qt) {
        const int64_t i0 = qt * bq, nq = std::min(bq, N - i0);
        std::fill(row_run.begin(), row_run.end(), info_nce::empty_lse<acc_t>());
        std::fill(pos_sum.begin(), pos_sum.end(), 0.0);
        std::fill(pos_count.begin(), pos_count.end(), 0);
        for (int64_t kt = 0; kt < k_tiles; ++kt) {
          const int64_t j0 = kt * kBK, nk = std::min(kBK, M - j0);
          tile_products(q + i0 * D, k + j0 * D, nq, nk, D, tile.data());
          scale_tile(tile.data(), nq * nk, scale);
          for (int64_t r = 0; r < nq; ++r) {  // the positives, from the same S as the lse
            P.in_tile(P.label(i0 + r), j0, nk, [&](int64_t j) {
              pos_sum[r] += static_cast<double>(tile[r * nk + j]);
              ++pos_count[r];
            });
          }
          merge_tile_rows(tile.data(), nq, nk, row_run.data());
          if (cols) merge_tile_cols(tile.data(), nq, nk, cmax.data(), csum.data(), col_run.data() + p * M + j0);
        }
        for (int64_t r = 0; r < nq; ++r) {
          lse_r[i0 + r] = info_nce::finish(row_run[r]);
          // One positive: its S exactly. None (an out-of-range label, an empty group): NaN.
          pos[i0 + r] = pos_count[r] ? static_cast<acc_t>(pos_sum[r] / static_cast<double>(pos_count[r]))
                                     : std::numeric_limits<acc_t>::quiet_NaN();
          npos[i0 + r] = pos_count[r];
        }
      }
    }
  });
  if (!cols) return;
  at::parallel_for(0, M, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      auto merged = col_run[j];
      for (int64_t p = 1; p < parts; ++p) merged = info_nce::merge(merged, col_run[p * M + j]);
      lse_c[j] = info_nce::finish(merged);
    }
  });
}

// ---- backward ---------------------------------------------------------------------------------

// Per-row inputs of one tile's rows: g, lse_r, the positives' weight u (nullptr: none) and count, the
// positives, and the rows' shifts c.
template <typename acc_t>
struct TileRows {
  const acc_t* g;
  const acc_t* lse_r;
  const acc_t* u;
  const int64_t* npos;
  const Positives* P;
  int64_t i0, j0;        // the tile's first row and column
  const acc_t* c;        // the shifts c_i of (3'), from the tile's first row
};

// One tile of (1): on entry the unscaled products T = Q_t K_t^T, on exit scale * P (what both
// gradient products need). Adds the tile's parts of (3') (info_nce_math.h): per row sum_j e_ij (T_ij -
// c_i) and sum_j e_ij to row_num / row_den (nq rows), the positives' T - c to row_pos, and with the
// columns the same per column over the tile's rows, shifted by cc, to col_num / col_den (nk columns;
// cnum / cden are the tile's float32 scratch for them).
template <typename acc_t>
void tile_grad_s(acc_t* tile, int64_t nq, int64_t nk, acc_t scale, const TileRows<acc_t>& rows, const acc_t* h,
                 const acc_t* lse_c, const acc_t* cc, double* row_num, double* row_den, double* row_pos, acc_t* cnum,
                 acc_t* cden, double* col_num, double* col_den, int64_t* pos_j, acc_t* pos_t) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const int64_t nv = nk - nk % V;
  const bool has_cols = h != nullptr;
  const Vec vscale(scale), zero(acc_t(0));
  if (has_cols) {
    std::fill(cnum, cnum + nk, acc_t(0));
    std::fill(cden, cden + nk, acc_t(0));
  }
  for (int64_t r = 0; r < nq; ++r) {
    acc_t* t = tile + r * nk;
    const acc_t gr = rows.g[r], lr = rows.lse_r[r], cr = rows.c[r];
    const acc_t ur = rows.u ? rows.u[r] : acc_t(0);
    if (gr == acc_t(0) && ur == acc_t(0) && !has_cols) {  // the row has no gradient at all
      std::fill(t, t + nk, acc_t(0));
      continue;
    }
    // The row's positives in this tile, their T read before the loop overwrites it with P.
    int64_t n_here = 0;
    rows.P->in_tile(rows.P->label(rows.i0 + r), rows.j0, nk, [&](int64_t j) {
      pos_j[n_here] = j;
      pos_t[n_here++] = t[j];
    });
    // The vector form of grad_s (info_nce_math.h), term by term: g e_r, plus h e_c where h != 0; the
    // positive's u is added to its element below.
    const Vec vg(gr), vlr(lr), vc(cr);
    Vec num(acc_t(0)), den(acc_t(0));
    for (int64_t j = 0; j < nv; j += V) {
      const Vec tv = Vec::loadu(t + j);
      const Vec s = tv * vscale;
      const Vec er = gr == acc_t(0) ? zero : fl_exp(s - vlr);
      Vec p = vg * er;
      if (has_cols) {
        const Vec hv = Vec::loadu(h + j);
        const Vec ec = Vec::blendv(zero, fl_exp(s - Vec::loadu(lse_c + j)), hv != zero);
        p = p + hv * ec;
        (Vec::loadu(cnum + j) + ec * (tv - Vec::loadu(cc + j))).store(cnum + j);
        (Vec::loadu(cden + j) + ec).store(cden + j);
      }
      num = num + er * (tv - vc);
      den = den + er;
      (p * vscale).store(t + j);
    }
    acc_t rn = reduce_sum(num), rd = reduce_sum(den);
    for (int64_t j = nv; j < nk; ++j) {
      const acc_t s = t[j] * scale;
      const acc_t er = info_nce::softmax_weight(s, gr, lr);
      acc_t p = gr * er;
      if (has_cols) {
        const acc_t ec = info_nce::softmax_weight(s, h[j], lse_c[j]);
        p += h[j] * ec;
        cnum[j] += ec * (t[j] - cc[j]);
        cden[j] += ec;
      }
      rn += er * (t[j] - cr);
      rd += er;
      t[j] = p * scale;
    }
    // Each positive's element again, whole: (g e + h e_c) + u / |P| before the one multiplication by
    // scale, so that a one-hot row cancels before rounding (grad_s with u).
    const acc_t u_each = n_here ? ur / static_cast<acc_t>(rows.npos[r]) : acc_t(0);
    for (int64_t k = 0; k < n_here; ++k) {
      const int64_t j = pos_j[k];
      const acc_t s = pos_t[k] * scale;
      t[j] = info_nce::grad_s(s, gr, lr, has_cols, has_cols ? h[j] : acc_t(0), has_cols ? lse_c[j] : acc_t(0),
                              u_each) * scale;
      row_pos[r] += static_cast<double>(pos_t[k] - cr);
    }
    row_num[r] += static_cast<double>(rn);
    row_den[r] += static_cast<double>(rd);
  }
  if (has_cols) {
    for (int64_t j = 0; j < nk; ++j) {
      col_num[j] += static_cast<double>(cnum[j]);
      col_den[j] += static_cast<double>(cden[j]);
    }
  }
}

template <typename acc_t>
double lse_bwd_kernel(const acc_t* q, const acc_t* k, int64_t N, int64_t M, int64_t D, acc_t scale, const acc_t* g,
                      const acc_t* h, const acc_t* u, const acc_t* lse_r, const acc_t* lse_c, const acc_t* pos,
                      const int64_t* npos, const Positives& P, acc_t* dq, acc_t* dk) {
  const int64_t bq = query_tile_rows(N);
  const int64_t q_tiles = ceil_div(N, bq), k_tiles = ceil_div(M, kBK);
  const int64_t parts = num_parts(q_tiles);
  // Part 0 accumulates into dk itself; the others into their own (M, D) buffers, taken from
  // PyTorch's allocator (so that memory profiles see them) and zeroed by their own thread.
  const auto dt = std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat;
  auto extra_t = at::empty({parts > 1 ? (parts - 1) * M * D : 0}, at::TensorOptions().dtype(dt));
  acc_t* extra = static_cast<acc_t*>(extra_t.mutable_data_ptr());
  // (3')'s shifts: c_i per query row; c'_j = c_j per key column j < N, else 0 (with the columns).
  std::vector<acc_t> c(N), cc(h ? M : 0, acc_t(0));
  for (int64_t i = 0; i < N; ++i) c[i] = info_nce::shift_of(pos[i], scale);
  for (int64_t j = 0; j < std::min<int64_t>(N, cc.size()); ++j) cc[j] = c[j];
  // (3'): the rows' part per part; the columns' sums per part (num then den, M each), merged below.
  std::vector<double> dscale_part(parts, 0.0);
  std::vector<double> col_sums(h ? parts * 2 * M : 0, 0.0);
  at::parallel_for(0, parts, 1, [&](int64_t p_begin, int64_t p_end) {
    std::vector<acc_t> tile(kBQ * kBK), cnum(h ? kBK : 0), cden(h ? kBK : 0), pos_t(kBK);
    std::vector<double> row_num(kBQ), row_den(kBQ), row_pos(kBQ);
    std::vector<int64_t> pos_j(kBK);
    for (int64_t p = p_begin; p < p_end; ++p) {
      acc_t* dkp = p == 0 ? dk : extra + (p - 1) * M * D;
      std::fill(dkp, dkp + M * D, acc_t(0));
      double* col_num = h ? col_sums.data() + p * 2 * M : nullptr;
      double* col_den = h ? col_num + M : nullptr;
      const auto [t_begin, t_end] = part_tiles(p, parts, q_tiles);
      double ds = 0;
      for (int64_t qt = t_begin; qt < t_end; ++qt) {
        const int64_t i0 = qt * bq, nq = std::min(bq, N - i0);
        auto q_t = view2d(q + i0 * D, nq, D);
        auto dq_t = view2d(dq + i0 * D, nq, D);
        dq_t.zero_();
        std::fill(row_num.begin(), row_num.end(), 0.0);
        std::fill(row_den.begin(), row_den.end(), 0.0);
        std::fill(row_pos.begin(), row_pos.end(), 0.0);
        for (int64_t kt = 0; kt < k_tiles; ++kt) {
          const int64_t j0 = kt * kBK, nk = std::min(kBK, M - j0);
          tile_products(q + i0 * D, k + j0 * D, nq, nk, D, tile.data());
          const TileRows<acc_t> rows{g + i0, lse_r + i0, u ? u + i0 : nullptr, npos + i0, &P, i0, j0, c.data() + i0};
          tile_grad_s(tile.data(), nq, nk, scale, rows, h ? h + j0 : nullptr, lse_c ? lse_c + j0 : nullptr,
                      h ? cc.data() + j0 : nullptr, row_num.data(), row_den.data(), row_pos.data(), cnum.data(),
                      cden.data(), h ? col_num + j0 : nullptr, h ? col_den + j0 : nullptr, pos_j.data(), pos_t.data());
          if (D == 0) continue;
          auto p_t = view2d(tile.data(), nq, nk);
          dq_t.addmm_(p_t, view2d(k + j0 * D, nk, D));                      // (2): dQ_t += (scale P) K_t
          view2d(dkp + j0 * D, nk, D).addmm_(p_t.t(), q_t);                 // (2): dK_t += (scale P)^T Q_t
        }
        for (int64_t r = 0; r < nq; ++r) {
          // mean_P (T - c); NaN for a row without positives (its u is 0 from the caller, or NaN follows)
          const double t_minus_c = npos[i0 + r] ? row_pos[r] / static_cast<double>(npos[i0 + r])
                                                : std::numeric_limits<double>::quiet_NaN();
          ds += info_nce::dscale_row(g[i0 + r], row_num[r], row_den[r], u ? u[i0 + r] : acc_t(0), t_minus_c,
                                     c[i0 + r]);
        }
      }
      dscale_part[p] = ds;
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
  double ds = 0;
  for (int64_t p = 0; p < parts; ++p) ds += dscale_part[p];
  if (h) {  // the columns' part of (3'), each column's sums merged in part order
    for (int64_t j = 0; j < M; ++j) {
      if (h[j] == acc_t(0)) continue;
      double num = 0, den = 0;
      for (int64_t p = 0; p < parts; ++p) {
        num += col_sums[p * 2 * M + j];
        den += col_sums[p * 2 * M + M + j];
      }
      ds += info_nce::dscale_col(h[j], num, den, cc[j]);
    }
  }
  return ds;
}

// ---- forward with the gradients (reduced losses) ---------------------------------------------
//
// With reduction mean / sum the upstream gradient of every row's loss lse_r_i - pos_i is one scalar,
// known only in the backward, and the backward is linear in it: the gradients of
//   L = sum_{i with a positive} (lse_r_i - pos_i)          ((1)-(3') with g_i = 1, u_i = -1)
// are computed here, in the forward, and the backward scales them (as linear_cross_entropy does).
// What that buys on CPU: the lse of a query is complete before its gradient is needed when all its
// similarities are at hand, so each block of bq queries takes the strip S_b^T = K Q_b^T (M x bq, one
// per thread: bq * M floats, a few MB, never N x M), each query's max, exp(S - max) once per element
// in place, then
//   dQ_b = (scale P_b) K   and   dK += (scale P_b)^T Q_b:
// 3 GEMMs and one exp per element, against the two-pass kernels' 4 GEMMs (S is recomputed in their
// backward) and two exps (the forward's sum and the backward's P). The rank-bq update of dK reads and
// writes M x D floats per block; bq = 256 keeps that traffic small against the GEMMs' flops.
//
// Why the strip is key-major (M x bq, a query per column): K Q_b^T ran at 64-70 GFLOP/s on one
// thread here against 55-60 for Q_b K^T (MKL, 2-core EPYC, M = 8192, D = bq = 256), and the two
// gradient GEMMs are as fast either way. The per-query passes then run over 2V adjacent columns at
// a time (one cache line per key: M x 64 bytes, most of it in L2), vectorized across queries.
//
// Query i's softmax weights are e'_ij / den_i with e'_ij = exp(S_ij - max_i), den_i = sum_j e'_ij:
// the ratio is not touched by the rounding of lse_i. (3')'s softmax mean sum_j e_ij (T_ij - c_i) /
// sum_j e_ij is the same ratio with e' for e. The strip keeps e' unscaled: the column factor
// w_i = scale * g_i / den_i goes into the GEMMs' small operands instead (dK += E'^T (w Q_b),
// dQ_b = w (E' K)), which saves a pass over the strip. A positive's element is made whole first,
// (g e'/den + u / |P|) * scale as grad_s has it (a one-hot row cancels before rounding), and stored
// divided by w_i.

// Largest S strip per thread, in elements (8 MB of float32: bq = 256 queries at M = 8192 keys). More
// keys take fewer queries per block, down to kMinFusedRows: the strip is then 16 * M elements per
// thread, still O(M) like the (M, D) gradient partial every thread holds.
constexpr int64_t kFusedStripElems = int64_t(1) << 21;
constexpr int64_t kFusedBQ = 256;
constexpr int64_t kMinFusedRows = 16;

// Queries per block of the fused kernel: as query_tile_rows, up to kFusedBQ and the strip budget.
int64_t fused_block_rows(int64_t N, int64_t M) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t per_thread = (ceil_div(N, threads) + 15) / 16 * 16;
  const int64_t budget = M > 0 ? kFusedStripElems / M / 16 * 16 : kFusedBQ;
  return std::max<int64_t>(kMinFusedRows, std::min({per_thread, kFusedBQ, budget}));
}

// Per-thread scratch of the fused kernel's column groups: the positives' key indices of the group's
// columns, one list after the other, and their values.
template <typename acc_t>
struct FusedScratch {
  std::vector<int64_t> pos_j;
  std::vector<acc_t> pos_v;
};

// Columns [c0, c0 + 2V) of the strip st (M rows, row stride ldb; column c is query i0 + c; columns
// from nq on hold stale values, computed over and ignored). On entry the unscaled products T, on exit
// E' with the positives' elements as above; w[c] the column factor. Writes lse_r, pos, npos of the
// live columns; adds their (3') to ds.
template <typename acc_t>
void fused_group(acc_t* st, int64_t M, int64_t ldb, int64_t c0, int64_t nq, int64_t i0, acc_t scale,
                 const Positives& P, bool want_ds, FusedScratch<acc_t>& scratch, acc_t* lse_r, acc_t* pos,
                 int64_t* npos, acc_t* w, double& ds) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size(), G = 2 * V;
  const int64_t cn = std::min(G, nq - c0);
  auto at_ = [&](int64_t j, int64_t c) -> acc_t& { return st[j * ldb + c0 + c]; };
  // The positives, their pos (as lse_fwd_kernel has it: the mean of scale * T), the shift c of (3')
  // and the mean of T - c over them, all from T before it is overwritten.
  int64_t off[G + 1];
  alignas(64) acc_t shift[G], gcol[G];
  double t_minus_c[G];
  auto& pj = scratch.pos_j;
  pj.clear();
  for (int64_t c = 0; c < G; ++c) {
    off[c] = static_cast<int64_t>(pj.size());
    shift[c] = acc_t(0);
    gcol[c] = acc_t(0);
    t_minus_c[c] = 0;
    if (c >= cn) continue;
    P.in_tile(P.label(i0 + c0 + c), 0, M, [&](int64_t j) { pj.push_back(j); });
    const int64_t n = static_cast<int64_t>(pj.size()) - off[c];
    double sum = 0;
    for (int64_t k = off[c]; k < off[c] + n; ++k) sum += static_cast<double>(at_(pj[k], c) * scale);
    const acc_t p = n ? static_cast<acc_t>(sum / static_cast<double>(n)) : std::numeric_limits<acc_t>::quiet_NaN();
    pos[i0 + c0 + c] = p;
    npos[i0 + c0 + c] = n;
    shift[c] = info_nce::shift_of(p, scale);
    gcol[c] = n ? acc_t(1) : acc_t(0);
    double tmc = 0;
    for (int64_t k = off[c]; k < off[c] + n; ++k) tmc += static_cast<double>(at_(pj[k], c) - shift[c]);
    t_minus_c[c] = n ? tmc / static_cast<double>(n) : 0.0;
  }
  off[G] = static_cast<int64_t>(pj.size());
  auto& pv = scratch.pos_v;
  pv.resize(pj.size());

  const Vec vscale(scale);
  Vec m0(-fl_inf<acc_t>()), m1(-fl_inf<acc_t>());
  for (int64_t j = 0; j < M; ++j) {
    const acc_t* r = st + j * ldb + c0;
    m0 = fl_max(m0, Vec::loadu(r) * vscale);
    m1 = fl_max(m1, Vec::loadu(r + V) * vscale);
  }
  alignas(64) acc_t mx[G];
  m0.store(mx);
  m1.store(mx + V);
  bool finite = true;
  for (int64_t c = 0; c < cn; ++c) finite = finite && mx[c] > -fl_inf<acc_t>() && mx[c] < fl_inf<acc_t>();

  if (!finite) {
    // A query with no finite maximum (-inf everywhere, +inf or NaN somewhere) in the group: the
    // two-exp formulas of the two-pass kernels, column by column, so that inf and NaN come out as
    // they do there. The strip then holds scale * dL/dS itself (w = 1).
    for (int64_t c = 0; c < cn; ++c) {
      const acc_t g = gcol[c], m = mx[c];
      acc_t sum = 0;
      if (m != -fl_inf<acc_t>()) {
        for (int64_t j = 0; j < M; ++j) sum += fl_exp(at_(j, c) * scale - m);
      }
      const acc_t lse = info_nce::finish(info_nce::merge_part(info_nce::empty_lse<acc_t>(), m, sum));
      const int64_t n = off[c + 1] - off[c];
      const acc_t u_each = n ? -g / static_cast<acc_t>(n) : acc_t(0);
      for (int64_t k = off[c]; k < off[c + 1]; ++k) {
        pv[k] = info_nce::grad_s(at_(pj[k], c) * scale, g, lse, false, acc_t(0), acc_t(0), u_each) * scale;
      }
      double num = 0, den = 0;
      for (int64_t j = 0; j < M; ++j) {
        acc_t& t = at_(j, c);
        const acc_t e = info_nce::softmax_weight(t * scale, g, lse);
        num += static_cast<double>(e * (t - shift[c]));
        den += static_cast<double>(e);
        t = g * e * scale;
      }
      for (int64_t k = off[c]; k < off[c + 1]; ++k) at_(pj[k], c) = pv[k];
      lse_r[i0 + c0 + c] = lse;
      w[c0 + c] = acc_t(1);
      if (want_ds && n) ds += info_nce::dscale_row(g, num, den, -g, t_minus_c[c], shift[c]);
    }
    return;
  }

  // e' = exp(s - max) in place, its column sums, and (3')'s numerators on the same e'. Sums in float
  // over kBK keys at a time, merged in double (the two-pass kernels' precision: per tile, then double).
  for (int64_t c = cn; c < G; ++c) mx[c] = acc_t(0);  // stale columns: any finite shift
  const Vec vm0 = Vec::loadu(mx), vm1 = Vec::loadu(mx + V);
  const Vec vc0 = Vec::loadu(shift), vc1 = Vec::loadu(shift + V);
  double den[G] = {}, num[G] = {};
  alignas(64) acc_t tmp[G];
  for (int64_t j0 = 0; j0 < M; j0 += kBK) {
    const int64_t j1 = std::min(M, j0 + kBK);
    Vec d0(acc_t(0)), d1(acc_t(0)), n0(acc_t(0)), n1(acc_t(0));
    for (int64_t j = j0; j < j1; ++j) {
      acc_t* r = st + j * ldb + c0;
      const Vec t0 = Vec::loadu(r), t1 = Vec::loadu(r + V);
      const Vec e0 = fl_exp(t0 * vscale - vm0), e1 = fl_exp(t1 * vscale - vm1);
      e0.store(r);
      e1.store(r + V);
      d0 = d0 + e0;
      d1 = d1 + e1;
      if (want_ds) {
        n0 = n0 + e0 * (t0 - vc0);
        n1 = n1 + e1 * (t1 - vc1);
      }
    }
    d0.store(tmp);
    d1.store(tmp + V);
    for (int64_t c = 0; c < G; ++c) den[c] += static_cast<double>(tmp[c]);
    if (want_ds) {
      n0.store(tmp);
      n1.store(tmp + V);
      for (int64_t c = 0; c < G; ++c) num[c] += static_cast<double>(tmp[c]);
    }
  }
  for (int64_t c = 0; c < cn; ++c) {
    const acc_t g = gcol[c], d = static_cast<acc_t>(den[c]);
    lse_r[i0 + c0 + c] = mx[c] + fl_log(d);  // info_nce::finish of (max, den)
    const int64_t n = off[c + 1] - off[c];
    const acc_t u_each = n ? -g / static_cast<acc_t>(n) : acc_t(0);
    // The positives whole (grad_s with e = e' / den), before any scaling of the column.
    for (int64_t k = off[c]; k < off[c + 1]; ++k) pv[k] = (g * (at_(pj[k], c) / d) + u_each) * scale;
    const acc_t wc = g * scale / d;
    if (wc != acc_t(0) && wc - wc == acc_t(0)) {
      w[c0 + c] = wc;
      for (int64_t k = off[c]; k < off[c + 1]; ++k) at_(pj[k], c) = pv[k] / wc;
    } else {
      // No factor to divide by (a query without positives, a zero or overflowing scale): the
      // column scaled in place, w = 1.
      for (int64_t j = 0; j < M; ++j) at_(j, c) *= wc;
      for (int64_t k = off[c]; k < off[c + 1]; ++k) at_(pj[k], c) = pv[k];
      w[c0 + c] = acc_t(1);
    }
    if (want_ds && n) ds += info_nce::dscale_row(g, num[c], den[c], -g, t_minus_c[c], shift[c]);
  }
}

// The fused forward: lse_r, pos, npos (N each) and the gradients of L above: dq (N x D; nullptr: not
// wanted), dk (M x D; nullptr: not wanted); returns d L / d scale (0 when !want_ds). Parallel split
// and merge orders as lse_bwd_kernel's: deterministic for a given thread count.
template <typename acc_t>
double fused_fwd_grad_kernel(const acc_t* q, const acc_t* k, int64_t N, int64_t M, int64_t D, acc_t scale,
                             const Positives& P, bool want_ds, acc_t* lse_r, acc_t* pos, int64_t* npos, acc_t* dq,
                             acc_t* dk) {
  constexpr int64_t G = 2 * Vectorized<acc_t>::size();
  const int64_t bq = fused_block_rows(N, M);
  const int64_t ldb = ceil_div(bq, G) * G;  // whole column groups; the strip's row stride
  const int64_t q_tiles = ceil_div(N, bq);
  const int64_t parts = num_parts(q_tiles);
  const auto dt = std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat;
  const auto opts = at::TensorOptions().dtype(dt);
  // Part 0 accumulates into dk itself, the others into their own (M, D) buffers (PyTorch's allocator,
  // so that memory profiles see them), summed in part order below.
  const int64_t extra_parts = dk != nullptr && parts > 1 ? parts - 1 : 0;
  auto extra_t = at::empty({extra_parts * M * D}, opts);
  acc_t* extra = static_cast<acc_t*>(extra_t.mutable_data_ptr());
  // The strips, one per part, from the allocator too. A block of fewer than ldb queries zeroes its
  // padding columns (read by its last column group) below.
  auto strips_t = at::empty({parts * M * ldb}, opts);
  acc_t* strips = static_cast<acc_t*>(strips_t.mutable_data_ptr());
  auto wq_t = at::empty({parts * ldb * (D + 1)}, opts);  // per part: w (ldb), then w Q_b (bq x D)
  acc_t* wq = static_cast<acc_t*>(wq_t.mutable_data_ptr());
  std::vector<double> dscale_part(parts, 0.0);
  const auto k_mat = view2d(k, M, D);
  at::parallel_for(0, parts, 1, [&](int64_t p_begin, int64_t p_end) {
    FusedScratch<acc_t> scratch;
    for (int64_t p = p_begin; p < p_end; ++p) {
      acc_t* st = strips + p * M * ldb;
      acc_t* w = wq + p * ldb * (D + 1);
      acc_t* qs = w + ldb;
      acc_t* dkp = dk == nullptr ? nullptr : p == 0 ? dk : extra + (p - 1) * M * D;
      if (dkp != nullptr) std::fill(dkp, dkp + M * D, acc_t(0));
      const auto [t_begin, t_end] = part_tiles(p, parts, q_tiles);
      double ds = 0;
      for (int64_t qt = t_begin; qt < t_end; ++qt) {
        const int64_t i0 = qt * bq, nq = std::min(bq, N - i0);
        auto s_t = at::from_blob(st, {M, nq}, {ldb, 1}, opts);  // S_b^T, unscaled
        const auto q_b = view2d(q + i0 * D, nq, D);
        if (D > 0) {
          at::addmm_out(s_t, s_t, k_mat, q_b.t(), /*beta=*/0, /*alpha=*/1);
        } else {
          s_t.zero_();
        }
        if (const int64_t pad = std::min(ldb, ceil_div(nq, G) * G) - nq; pad > 0) {
          for (int64_t j = 0; j < M; ++j) std::fill_n(st + j * ldb + nq, pad, acc_t(0));
        }
        for (int64_t c0 = 0; c0 < nq; c0 += G) {
          fused_group(st, M, ldb, c0, nq, i0, scale, P, want_ds, scratch, lse_r, pos, npos, w, ds);
        }
        if (D == 0) continue;
        if (dq != nullptr) {
          auto dq_b = view2d(dq + i0 * D, nq, D);
          at::addmm_out(dq_b, dq_b, s_t.t(), k_mat, /*beta=*/0, /*alpha=*/1);  // E' K, then times w per row
          for (int64_t r = 0; r < nq; ++r) {
            const acc_t wr = w[r];
            at::vec::map([wr](auto x) { return x * decltype(x)(wr); }, dq + (i0 + r) * D, dq + (i0 + r) * D, D);
          }
        }
        if (dkp != nullptr) {
          for (int64_t r = 0; r < nq; ++r) {
            const acc_t wr = w[r];
            at::vec::map([wr](auto x) { return x * decltype(x)(wr); }, qs + r * D, q + (i0 + r) * D, D);
          }
          auto dk_t = view2d(dkp, M, D);
          at::addmm_out(dk_t, dk_t, s_t, view2d(qs, nq, D));  // dK += E'^T (w Q_b)
        }
      }
      dscale_part[p] = ds;
    }
  });
  if (extra_parts > 0) {
    at::parallel_for(0, M * D, 16384, [&](int64_t begin, int64_t end) {
      for (int64_t p = 1; p < parts; ++p) {
        const acc_t* src = extra + (p - 1) * M * D;
        at::vec::map2([](auto a, auto b) { return a + b; }, dk + begin, dk + begin, src + begin, end - begin);
      }
    });
  }
  double ds = 0;
  for (int64_t p = 0; p < parts; ++p) ds += dscale_part[p];
  return ds;
}

// bf16/fp16 inputs run the float32 kernels on float32 copies (exact conversions).
at::Tensor as_acc(const at::Tensor& x, at::ScalarType acc) {
  return x.scalar_type() == acc ? x : x.to(acc);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> info_nce_lse_fwd_cpu(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& scale, bool cols,
    const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& key_groups) {
  const auto acc = check_info_nce_args(query, key, scale);
  check_info_nce_labels(labels, query, key, key_groups);
  const int64_t N = query.size(0), M = key.size(0), D = query.size(1);
  auto lse_rows = at::empty({N}, query.options().dtype(acc));
  auto lse_cols = at::empty({cols ? M : 0}, query.options().dtype(acc));
  auto pos = at::empty({N}, query.options().dtype(acc));
  auto npos = at::empty({N}, query.options().dtype(at::kLong));
  const auto q = as_acc(query, acc), k = as_acc(key, acc);
  const auto lab = labels ? labels->contiguous() : at::Tensor();
  const auto kg = key_groups ? key_groups->contiguous() : at::Tensor();
  const Positives P{labels ? lab.const_data_ptr<int64_t>() : nullptr, key_groups ? kg.const_data_ptr<int64_t>() : nullptr};
  AT_DISPATCH_FLOATING_TYPES(acc, "info_nce_lse_fwd_cpu", [&] {
    lse_fwd_kernel<scalar_t>(q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), N, M, D,
                             scale.item<scalar_t>(), cols, P, lse_rows.mutable_data_ptr<scalar_t>(),
                             cols ? lse_cols.mutable_data_ptr<scalar_t>() : nullptr, pos.mutable_data_ptr<scalar_t>(),
                             npos.mutable_data_ptr<int64_t>());
  });
  return {lse_rows, lse_cols, pos, npos};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> info_nce_lse_bwd_cpu(
    const at::Tensor& grad_rows, const std::optional<at::Tensor>& grad_cols, const std::optional<at::Tensor>& grad_pos,
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& scale, const at::Tensor& lse_rows,
    const std::optional<at::Tensor>& lse_cols, const at::Tensor& pos, const at::Tensor& npos,
    const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& key_groups) {
  check_info_nce_bwd_args(grad_rows, grad_cols, grad_pos, query, key, scale, lse_rows, lse_cols, pos, npos, labels,
                          key_groups);
  const auto acc = query.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t N = query.size(0), M = key.size(0), D = query.size(1);
  const bool cols = grad_cols.has_value();
  const auto q = as_acc(query, acc), k = as_acc(key, acc);
  const auto g = grad_rows.contiguous(), lr = lse_rows.contiguous(), ps = pos.contiguous();
  const auto h = cols ? grad_cols->contiguous() : at::Tensor();
  const auto lc = cols ? lse_cols->contiguous() : at::Tensor();
  const auto u = grad_pos ? grad_pos->contiguous() : at::Tensor();
  const auto lab = labels ? labels->contiguous() : at::Tensor();
  const auto kg = key_groups ? key_groups->contiguous() : at::Tensor();
  const auto np = npos.contiguous();
  const Positives P{labels ? lab.const_data_ptr<int64_t>() : nullptr, key_groups ? kg.const_data_ptr<int64_t>() : nullptr};
  // The gradients are accumulated in the accumulation dtype, in place for float32/float64 inputs.
  auto dq = at::empty({N, D}, query.options().dtype(acc));
  auto dk = at::empty({M, D}, query.options().dtype(acc));
  // d scale in scale's dtype (float64 from fusedloss.functional: see (3') in info_nce_math.h).
  auto dscale = at::empty({}, scale.options());
  cpu::advise_huge_pages(dq.mutable_data_ptr(), dq.nbytes());
  cpu::advise_huge_pages(dk.mutable_data_ptr(), dk.nbytes());
  AT_DISPATCH_FLOATING_TYPES(acc, "info_nce_lse_bwd_cpu", [&] {
    const double ds = lse_bwd_kernel<scalar_t>(
        q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), N, M, D, scale.item<scalar_t>(),
        g.const_data_ptr<scalar_t>(), cols ? h.const_data_ptr<scalar_t>() : nullptr,
        grad_pos ? u.const_data_ptr<scalar_t>() : nullptr, lr.const_data_ptr<scalar_t>(),
        cols ? lc.const_data_ptr<scalar_t>() : nullptr, ps.const_data_ptr<scalar_t>(), np.const_data_ptr<int64_t>(), P,
        dq.mutable_data_ptr<scalar_t>(),
        dk.mutable_data_ptr<scalar_t>());
    dscale.fill_(ds);
  });
  if (query.scalar_type() != acc) {
    dq = dq.to(query.scalar_type());
    dk = dk.to(query.scalar_type());
  }
  return {dq, dk, dscale};
}

// The forward of a reduced loss with its gradients (fusedloss::info_nce_fwd_grad): the loss summed
// over the queries that have a positive, npos, and the gradients of that sum, which the autograd
// (csrc/autograd.cpp) scales by the upstream gradient in the backward.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> info_nce_fwd_grad_cpu(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& scale, const std::optional<at::Tensor>& labels,
    const std::optional<at::Tensor>& key_groups, bool query_grad, bool key_grad, bool scale_grad) {
  const auto acc = check_info_nce_args(query, key, scale);
  check_info_nce_labels(labels, query, key, key_groups);
  const int64_t N = query.size(0), M = key.size(0), D = query.size(1);
  const auto opts = query.options().dtype(acc);
  auto lse_rows = at::empty({N}, opts), pos = at::empty({N}, opts);
  auto npos = at::empty({N}, query.options().dtype(at::kLong));
  auto dq = query_grad ? at::empty({N, D}, opts) : at::empty({0}, opts);
  auto dk = key_grad ? at::empty({M, D}, opts) : at::empty({0}, opts);
  auto dscale = at::zeros({}, scale.options());
  cpu::advise_huge_pages(dq.mutable_data_ptr(), dq.nbytes());
  cpu::advise_huge_pages(dk.mutable_data_ptr(), dk.nbytes());
  const auto q = as_acc(query, acc), k = as_acc(key, acc);
  const auto lab = labels ? labels->contiguous() : at::Tensor();
  const auto kg = key_groups ? key_groups->contiguous() : at::Tensor();
  const Positives P{labels ? lab.const_data_ptr<int64_t>() : nullptr,
                    key_groups ? kg.const_data_ptr<int64_t>() : nullptr};
  AT_DISPATCH_FLOATING_TYPES(acc, "info_nce_fwd_grad_cpu", [&] {
    const scalar_t s = scale.item<scalar_t>();
    scalar_t* dq_p = query_grad ? dq.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* dk_p = key_grad ? dk.mutable_data_ptr<scalar_t>() : nullptr;
    if (!query_grad && !key_grad && !scale_grad) {
      // Nothing to differentiate: the forward alone (1 GEMM).
      lse_fwd_kernel<scalar_t>(q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), N, M, D, s, false, P,
                               lse_rows.mutable_data_ptr<scalar_t>(), nullptr, pos.mutable_data_ptr<scalar_t>(),
                               npos.mutable_data_ptr<int64_t>());
      return;
    }
    const double ds = fused_fwd_grad_kernel<scalar_t>(
        q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), N, M, D, s, P, scale_grad,
        lse_rows.mutable_data_ptr<scalar_t>(), pos.mutable_data_ptr<scalar_t>(), npos.mutable_data_ptr<int64_t>(),
        dq_p, dk_p);
    if (scale_grad) dscale.fill_(ds);
  });
  // Without key groups every query has its one positive (labels are checked above); with them a query
  // whose group has no key is left out of the sum (its pos is NaN).
  const auto rows = at::sub(lse_rows, pos);
  const auto total = key_groups ? at::where(at::gt(npos, 0), rows, at::zeros({}, opts)).sum() : rows.sum();
  if (query.scalar_type() != acc) {
    dq = dq.to(query.scalar_type());
    dk = dk.to(query.scalar_type());
  }
  return {total, npos, dq, dk, dscale};
}

}  // namespace
}  // namespace fusedloss

TORCH_LIBRARY_IMPL(fusedloss, CPU, m) {
  m.impl("info_nce_lse_fwd", &fusedloss::info_nce_lse_fwd_cpu);
  m.impl("info_nce_lse_bwd", &fusedloss::info_nce_lse_bwd_cpu);
  m.impl("info_nce_fwd_grad", &fusedloss::info_nce_fwd_grad_cpu);
}
