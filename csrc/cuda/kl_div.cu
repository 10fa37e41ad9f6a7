// CUDA kernels of fusedloss::kl_div_fwd and fusedloss::kl_div_bwd (kl_div_logits, jsd_logits). The
// per-row math, steps (1)-(5), lives in fusedloss/kl_div_math.h; this file only decides who reads
// what and in which order.
//
// Forward: one block per row (a grid-stride loop over rows beyond 2^31 - 1 blocks). Thread k of the
//   block reads columns k, k + blockDim, ... of both rows once and keeps the online state of (3)
//   (update_state: two exp() per element once the maxima settle); the block merges the threads'
//   states in a fixed tree in shared memory (merge_state), so the result is the same run to run.
//   The JSD reads the row a second time (usually from L2) for Kp and Kq, summed in the same tree.
// Backward: one block per row, each thread writes the gradients of its columns (4) from the saved
//   stats; no reduction, no atomics.
// Threads per block: a power of two from 32 to 512, about 16 columns per thread.
// Offsets are int64_t. Ignored rows: loss 0, stats 0, gradients 0.
// Not tuned (no 16-byte vector loads yet, unlike cross_entropy.cu); compiled in CI, not yet run on a GPU here.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include "fusedloss/checks.h"
#include "fusedloss/cuda_utils.cuh"
#include "fusedloss/kl_div_math.h"

namespace fusedloss {
namespace kl {
namespace {

using cuda_utils::ceil_div;
using cuda_utils::kMaxGrid;
using cuda_utils::pow2_at_least;

constexpr int kMaxThreads = 512;

template <typename scalar_t, typename acc_t>
struct FwdArgs {
  const scalar_t* student;
  int64_t s_stride;
  const scalar_t* teacher;
  int64_t t_stride;
  const int64_t* target;  // nullptr: every row kept
  acc_t* loss;
  acc_t* stats;
  int64_t n_rows;
  Options<acc_t> o;
};

template <typename scalar_t, typename acc_t>
struct BwdArgs {
  const acc_t* grad_loss;
  int64_t g_stride;
  const scalar_t* student;
  int64_t s_stride;
  const scalar_t* teacher;
  int64_t t_stride;
  const int64_t* target;
  const acc_t* stats;
  scalar_t* grad_s;
  scalar_t* grad_t;  // nullptr: the teacher needs no gradient
  int64_t n_rows;
  Options<acc_t> o;
};

// A fixed-order tree over the block (blockDim.x a power of two): slot 0 ends with the merge of all.
template <typename T, typename Op>
__device__ __forceinline__ T block_tree(T v, T* smem, Op op) {
  const int tid = static_cast<int>(threadIdx.x);
  smem[tid] = v;
  __syncthreads();
  for (int stride = static_cast<int>(blockDim.x) / 2; stride > 0; stride /= 2) {
    if (tid < stride) smem[tid] = op(smem[tid], smem[tid + stride]);
    __syncthreads();
  }
  const T out = smem[0];
  __syncthreads();  // smem is reused by the next tree
  return out;
}

template <typename acc_t>
struct SumPair {
  acc_t kp, kq;
};

template <typename scalar_t, typename acc_t>
__global__ void kl_div_fwd_kernel(FwdArgs<scalar_t, acc_t> args) {
  __shared__ RowState<acc_t> states[kMaxThreads];
  __shared__ SumPair<acc_t> pairs[kMaxThreads];
  const auto& o = args.o;
  const int64_t C = o.num_classes;
  for (int64_t row = blockIdx.x; row < args.n_rows; row += gridDim.x) {
    acc_t* st = args.stats + kStats * row;
    if (args.target != nullptr && is_ignored(args.target[row], o)) {
      if (threadIdx.x < kStats) st[threadIdx.x] = acc_t(0);
      if (threadIdx.x == 0) args.loss[row] = acc_t(0);
      continue;
    }
    const scalar_t* s = args.student + row * args.s_stride;
    const scalar_t* t = args.teacher + row * args.t_stride;
    // (3)
    RowState<acc_t> state = empty_state<acc_t>();
    for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
      update_state(state, static_cast<acc_t>(s[j]), static_cast<acc_t>(t[j]), o);
    }
    state = block_tree(state, states,
                       [&o](const RowState<acc_t>& x, const RowState<acc_t>& y) { return merge_state(x, y, o); });
    RowResult<acc_t> r = finish_state(state, o);
    if (o.mode == JSD) {
      SumPair<acc_t> k{acc_t(0), acc_t(0)};
      for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
        jsd_terms<acc_t>(static_cast<acc_t>(s[j]), static_cast<acc_t>(t[j]), r, o, k.kp, k.kq);
      }
      k = block_tree(k, pairs, [](const SumPair<acc_t>& x, const SumPair<acc_t>& y) {
        return SumPair<acc_t>{x.kp + y.kp, x.kq + y.kq};
      });
      jsd_finish(r, k.kp, k.kq, o);
    }
    if (threadIdx.x == 0) {
      args.loss[row] = r.loss;
      store_stats(st, r);
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void kl_div_bwd_kernel(BwdArgs<scalar_t, acc_t> args) {
  const auto& o = args.o;
  const int64_t C = o.num_classes;
  for (int64_t row = blockIdx.x; row < args.n_rows; row += gridDim.x) {
    scalar_t* gs = args.grad_s + row * C;
    scalar_t* gt = args.grad_t != nullptr ? args.grad_t + row * C : nullptr;
    if (args.target != nullptr && is_ignored(args.target[row], o)) {
      for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
        gs[j] = scalar_t(0);
        if (gt) gt[j] = scalar_t(0);
      }
      continue;
    }
    const scalar_t* s = args.student + row * args.s_stride;
    const scalar_t* t = args.teacher + row * args.t_stride;
    acc_t st[kStats];
    for (int i = 0; i < kStats; ++i) st[i] = args.stats[kStats * row + i];
    const GradCoefs<acc_t> c = grad_coefs(args.grad_loss[row * args.g_stride], o);
    // (4)
    for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
      acc_t d_s, d_t;
      grad_elem<acc_t>(static_cast<acc_t>(s[j]), static_cast<acc_t>(t[j]), st, c, o, d_s, d_t);
      gs[j] = static_cast<scalar_t>(d_s);
      if (gt) gt[j] = static_cast<scalar_t>(d_t);
    }
  }
}

int threads_for(int64_t C) { return std::max(32, pow2_at_least(ceil_div(C, 16), kMaxThreads)); }

unsigned blocks_for(int64_t n_rows) { return static_cast<unsigned>(std::min<int64_t>(n_rows, kMaxGrid)); }

std::tuple<at::Tensor, at::Tensor> kl_div_fwd_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                   const std::optional<at::Tensor>& target, int64_t ignore_index,
                                                   double temperature, double beta, bool jsd) {
  check_kl_args(student, teacher, target, temperature, beta);
  TORCH_CHECK(student.is_cuda(), "fusedloss: kl_div_fwd (CUDA) needs CUDA input");
  const c10::cuda::CUDAGuard device_guard(student.device());
  const int64_t n = student.size(0), c = student.size(1);
  const auto acc = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor loss = at::empty({n}, student.options().dtype(acc));
  at::Tensor stats = at::empty({n, kStats}, student.options().dtype(acc));
  if (n == 0) return {loss, stats};
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "fusedloss_kl_div_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    FwdArgs<scalar_t, acc_t> args;
    args.student = student.const_data_ptr<scalar_t>();
    args.s_stride = student.stride(0);
    args.teacher = teacher.const_data_ptr<scalar_t>();
    args.t_stride = teacher.stride(0);
    args.target = target.has_value() ? target->const_data_ptr<int64_t>() : nullptr;
    args.loss = loss.mutable_data_ptr<acc_t>();
    args.stats = stats.mutable_data_ptr<acc_t>();
    args.n_rows = n;
    args.o = make_options<acc_t>(c, ignore_index, temperature, beta, jsd);
    kl_div_fwd_kernel<scalar_t, acc_t><<<blocks_for(n), threads_for(c), 0, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, stats};
}

