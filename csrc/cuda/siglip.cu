// CUDA kernels of fusedloss::siglip_fwd and fusedloss::siglip_bwd. The math ((0)-(3), what is computed)
// lives in fusedloss/siglip_math.h; this file decides who computes which 64 x 64 tile of T = Q K^T,
// in which order, and never holds more than one tile of it per block.
//
// Forward: a block owns 64 query rows and streams every 64-row key tile. 256 threads as 16 x 16, each
//   a 4 x 4 micro-tile (rows ty + 16u, columns tx + 16v) of the dot tile, D in chunks through shared
//   memory; each thread sums its 4 columns' pair_loss per row in acc_t and adds that to a double per
//   row; at the end the 16 partials of a row are added in tx order by one thread.
// Backward: one kernel, two launches. A block owns 64 rows of an "A" side and streams the "B" side:
//   (A, B) = (Q, K) writes dQ and the rows' partial sums of (3); (K, Q) writes dK (labels and g then
//   index B). Per tile it recomputes the dot tile, turns it into W = g scale dz (siglip_math.h (1)) in
//   shared memory, and adds W B_tile to its rows of the gradient, chunk by chunk of D (the gradient
//   itself is the accumulator: the inputs are float32/float64, the functional API converts fp16/bf16).
//   Each block owns its rows: no atomics. The per-row partials of (3) are summed by torch afterwards.
// Any N, M, D (including 0 and 1): loads outside the tensors are zero-filled, stores masked, and a side
// with nothing to stream gets a zero gradient from the launcher. Offsets are int64_t. Determinism: every
// sum runs in an order fixed by (N, M, D): bitwise reproducible run to run.
//
// This is the plain SIMT version (FMA units, exact float32/float64 products, no tensor cores): it was
// written and compiled on a machine without a GPU and has not run on one yet.

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "fusedloss/cuda_utils.cuh"
#include "fusedloss/siglip_checks.h"
#include "fusedloss/siglip_math.h"

