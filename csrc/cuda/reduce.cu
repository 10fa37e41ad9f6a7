// CUDA kernel of fusedloss::reduce_rows (the math is in fusedloss/reduce_math.h).
//
// Deterministic without atomics: up to kSingleBlockRows rows, one block of kThreads threads, thread t
// summing rows t, t + kThreads, ... in order and the block merging the threads' partials in a fixed
// tree: one launch. Beyond that, a first launch gives each of B blocks a contiguous span of rows
// (same scheme inside the block) and writes B partials, and a second, one-block launch merges them
// in block order. The partials are doubles (see reduce_math.h), a few KB.
#include "fusedloss/checks.h"
#include "fusedloss/cuda_utils.cuh"
#include "fusedloss/reduce_math.h"

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace fusedloss {
namespace {

constexpr int kThreads = 512;
constexpr int64_t kSingleBlockRows = 1 << 16;
constexpr int64_t kMaxBlocks = 1024;

// The block's threads merge their partials in a fixed tree; thread 0 returns the block's.
__device__ reduce::Partial block_merge(reduce::Partial p) {
  __shared__ double s_sum[kThreads];
  __shared__ double s_mass[kThreads];
  s_sum[threadIdx.x] = p.sum;
  s_mass[threadIdx.x] = p.mass;
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) {
      s_sum[threadIdx.x] += s_sum[threadIdx.x + half];
      s_mass[threadIdx.x] += s_mass[threadIdx.x + half];
    }
    __syncthreads();
  }
  return reduce::Partial{s_sum[0], s_mass[0]};
}

// Block b reduces rows [b * span, min(N, (b + 1) * span)). With one block (span >= N) it writes the
// result; otherwise its partial.
template <typename acc_t>
__global__ void reduce_rows_kernel(const acc_t* __restrict__ loss, const int64_t* __restrict__ target,
                                   const acc_t* __restrict__ weight, int64_t num_weights,
                                   const acc_t* __restrict__ token_weight, int64_t ignore_index, int64_t N,
                                   int64_t span, bool mean, acc_t* __restrict__ out, acc_t* __restrict__ mass,
                                   double* __restrict__ partial_sum, double* __restrict__ partial_mass) {
  const int64_t lo = static_cast<int64_t>(blockIdx.x) * span;
  const int64_t hi = lo + span < N ? lo + span : N;
  reduce::Partial p{0.0, 0.0};
  for (int64_t i = lo + threadIdx.x; i < hi; i += kThreads) {
    p = reduce::merge(p, reduce::row_partial(i, loss, target, weight, num_weights, token_weight, ignore_index));
  }
  const reduce::Partial total = block_merge(p);
  if (threadIdx.x != 0) return;
  if (gridDim.x == 1) {
    *out = static_cast<acc_t>(reduce::finish(total, mean));
    *mass = static_cast<acc_t>(total.mass);
  } else {
    partial_sum[blockIdx.x] = total.sum;
    partial_mass[blockIdx.x] = total.mass;
  }
}

template <typename acc_t>
__global__ void merge_partials_kernel(const double* __restrict__ partial_sum, const double* __restrict__ partial_mass,
                                      int64_t blocks, bool mean, acc_t* __restrict__ out, acc_t* __restrict__ mass) {
  reduce::Partial p{0.0, 0.0};
  for (int64_t b = threadIdx.x; b < blocks; b += kThreads) p = reduce::merge(p, reduce::Partial{partial_sum[b], partial_mass[b]});
  const reduce::Partial total = block_merge(p);
  if (threadIdx.x == 0) {
    *out = static_cast<acc_t>(reduce::finish(total, mean));
    *mass = static_cast<acc_t>(total.mass);
  }
}

std::tuple<at::Tensor, at::Tensor> reduce_rows_cuda(const at::Tensor& loss, const at::Tensor& target,
                                                    const std::optional<at::Tensor>& weight,
                                                    const std::optional<at::Tensor>& token_weight, int64_t ignore_index,
                                                    bool mean) {
  check_reduce_args(loss, target, weight, token_weight);
  TORCH_CHECK(loss.is_cuda(), "fusedloss: reduce_rows (CUDA) needs CUDA tensors");
  const c10::cuda::CUDAGuard device_guard(loss.device());
  const int64_t N = loss.size(0);
  at::Tensor out = at::empty({}, loss.options());
  at::Tensor mass = at::empty({}, loss.options());
  const int64_t blocks =
      N <= kSingleBlockRows ? 1 : std::min(kMaxBlocks, cuda_utils::ceil_div(N, kSingleBlockRows / 8));
  const int64_t span = blocks == 1 ? std::max<int64_t>(N, 1) : cuda_utils::ceil_div(N, blocks);
  at::Tensor partial;
  if (blocks > 1) partial = at::empty({2, blocks}, loss.options().dtype(at::kDouble));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(loss.scalar_type(), "fusedloss_reduce_rows_cuda", [&] {
    double* ps = blocks > 1 ? partial.mutable_data_ptr<double>() : nullptr;
    double* pm = blocks > 1 ? ps + blocks : nullptr;
    reduce_rows_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        loss.const_data_ptr<scalar_t>(), target.const_data_ptr<int64_t>(),
        weight.has_value() ? weight->const_data_ptr<scalar_t>() : nullptr, weight.has_value() ? weight->size(0) : 0,
        token_weight.has_value() ? token_weight->const_data_ptr<scalar_t>() : nullptr, ignore_index, N, span, mean,
        out.mutable_data_ptr<scalar_t>(), mass.mutable_data_ptr<scalar_t>(), ps, pm);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (blocks > 1) {
      merge_partials_kernel<scalar_t><<<1, kThreads, 0, stream>>>(ps, pm, blocks, mean, out.mutable_data_ptr<scalar_t>(),
                                                                  mass.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {out, mass};
}

}  // namespace
}  // namespace fusedloss

TORCH_LIBRARY_IMPL(fusedloss, CUDA, m) { m.impl("reduce_rows", &fusedloss::reduce_rows_cuda); }
