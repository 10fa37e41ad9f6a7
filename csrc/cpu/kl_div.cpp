// CPU kernels of the distillation losses (kl_div_fwd, kl_div_bwd). The math and its derivation are in
// fusedloss/kl_div_math.h, shared with the CUDA kernels; this file decides how rows are cut and
// vectorized.
//
// Forward: each pair of rows (student, teacher) is read once from memory, kChunk elements at a time.
// A chunk of both rows, scaled by 1/T, sits in two L1 buffers: a max pass then a sum pass over the
// buffers (exp of both, and the KL's weighted term (3)) cost one read from memory; chunk states are
// merged in order with merge_state. The JSD then takes its second pass over the row (still in L2).
// Backward: one read of both rows and one write of each gradient, elementwise given the stats.
// Rows are independent: at::parallel_for over rows; the split between threads changes no bit.
#define FL_CPU_VEC 1
#include "fusedloss/checks.h"
#include "fusedloss/cpu_utils.h"
#include "fusedloss/kl_div_math.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>

namespace fusedloss {
namespace {

using at::vec::Vectorized;
using cpu::VecIO;
using cpu::reduce_max;
using cpu::reduce_sum;

// Elements per forward chunk: two buffers of 1024 fp32 (8 KB) stay in L1 next to their source lines.
constexpr int64_t kChunk = 1024;

// (3) over one row, kChunk elements at a time.
template <typename scalar_t, typename acc_t>
kl::RowState<acc_t> row_state(const scalar_t* s, const scalar_t* t, int64_t C, const kl::Options<acc_t>& o) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  alignas(64) acc_t xs[kChunk];
  alignas(64) acc_t xt[kChunk];
  auto total = kl::empty_state<acc_t>();
  for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
    const int64_t n = std::min(kChunk, C - c0);
    const int64_t nv = n - n % V;
    // Pass 1: both rows in the accumulation dtype into the L1 buffers, and their (raw) maxima.
    Vec vmax_s(-fl_inf<acc_t>()), vmax_t(-fl_inf<acc_t>());
    for (int64_t i = 0; i < nv; i += V) {
      const Vec a = VecIO<scalar_t>::load(s + c0 + i);
      const Vec b = VecIO<scalar_t>::load(t + c0 + i);
      a.store(xs + i);
      b.store(xt + i);
      vmax_s = fl_max(vmax_s, a);
      vmax_t = fl_max(vmax_t, b);
    }
    acc_t ms = reduce_max(vmax_s), mt = reduce_max(vmax_t);
    for (int64_t i = nv; i < n; ++i) {
      xs[i] = static_cast<acc_t>(s[c0 + i]);
      xt[i] = static_cast<acc_t>(t[c0 + i]);
      ms = fl_max(ms, xs[i]);
      mt = fl_max(mt, xt[i]);
    }
    // Pass 2 over the L1 buffers. An all -inf side subtracts 0 instead of its max: exp(-inf) = 0.
    const acc_t ms0 = ms == -fl_inf<acc_t>() ? acc_t(0) : ms, mt0 = mt == -fl_inf<acc_t>() ? acc_t(0) : mt;
    const Vec vms(ms0), vmt(mt0);
    Vec sa(acc_t(0)), sb(acc_t(0)), w(acc_t(0));
    for (int64_t i = 0; i < nv; i += V) {
      const Vec da = kl::scaled_diff(Vec::loadu(xs + i), vms, o), db = kl::scaled_diff(Vec::loadu(xt + i), vmt, o);
      const Vec ea = fl_exp(da), eb = fl_exp(db);
      sa = sa + ea;
      sb = sb + eb;
      if (o.mode == kl::FORWARD_KL) w = w + kl::w_term(eb, db - da);
      if (o.mode == kl::REVERSE_KL) w = w + kl::w_term(ea, da - db);
    }
    kl::RowState<acc_t> chunk{ms, reduce_sum(sa), mt, reduce_sum(sb), reduce_sum(w)};
    for (int64_t i = nv; i < n; ++i) {
      const acc_t da = kl::scaled_diff(xs[i], ms0, o), db = kl::scaled_diff(xt[i], mt0, o);
      const acc_t ea = fl_exp(da), eb = fl_exp(db);
      chunk.sum_a += ea;
      chunk.sum_b += eb;
      if (o.mode == kl::FORWARD_KL) chunk.w += kl::w_term(eb, db - da);
      if (o.mode == kl::REVERSE_KL) chunk.w += kl::w_term(ea, da - db);
    }
    total = kl::merge_state(total, chunk, o);
  }
  return total;
}