namespace fusedloss {
namespace siglip {
namespace {

using cuda_utils::ceil_div;

constexpr int kThreads = 256;
constexpr int kTile = 64;                  // rows of each operand per tile
constexpr int kMicro = 4;                  // 4 x 4 dot products per thread
constexpr int kGrid16 = kTile / kMicro;    // threads as 16 x 16
static_assert(kGrid16 * kGrid16 == kThreads, "thread layout");

// D columns per shared-memory chunk: float64 takes 4 so that the backward's static shared memory (the
// two chunks, the 64 x 65 W tile and the row partials) stays under 48 KiB (47 KiB; float32: 34 KiB).
template <typename acc_t>
struct Chunk {
  static constexpr int kD = sizeof(acc_t) == 8 ? 4 : 16;
};

// Rows [r0, r0 + 64) x columns [d0, d0 + kD) of the row-major (rows, d) matrix x into sh, zero outside.
template <typename acc_t, int kD>
__device__ __forceinline__ void load_chunk(acc_t (*sh)[kD + 1], const acc_t* x, int64_t rows, int64_t r0, int64_t d,
                                           int64_t d0) {
  for (int e = threadIdx.x; e < kTile * kD; e += kThreads) {
    const int r = e / kD, c = e % kD;
    const int64_t gr = r0 + r, gc = d0 + c;
    sh[r][c] = (gr < rows && gc < d) ? x[gr * d + gc] : acc_t(0);
  }
}

// dots[u][v] = A_{a0 + ty + 16u} . B_{b0 + tx + 16v}, unscaled, summed over D in chunk order (the same
// order in the forward and both backward launches, so every launch sees the same T bit for bit).
// Starts with a barrier: the previous users of sa / sb are done.
template <typename acc_t, int kD>
__device__ __forceinline__ void dot_tile(acc_t (&dots)[kMicro][kMicro], acc_t (*sa)[kD + 1], acc_t (*sb)[kD + 1],
                                         const acc_t* a, int64_t na, int64_t a0, const acc_t* b, int64_t nb,
                                         int64_t b0, int64_t d) {
  const int tx = threadIdx.x % kGrid16, ty = threadIdx.x / kGrid16;
#pragma unroll
  for (int u = 0; u < kMicro; ++u)
#pragma unroll
    for (int v = 0; v < kMicro; ++v) dots[u][v] = acc_t(0);
  for (int64_t d0 = 0; d0 < d; d0 += kD) {
    __syncthreads();
    load_chunk<acc_t, kD>(sa, a, na, a0, d, d0);
    load_chunk<acc_t, kD>(sb, b, nb, b0, d, d0);
    __syncthreads();
#pragma unroll
    for (int c = 0; c < kD; ++c) {
      acc_t av[kMicro], bv[kMicro];
#pragma unroll
      for (int u = 0; u < kMicro; ++u) av[u] = sa[ty + kGrid16 * u][c];
#pragma unroll
      for (int v = 0; v < kMicro; ++v) bv[v] = sb[tx + kGrid16 * v][c];
#pragma unroll
      for (int u = 0; u < kMicro; ++u)
#pragma unroll
        for (int v = 0; v < kMicro; ++v) dots[u][v] = fma(av[u], bv[v], dots[u][v]);
    }
  }
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads) siglip_fwd_kernel(const acc_t* q, const acc_t* k, int64_t n, int64_t m,
                                                              int64_t d, const acc_t* scale_p, const acc_t* bias_p,
                                                              const int64_t* labels, acc_t* out) {
  constexpr int kD = Chunk<acc_t>::kD;
  __shared__ acc_t sa[kTile][kD + 1];
  __shared__ acc_t sb[kTile][kD + 1];
  __shared__ double red[kTile][kGrid16 + 1];
  const int tx = threadIdx.x % kGrid16, ty = threadIdx.x / kGrid16;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const acc_t scale = *scale_p, bias = *bias_p;
  int64_t lab[kMicro];
  double run[kMicro];
#pragma unroll
  for (int u = 0; u < kMicro; ++u) {
    const int64_t i = i0 + ty + kGrid16 * u;
    lab[u] = i < n ? (labels ? labels[i] : i) : -1;
    run[u] = 0.0;
  }
  for (int64_t j0 = 0; j0 < m; j0 += kTile) {
    acc_t dots[kMicro][kMicro];
    dot_tile<acc_t, kD>(dots, sa, sb, q, n, i0, k, m, j0, d);
#pragma unroll
    for (int u = 0; u < kMicro; ++u) {
      acc_t part = 0;  // (0) over this thread's 4 columns of the tile row, then float64 across tiles
#pragma unroll
      for (int v = 0; v < kMicro; ++v) {
        const int64_t j = j0 + tx + kGrid16 * v;
        if (j < m) part += pair_loss(logit(dots[u][v], scale, bias), j == lab[u]);
      }
      run[u] += static_cast<double>(part);
    }
  }
#pragma unroll
  for (int u = 0; u < kMicro; ++u) red[ty + kGrid16 * u][tx] = run[u];
  __syncthreads();
  if (threadIdx.x < kTile) {
    const int64_t i = i0 + threadIdx.x;
    if (i < n) {
      double s = 0.0;
      for (int t = 0; t < kGrid16; ++t) s += red[threadIdx.x][t];
      out[i] = static_cast<acc_t>(s);
    }
  }
}

// kKeySide false: A = Q, B = K, writes dQ and part (2 na: the rows' d scale partials, then d bias's);
// true: A = K, B = Q, writes dK.
template <typename acc_t, bool kKeySide>
__global__ void __launch_bounds__(kThreads) siglip_grad_kernel(const acc_t* a, int64_t na, const acc_t* b, int64_t nb,
                                                               int64_t d, const acc_t* scale_p, const acc_t* bias_p,
                                                               const int64_t* labels, const acc_t* g, int64_t g_stride,
                                                               acc_t* grad, double* part) {
  constexpr int kD = Chunk<acc_t>::kD;
  __shared__ acc_t sa[kTile][kD + 1];
  __shared__ acc_t sb[kTile][kD + 1];
  __shared__ acc_t sw[kTile][kTile + 1];  // W = g scale dz of the tile, rows of A
  __shared__ double red[kTile][kGrid16 + 1];
  const int tx = threadIdx.x % kGrid16, ty = threadIdx.x / kGrid16;
  const int64_t a0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const acc_t scale = *scale_p, bias = *bias_p;
  int64_t lab_a[kMicro];
  acc_t g_a[kMicro];
  double gt[kMicro], gs[kMicro];  // (3) per query row before the factor g_i (query side only)
#pragma unroll
  for (int u = 0; u < kMicro; ++u) {
    const int64_t i = a0 + ty + kGrid16 * u;
    lab_a[u] = (!kKeySide && i < na) ? (labels ? labels[i] : i) : -1;
    g_a[u] = (!kKeySide && i < na) ? g[i * g_stride] : acc_t(0);
    gt[u] = gs[u] = 0.0;
  }
  for (int64_t b0 = 0; b0 < nb; b0 += kTile) {
    acc_t dots[kMicro][kMicro];
    dot_tile<acc_t, kD>(dots, sa, sb, a, na, a0, b, nb, b0, d);
#pragma unroll
    for (int u = 0; u < kMicro; ++u) {
      const int64_t ai = a0 + ty + kGrid16 * u;
      acc_t tile_gt = 0, tile_gs = 0;
#pragma unroll
      for (int v = 0; v < kMicro; ++v) {
        const int64_t bj = b0 + tx + kGrid16 * v;
        acc_t w = 0;
        if (ai < na && bj < nb) {
          bool positive;
          acc_t gi;
          if (!kKeySide) {
            positive = bj == lab_a[u];
            gi = g_a[u];
          } else {
            positive = (labels ? labels[bj] : bj) == ai;
            gi = g[bj * g_stride];
          }
          const acc_t dz = pair_grad(logit(dots[u][v], scale, bias), positive);  // (1) without g
          if (!kKeySide) {
            tile_gt += dz * dots[u][v];
            tile_gs += dz;
          }
          w = dz * (gi * scale);
        }
        sw[ty + kGrid16 * u][tx + kGrid16 * v] = w;
      }
      gt[u] += static_cast<double>(tile_gt);
      gs[u] += static_cast<double>(tile_gs);
    }
    // (2): rows of A += W B_tile, D in chunks; the first B tile writes, the others add.
    for (int64_t d0 = 0; d0 < d; d0 += kD) {
      __syncthreads();  // W is complete; the previous chunk's readers of sb are done
      load_chunk<acc_t, kD>(sb, b, nb, b0, d, d0);
      __syncthreads();
      for (int e = threadIdx.x; e < kTile * kD; e += kThreads) {
        const int r = e / kD, c = e % kD;
        const int64_t ga = a0 + r, gc = d0 + c;
        if (ga < na && gc < d) {
          acc_t s = 0;
          for (int jb = 0; jb < kTile; ++jb) s = fma(sw[r][jb], sb[jb][c], s);
          acc_t* dst = grad + ga * d + gc;
          *dst = b0 == 0 ? s : *dst + s;
        }
      }
    }
    __syncthreads();  // the readers of sw are done before the next tile rewrites it
  }
  if constexpr (!kKeySide) {
    // (3) per row: the 16 partials of a row in tx order, times g_i in float64 (g_i = 0 adds an exact 0).
    for (int which = 0; which < 2; ++which) {
#pragma unroll
      for (int u = 0; u < kMicro; ++u) red[ty + kGrid16 * u][tx] = which == 0 ? gt[u] : gs[u];
      __syncthreads();
      if (threadIdx.x < kTile) {
        const int64_t i = a0 + threadIdx.x;
        if (i < na) {
          double s = 0.0;
          for (int t = 0; t < kGrid16; ++t) s += red[threadIdx.x][t];
          const double gi = static_cast<double>(g[i * g_stride]);
          part[which * na + i] = gi == 0.0 ? 0.0 : gi * s;
        }
      }
      __syncthreads();
    }
  }
}

at::Tensor siglip_fwd_cuda(const at::Tensor& query, const at::Tensor& key, const at::Tensor& scale,
                           const at::Tensor& bias, const std::optional<at::Tensor>& labels) {
  const auto acc = check_siglip_args(query, key, scale, bias);
  check_siglip_labels(labels, query, key);
  const c10::cuda::CUDAGuard device_guard(query.device());
  const int64_t n = query.size(0), m = key.size(0), d = query.size(1);
  at::Tensor out = at::empty({n}, query.options());
  if (n == 0) return out;
  const int64_t blocks = ceil_div(n, kTile);
  TORCH_CHECK(blocks <= cuda_utils::kMaxGrid, "fusedloss: siglip_fwd: N too large for one grid");
  const at::Tensor scale_acc = scale.to(acc), bias_acc = bias.to(acc);  // read on the device, in acc_t
  const at::Tensor lab = labels.has_value() ? labels->contiguous() : at::Tensor();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(acc, "fusedloss_siglip_fwd_cuda", [&] {
    siglip_fwd_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        query.const_data_ptr<scalar_t>(), key.const_data_ptr<scalar_t>(), n, m, d,
        scale_acc.const_data_ptr<scalar_t>(), bias_acc.const_data_ptr<scalar_t>(),
        lab.defined() ? lab.const_data_ptr<int64_t>() : nullptr, out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> siglip_bwd_cuda(
    const at::Tensor& grad_rows, const at::Tensor& query, const at::Tensor& key, const at::Tensor& scale,
    const at::Tensor& bias, const std::optional<at::Tensor>& labels) {
  const auto acc = check_siglip_args(query, key, scale, bias);
  check_siglip_labels(labels, query, key);
  check_siglip_grad(grad_rows, query);
  const c10::cuda::CUDAGuard device_guard(query.device());
  const int64_t n = query.size(0), m = key.size(0), d = query.size(1);
  // No pairs (n or m is 0): every gradient is 0 and no kernel runs.
  const bool pairs = n > 0 && m > 0;
  at::Tensor grad_query = pairs ? at::empty({n, d}, query.options()) : at::zeros({n, d}, query.options());
  at::Tensor grad_key = pairs ? at::empty({m, d}, key.options()) : at::zeros({m, d}, key.options());
  at::Tensor part = at::zeros({2 * n}, query.options().dtype(at::kDouble));
  if (pairs) {
    const int64_t blocks_q = ceil_div(n, kTile), blocks_k = ceil_div(m, kTile);
    TORCH_CHECK(blocks_q <= cuda_utils::kMaxGrid && blocks_k <= cuda_utils::kMaxGrid,
                "fusedloss: siglip_bwd: N or M too large for one grid");
    const at::Tensor scale_acc = scale.to(acc), bias_acc = bias.to(acc);
    const at::Tensor lab = labels.has_value() ? labels->contiguous() : at::Tensor();
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(acc, "fusedloss_siglip_bwd_cuda", [&] {
      const scalar_t* q = query.const_data_ptr<scalar_t>();
      const scalar_t* k = key.const_data_ptr<scalar_t>();
      const scalar_t* s = scale_acc.const_data_ptr<scalar_t>();
      const scalar_t* b = bias_acc.const_data_ptr<scalar_t>();
      const int64_t* l = lab.defined() ? lab.const_data_ptr<int64_t>() : nullptr;
      const scalar_t* g = grad_rows.const_data_ptr<scalar_t>();
      siglip_grad_kernel<scalar_t, false><<<static_cast<unsigned>(blocks_q), kThreads, 0, stream>>>(
          q, n, k, m, d, s, b, l, g, grad_rows.stride(0), grad_query.mutable_data_ptr<scalar_t>(),
          part.mutable_data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      siglip_grad_kernel<scalar_t, true><<<static_cast<unsigned>(blocks_k), kThreads, 0, stream>>>(
          k, m, q, n, d, s, b, l, g, grad_rows.stride(0), grad_key.mutable_data_ptr<scalar_t>(), nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  // The rows' partials summed by torch (a fixed-order reduction, no atomics); float64 until the end.
  at::Tensor grad_scale = part.narrow(0, 0, n).sum().to(scale.scalar_type());
  at::Tensor grad_bias = part.narrow(0, n, n).sum().to(bias.scalar_type());
  return {grad_query, grad_key, grad_scale, grad_bias};
}

}  // namespace
}  // namespace siglip
}  // namespace fusedloss

TORCH_LIBRARY_IMPL(fusedloss, CUDA, m) {
  m.impl("siglip_fwd", &fusedloss::siglip::siglip_fwd_cuda);
  m.impl("siglip_bwd", &fusedloss::siglip::siglip_bwd_cuda);
}
