// CUDA kernels of the cross-entropy with probability targets (soft_cross_entropy_fwd / _bwd; schemas in
// csrc/registration_soft_cross_entropy.cpp). The per-row math, steps (1)-(5), lives in
// fusedloss/soft_cross_entropy_math.h; this file only decides who reads what and in which order.
//
// Forward: one block per row (a grid-stride loop over rows beyond 2^31 - 1 blocks). Thread k reads
//   columns k, k + blockDim, ... of the logits and of the targets once and keeps the online stats of
//   (3) (one exp per element; with the entropy also (6)'s sum_ed); the block merges the threads' stats
//   in a fixed tree in shared memory (ce::merge_stats), so the result is the same run to run.
// Backward: one block per row, each thread writes the gradients of its columns from the saved stats;
//   no reduction, no atomics.
// Threads per block: a power of two from 32 to 512, about 16 columns per thread. Offsets are int64_t.
// Compiled in CI; not run on a GPU yet (no 16-byte vector loads: not tuned).

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
#include <type_traits>

#include "fusedloss/cuda_utils.cuh"
#include "fusedloss/soft_cross_entropy_checks.h"
#include "fusedloss/soft_cross_entropy_math.h"

namespace fusedloss {
namespace soft_ce {
namespace {

using cuda_utils::ceil_div;
using cuda_utils::kMaxGrid;
using cuda_utils::pow2_at_least;

constexpr int kMaxThreads = 512;

template <typename scalar_t, typename target_t, typename acc_t>
struct FwdArgs {
  const scalar_t* logits;
  int64_t x_stride;
  const target_t* target;
  int64_t t_stride;
  const acc_t* weight;  // nullptr: all 1
  acc_t* loss;
  acc_t* lse;
  acc_t* stats;    // (N, stats_width)
  acc_t* entropy;  // nullptr: no entropy (6), stats_width 3; else stats_width 4
  int stats_width;
  int64_t n_rows;
  Options<acc_t> o;
};

template <typename scalar_t, typename target_t, typename acc_t>
struct BwdArgs {
  const acc_t* grad_loss;
  int64_t g_stride;
  const acc_t* grad_lse;  // nullptr: 0
  int64_t gl_stride;
  const scalar_t* logits;
  int64_t x_stride;
  const target_t* target;
  int64_t t_stride;
  const acc_t* weight;
  const acc_t* stats;  // (N, stats_width)
  int stats_width;
  const acc_t* grad_entropy;  // nullptr: the entropy gets no gradient; else stats_width 4 (H is read)
  int64_t ge_stride;
  scalar_t* grad_x;
  target_t* grad_t;  // nullptr: the target needs no gradient
  int64_t n_rows;
  Options<acc_t> o;
};

// A fixed-order tree over the block (blockDim.x a power of two): every thread gets the merge of all.
template <typename acc_t>
__device__ __forceinline__ ce::RowStats<acc_t> block_merge(ce::RowStats<acc_t> v, ce::RowStats<acc_t>* smem) {
  const int tid = static_cast<int>(threadIdx.x);
  smem[tid] = v;
  __syncthreads();
  for (int stride = static_cast<int>(blockDim.x) / 2; stride > 0; stride /= 2) {
    if (tid < stride) smem[tid] = ce::merge_stats(smem[tid], smem[tid + stride]);
    __syncthreads();
  }
  const ce::RowStats<acc_t> out = smem[0];
  __syncthreads();  // smem is reused by the next row
  return out;
}

template <typename scalar_t, typename target_t, typename acc_t>
__global__ void soft_ce_fwd_kernel(FwdArgs<scalar_t, target_t, acc_t> args) {
  __shared__ ce::RowStats<acc_t> smem[kMaxThreads];
  const auto& o = args.o;
  const int64_t C = o.ce.num_classes;
  for (int64_t row = blockIdx.x; row < args.n_rows; row += gridDim.x) {
    const scalar_t* x = args.logits + row * args.x_stride;
    const target_t* t = args.target + row * args.t_stride;
    // (3)
    ce::RowStats<acc_t> r = ce::empty_stats<acc_t>();
    for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
      const acc_t z = ce::transform_logit<acc_t>(static_cast<acc_t>(x[j]), o.ce);
      const acc_t w = args.weight != nullptr ? args.weight[j] : acc_t(1);
      // qualified: ADL on ce::RowStats also finds ce::update_stats, which takes the same arguments
      soft_ce::update_stats(r, z, target_weight<acc_t>(static_cast<acc_t>(t[j]), w, o), args.entropy != nullptr);
    }
    r = block_merge(r, smem);
    if (threadIdx.x == 0) {
      soft_ce::finish_row(r, o, args.loss + row, args.lse + row, args.stats + args.stats_width * row,
                 args.entropy != nullptr ? args.entropy + row : nullptr);
    }
  }
}

template <typename scalar_t, typename target_t, typename acc_t>
__global__ void soft_ce_bwd_kernel(BwdArgs<scalar_t, target_t, acc_t> args) {
  const auto& o = args.o;
  const int64_t C = o.ce.num_classes;
  for (int64_t row = blockIdx.x; row < args.n_rows; row += gridDim.x) {
    const acc_t* st = args.stats + args.stats_width * row;
    const acc_t g_lse = args.grad_lse != nullptr ? args.grad_lse[row * args.gl_stride] : acc_t(0);
    const acc_t g_h = args.grad_entropy != nullptr ? args.grad_entropy[row * args.ge_stride] : acc_t(0);
    const GradCoefs<acc_t> c = grad_coefs<acc_t>(st[0], st[1], st[2], args.grad_loss[row * args.g_stride], g_lse, o,
                                                 g_h, args.grad_entropy != nullptr ? st[3] : acc_t(0));
    const scalar_t* x = args.logits + row * args.x_stride;
    const target_t* t = args.target + row * args.t_stride;
    scalar_t* gx = args.grad_x + row * C;
    target_t* gt = args.grad_t != nullptr ? args.grad_t + row * C : nullptr;
    // (4), (5), (6)
    for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
      const acc_t z = ce::transform_logit<acc_t>(static_cast<acc_t>(x[j]), o.ce);
      const acc_t w = args.weight != nullptr ? args.weight[j] : acc_t(1);
      gx[j] = static_cast<scalar_t>(grad_logit<acc_t>(z, static_cast<acc_t>(t[j]), w, c, o));
      if (gt) gt[j] = static_cast<target_t>(grad_target<acc_t>(z, w, c));
    }
  }
}

int threads_for(int64_t C) { return std::max(32, pow2_at_least(ceil_div(C, 16), kMaxThreads)); }

unsigned blocks_for(int64_t n_rows) { return static_cast<unsigned>(std::min<int64_t>(n_rows, kMaxGrid)); }

template <typename scalar_t, typename target_t>
void launch_fwd(const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                const Options<at::opmath_type<scalar_t>>& o, at::Tensor& loss, at::Tensor& lse, at::Tensor& stats,
                at::Tensor* entropy, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  FwdArgs<scalar_t, target_t, acc_t> args;
  args.logits = logits.const_data_ptr<scalar_t>();
  args.x_stride = logits.stride(0);
  args.target = target.const_data_ptr<target_t>();
  args.t_stride = target.stride(0);
  args.weight = weight.has_value() ? weight->const_data_ptr<acc_t>() : nullptr;
  args.loss = loss.mutable_data_ptr<acc_t>();
  args.lse = lse.mutable_data_ptr<acc_t>();
  args.stats = stats.mutable_data_ptr<acc_t>();
  args.entropy = entropy != nullptr ? entropy->mutable_data_ptr<acc_t>() : nullptr;
  args.stats_width = static_cast<int>(stats.size(1));
  args.n_rows = logits.size(0);
  args.o = o;
  soft_ce_fwd_kernel<scalar_t, target_t, acc_t>
      <<<blocks_for(args.n_rows), threads_for(logits.size(1)), 0, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename target_t>
void launch_bwd(const at::Tensor& grad_loss, const std::optional<at::Tensor>& grad_lse, const at::Tensor& logits,
                const at::Tensor& target, const std::optional<at::Tensor>& weight, const at::Tensor& stats,
                const std::optional<at::Tensor>& grad_entropy, const Options<at::opmath_type<scalar_t>>& o,
                at::Tensor& grad_x, at::Tensor* grad_t, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  BwdArgs<scalar_t, target_t, acc_t> args;
  args.grad_loss = grad_loss.const_data_ptr<acc_t>();
  args.g_stride = grad_loss.stride(0);
  args.grad_lse = grad_lse.has_value() ? grad_lse->const_data_ptr<acc_t>() : nullptr;
  args.gl_stride = grad_lse.has_value() ? grad_lse->stride(0) : 0;
  args.logits = logits.const_data_ptr<scalar_t>();
  args.x_stride = logits.stride(0);
  args.target = target.const_data_ptr<target_t>();
  args.t_stride = target.stride(0);
  args.weight = weight.has_value() ? weight->const_data_ptr<acc_t>() : nullptr;
  args.stats = stats.const_data_ptr<acc_t>();
  args.stats_width = static_cast<int>(stats.size(1));
  args.grad_entropy = grad_entropy.has_value() ? grad_entropy->const_data_ptr<acc_t>() : nullptr;
  args.ge_stride = grad_entropy.has_value() ? grad_entropy->stride(0) : 0;
  args.grad_x = grad_x.mutable_data_ptr<scalar_t>();
  args.grad_t = grad_t != nullptr ? grad_t->mutable_data_ptr<target_t>() : nullptr;
  args.n_rows = logits.size(0);
  args.o = o;
  soft_ce_bwd_kernel<scalar_t, target_t, acc_t>
      <<<blocks_for(args.n_rows), threads_for(logits.size(1)), 0, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The target's element type: the logits' scalar_t, or the accumulation type (float32 targets of
// 16-bit logits). True when it is scalar_t.
template <typename scalar_t>
bool target_is_scalar_t(const at::Tensor& target) {
  return target.scalar_type() == c10::CppTypeToScalarType<scalar_t>::value;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> soft_cross_entropy_fwd_cuda(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    double label_smoothing, double z_loss, double softcap, double temperature, bool entropy) {
  check_soft_ce_args(logits, target, weight, label_smoothing, z_loss, softcap, temperature);
  TORCH_CHECK(logits.is_cuda(), "fusedloss: soft_cross_entropy_fwd (CUDA) needs CUDA logits");
  const c10::cuda::CUDAGuard device_guard(logits.device());
  const auto options = logits.options().dtype(soft_ce_acc_type(logits));
  const int64_t n = logits.size(0);
  at::Tensor loss = at::empty({n}, options);
  at::Tensor lse = at::empty({n}, options);
  at::Tensor stats = at::empty({n, entropy ? kStatsEntropy : kStats}, options);
  at::Tensor ent = at::empty({entropy ? n : 0}, options);
  if (n == 0) return {loss, lse, stats, ent};
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "fusedloss_soft_ce_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto o = make_options<acc_t>(logits.size(1), label_smoothing, z_loss, softcap, temperature);
    at::Tensor* e = entropy ? &ent : nullptr;
    if (std::is_same_v<scalar_t, acc_t> || target_is_scalar_t<scalar_t>(target)) {
      launch_fwd<scalar_t, scalar_t>(logits, target, weight, o, loss, lse, stats, e, stream);
    } else {
      launch_fwd<scalar_t, acc_t>(logits, target, weight, o, loss, lse, stats, e, stream);
    }
  });
  return {loss, lse, stats, ent};
}

std::tuple<at::Tensor, at::Tensor> soft_cross_entropy_bwd_cuda(const at::Tensor& grad_loss,
                                                                const std::optional<at::Tensor>& grad_lse,
                                                                const at::Tensor& logits, const at::Tensor& target,
                                                                const std::optional<at::Tensor>& weight,
                                                                const at::Tensor& stats, double label_smoothing,
                                                                double z_loss, double softcap, double temperature,
                                                                bool target_grad,
                                                                const std::optional<at::Tensor>& grad_entropy) {
  check_soft_ce_args(logits, target, weight, label_smoothing, z_loss, softcap, temperature);
  check_soft_ce_bwd_args(grad_loss, grad_lse, logits, stats, grad_entropy);
  TORCH_CHECK(logits.is_cuda(), "fusedloss: soft_cross_entropy_bwd (CUDA) needs CUDA logits");
  const c10::cuda::CUDAGuard device_guard(logits.device());
  at::Tensor grad_x = at::empty(logits.sizes(), logits.options().memory_format(at::MemoryFormat::Contiguous));
  const auto t_options = target.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor grad_t = target_grad ? at::empty(target.sizes(), t_options) : at::empty({0}, t_options);
  if (grad_x.numel() == 0) return {grad_x, grad_t};
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "fusedloss_soft_ce_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto o = make_options<acc_t>(logits.size(1), label_smoothing, z_loss, softcap, temperature);
    at::Tensor* gt = target_grad ? &grad_t : nullptr;
    if (std::is_same_v<scalar_t, acc_t> || target_is_scalar_t<scalar_t>(target)) {
      launch_bwd<scalar_t, scalar_t>(grad_loss, grad_lse, logits, target, weight, stats, grad_entropy, o, grad_x, gt,
                                     stream);
    } else {
      launch_bwd<scalar_t, acc_t>(grad_loss, grad_lse, logits, target, weight, stats, grad_entropy, o, grad_x, gt,
                                  stream);
    }
  });
  return {grad_x, grad_t};
}

}  // namespace
}  // namespace soft_ce
}  // namespace fusedloss

TORCH_LIBRARY_IMPL(fusedloss, CUDA, m) {
  m.impl("soft_cross_entropy_fwd", &fusedloss::soft_ce::soft_cross_entropy_fwd_cuda);
  m.impl("soft_cross_entropy_bwd", &fusedloss::soft_ce::soft_cross_entropy_bwd_cuda);
}