// The JSD's second pass (kl_div_math.h (2), (3)): (Kp, Kq) of one row.
template <typename scalar_t, typename acc_t>
void jsd_row(const scalar_t* s, const scalar_t* t, int64_t C, kl::RowResult<acc_t>& r, const kl::Options<acc_t>& o) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const int64_t nv = C - C % V;
  Vec kp(acc_t(0)), kq(acc_t(0));
  for (int64_t j = 0; j < nv; j += V) {
    kl::jsd_terms<acc_t>(VecIO<scalar_t>::load(s + j), VecIO<scalar_t>::load(t + j), r, o, kp, kq);
  }
  acc_t sp = reduce_sum(kp), sq = reduce_sum(kq);
  for (int64_t j = nv; j < C; ++j) {
    kl::jsd_terms<acc_t>(static_cast<acc_t>(s[j]), static_cast<acc_t>(t[j]), r, o, sp, sq);
  }
  kl::jsd_finish(r, sp, sq, o);
}

template <typename scalar_t>
void kl_fwd_cpu_impl(const at::Tensor& student, const at::Tensor& teacher, const int64_t* target,
                     const kl::Options<at::opmath_type<scalar_t>>& o, at::Tensor& loss, at::Tensor& stats) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = student.size(0), C = student.size(1);
  const int64_t s_stride = student.stride(0), t_stride = teacher.stride(0);
  const scalar_t* s = student.const_data_ptr<scalar_t>();
  const scalar_t* t = teacher.const_data_ptr<scalar_t>();
  acc_t* out = loss.mutable_data_ptr<acc_t>();
  acc_t* st = stats.mutable_data_ptr<acc_t>();
  at::parallel_for(0, N, cpu::grain_items(2 * C), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      acc_t* sr = st + kl::kStats * row;
      if (target != nullptr && kl::is_ignored(target[row], o)) {
        out[row] = 0;
        std::fill(sr, sr + kl::kStats, acc_t(0));
        continue;
      }
      const scalar_t* srow = s + row * s_stride;
      const scalar_t* trow = t + row * t_stride;
      auto r = kl::finish_state(row_state<scalar_t, acc_t>(srow, trow, C, o), o);
      if (o.mode == kl::JSD) jsd_row<scalar_t, acc_t>(srow, trow, C, r, o);
      out[row] = r.loss;
      kl::store_stats(sr, r);
    }
  });
}