std::tuple<at::Tensor, at::Tensor> kl_div_bwd_cuda(const at::Tensor& grad_loss, const at::Tensor& student,
                                                   const at::Tensor& teacher, const std::optional<at::Tensor>& target,
                                                   const at::Tensor& stats, int64_t ignore_index, double temperature,
                                                   double beta, bool jsd, bool teacher_grad) {
  check_kl_args(student, teacher, target, temperature, beta);
  check_row_grad(grad_loss, student, "grad_loss");
  check_kl_stats(stats, student);
  TORCH_CHECK(student.is_cuda(), "fusedloss: kl_div_bwd (CUDA) needs CUDA input");
  const c10::cuda::CUDAGuard device_guard(student.device());
  const int64_t n = student.size(0), c = student.size(1);
  const auto options = student.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor grad_s = at::empty({n, c}, options);
  at::Tensor grad_t = teacher_grad ? at::empty({n, c}, options) : at::empty({0}, options);
  if (grad_s.numel() == 0) return {grad_s, grad_t};
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "fusedloss_kl_div_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    BwdArgs<scalar_t, acc_t> args;
    args.grad_loss = grad_loss.const_data_ptr<acc_t>();
    args.g_stride = grad_loss.stride(0);
    args.student = student.const_data_ptr<scalar_t>();
    args.s_stride = student.stride(0);
    args.teacher = teacher.const_data_ptr<scalar_t>();
    args.t_stride = teacher.stride(0);
    args.target = target.has_value() ? target->const_data_ptr<int64_t>() : nullptr;
    args.stats = stats.const_data_ptr<acc_t>();
    args.grad_s = grad_s.mutable_data_ptr<scalar_t>();
    args.grad_t = teacher_grad ? grad_t.mutable_data_ptr<scalar_t>() : nullptr;
    args.n_rows = n;
    args.o = make_options<acc_t>(c, ignore_index, temperature, beta, jsd);
    kl_div_bwd_kernel<scalar_t, acc_t><<<blocks_for(n), threads_for(c), 0, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_s, grad_t};
}

}  // namespace
}  // namespace kl
}  // namespace fusedloss

TORCH_LIBRARY_IMPL(fusedloss, CUDA, m) {
  m.impl("kl_div_fwd", &fusedloss::kl::kl_div_fwd_cuda);
  m.impl("kl_div_bwd", &fusedloss::kl::kl_div_bwd_cuda);
}