template <typename scalar_t>
void kl_bwd_cpu_impl(const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& teacher,
                     const int64_t* target, const at::Tensor& stats, const kl::Options<at::opmath_type<scalar_t>>& o,
                     at::Tensor& grad_s, at::Tensor* grad_t) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const int64_t N = student.size(0), C = student.size(1);
  const int64_t s_stride = student.stride(0), t_stride = teacher.stride(0), g_stride = grad_loss.stride(0);
  const scalar_t* s = student.const_data_ptr<scalar_t>();
  const scalar_t* t = teacher.const_data_ptr<scalar_t>();
  const acc_t* g = grad_loss.const_data_ptr<acc_t>();
  const acc_t* st = stats.const_data_ptr<acc_t>();
  scalar_t* gs = grad_s.mutable_data_ptr<scalar_t>();
  scalar_t* gt = grad_t ? grad_t->mutable_data_ptr<scalar_t>() : nullptr;
  const int64_t nv = C - C % V;
  at::parallel_for(0, N, cpu::grain_items(3 * C), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      scalar_t* gsr = gs + row * C;
      scalar_t* gtr = gt ? gt + row * C : nullptr;
      if (target != nullptr && kl::is_ignored(target[row], o)) {
        std::fill(gsr, gsr + C, scalar_t(0));
        if (gtr) std::fill(gtr, gtr + C, scalar_t(0));
        continue;
      }
      const scalar_t* srow = s + row * s_stride;
      const scalar_t* trow = t + row * t_stride;
      const acc_t* sr = st + kl::kStats * row;
      const auto c = kl::grad_coefs(g[row * g_stride], o);
      for (int64_t j = 0; j < nv; j += V) {
        Vec dgs, dgt;
        kl::grad_elem<acc_t>(VecIO<scalar_t>::load(srow + j), VecIO<scalar_t>::load(trow + j), sr, c, o, dgs, dgt);
        VecIO<scalar_t>::store(gsr + j, dgs);
        if (gtr) VecIO<scalar_t>::store(gtr + j, dgt);
      }
      for (int64_t j = nv; j < C; ++j) {
        acc_t dgs, dgt;
        kl::grad_elem<acc_t>(static_cast<acc_t>(srow[j]), static_cast<acc_t>(trow[j]), sr, c, o, dgs, dgt);
        gsr[j] = static_cast<scalar_t>(dgs);
        if (gtr) gtr[j] = static_cast<scalar_t>(dgt);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> kl_div_fwd_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                  const std::optional<at::Tensor>& target, int64_t ignore_index,
                                                  double temperature, double beta, bool jsd) {
  check_kl_args(student, teacher, target, temperature, beta);
  const auto acc = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t N = student.size(0);
  auto loss = at::empty({N}, student.options().dtype(acc));
  auto stats = at::empty({N, kl::kStats}, student.options().dtype(acc));
  if (N == 0) return {loss, stats};
  const int64_t* tp = target.has_value() ? target->const_data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "kl_div_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    kl_fwd_cpu_impl<scalar_t>(student, teacher, tp,
                              kl::make_options<acc_t>(student.size(1), ignore_index, temperature, beta, jsd), loss,
                              stats);
  });
  return {loss, stats};
}

std::tuple<at::Tensor, at::Tensor> kl_div_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& student,
                                                  const at::Tensor& teacher, const std::optional<at::Tensor>& target,
                                                  const at::Tensor& stats, int64_t ignore_index, double temperature,
                                                  double beta, bool jsd, bool teacher_grad) {
  check_kl_args(student, teacher, target, temperature, beta);
  check_row_grad(grad_loss, student, "grad_loss");
  check_kl_stats(stats, student);
  const auto options = student.options().memory_format(at::MemoryFormat::Contiguous);
  auto grad_s = at::empty(student.sizes(), options);
  auto grad_t = teacher_grad ? at::empty(teacher.sizes(), options) : at::empty({0}, options);
  if (grad_s.numel() == 0) return {grad_s, grad_t};
  cpu::advise_huge_pages(grad_s.mutable_data_ptr(), grad_s.nbytes());
  if (teacher_grad) cpu::advise_huge_pages(grad_t.mutable_data_ptr(), grad_t.nbytes());
  const int64_t* tp = target.has_value() ? target->const_data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "kl_div_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    kl_bwd_cpu_impl<scalar_t>(grad_loss, student, teacher, tp, stats,
                              kl::make_options<acc_t>(student.size(1), ignore_index, temperature, beta, jsd), grad_s,
                              teacher_grad ? &grad_t : nullptr);
  });
  return {grad_s, grad_t};
}

}  // namespace
}  // namespace fusedloss

TORCH_LIBRARY_IMPL(fusedloss, CPU, m) {
  m.impl("kl_div_fwd", &fusedloss::kl_div_fwd_cpu);
  m.impl("kl_div_bwd", &fusedloss::kl_div_bwd_cpu);
}
