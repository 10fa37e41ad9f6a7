// CUDA kernels of fusedloss::gap_loss_fwd and fusedloss::gap_loss_bwd. The per-row math, steps
// (1)-(4), lives in fusedloss/gap_loss_math.h; this file only decides who reads what and in which
// order. It follows the conventions of cross_entropy.cu.
//
// Launch configuration. N rows of C classes; V = 16 / sizeof(scalar_t) elements per 16-byte load
// (4 fp32, 8 fp16/bf16, 2 fp64), or V = 1 when some row base is not 16-byte aligned (for the
// backward: also unless C % V == 0 and the gradient is aligned, so that its rows are too).
// Forward and backward use the same two layouts, because both need a reduction over the row:
//   * C <= 1024 ("group" layout, 128-thread blocks): a row gets G lanes of one warp, G the power
//     of two (1..32) that gives each lane about 4 loads (up to 8 vector or 32 scalar loads for the
//     longest rows); a block covers 128 / G rows. Gap losses mostly have small C (2 to a few
//     hundred classes), where a block per row, as in torch's multi_margin_loss, leaves most of
//     its threads idle: at C = 2 one lane takes a whole row. The lanes of a row reduce with
//     butterfly shuffles inside their group: no shared memory, no __syncthreads.
//   * C > 1024 ("row" layout): one block per row, 128..1024 threads (a power of two, about 32
//     elements per thread; 1024 threads at C = 32768), warp shuffles then one shared-memory hop.
//   Lane t of a row's nt lanes takes the V-wide vectors t, t + nt, ... (coalesced across the
//   lanes, 4 loads in flight), then the C % V tail columns nvec * V + t, ... one by one.
//   The classes j != y are all the columns but y: the column index is compared with y in the
//   loop (the vector loads stay aligned; the CPU kernel's split into [0, y) and (y, C) would not).
// Forward: one read of each row; each lane accumulates the sum of its terms (2) (or, in mode
//   "max", the largest gap h_j, NaN winning, as fl_max), the lanes reduce in a fixed tree, and the
//   row's first lane writes (3). x_y (and w_y) are read only when 0 <= y < C and y is not ignored:
//   an out-of-range target never leads to an out-of-bounds read.
// Backward, mode "sum": one streaming pass per row. Each lane writes g scale slope_j for its
//   columns j != y as it reads them, and sums its slopes; the lanes then reduce the sum (every
//   lane gets the same bits), and the lane that owns column y (the one whose pass wrote y's
//   element, with a placeholder) overwrites it with -(sum of slopes) g scale. The placeholder and
//   the final value are written by the same thread, in program order: no other thread ever
//   writes an element of the row twice, and no atomics are involved.
// Backward, mode "max": a read pass finds the first j != y with the largest gap, by the rule of
//   torch.argmax over the gaps in fusedloss.reference (a NaN gap wins, ties go to the first j; see
//   gap_rank_key for how the ranking avoids h_j's rounding), an all-reduce in a fixed tree gives
//   every lane that j and its key, and a write pass writes the row: g scale slope_j at j, minus
//   that at y, 0 elsewhere. With C = 1 there is no such j and the row is 0.
// Ignored rows: loss 0, gradient 0. A target outside [0, C) that is not ignore_index: loss NaN,
//   gradient row NaN; its inputs are never read.
//
// Accuracy: sums over a row are serial per-lane sums of C / lanes terms (at most 32 up to
// C = 32768), then a tree over the lanes (at most 10 levels), so the error stays near that of a
// ~40-term sum (the CPU kernel gets the same effect from its blocked float64 sum).
// Determinism: no atomics; every reduction order is a function of (N, C, dtype, alignment) only,
// so results are bitwise reproducible run to run.
// Offsets: row offsets and column indices are int64_t (N * C may exceed 2^31).
//
// Headers: c10/cuda rather than ATen/cuda/CUDAContext.h, which pulls in cuSPARSE/cuBLAS headers
// that a bare CUDA toolkit (or torch's pip wheels without their include dirs on the path) lacks.

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
#include <limits>
#include <optional>
#include <type_traits>

#include "fusedloss/checks.h"
#include "fusedloss/cuda_utils.cuh"
#include "fusedloss/gap_loss_math.h"

namespace fusedloss {
namespace gap {
namespace {

using cuda_utils::block_allreduce;
using cuda_utils::ceil_div;
using cuda_utils::group_allreduce;
using cuda_utils::is_aligned16;
using cuda_utils::kMaxGrid;
using cuda_utils::kWarpSize;
using cuda_utils::load_pack;
using cuda_utils::Pack;
using cuda_utils::pow2_at_least;
using cuda_utils::rows_aligned16;
using cuda_utils::store_pack;

constexpr int kGroupBlock = 128;            // threads of a group-layout block
constexpr int64_t kGroupMaxClasses = 1024;  // C up to this uses the group layout
constexpr int kLoadsPerLane = 4;            // group layout: loads per lane that set G
constexpr int kElemsPerThread = 32;         // row layout: elements per thread that set the block
constexpr int kMinRowBlock = 128;
constexpr int kMaxRowBlock = 1024;
constexpr int kUnroll = 4;                  // loads in flight per thread in the read loops
constexpr int64_t kNoClass = std::numeric_limits<int64_t>::max();  // "no j" in the argmax

// __launch_bounds__ of the two layouts. The group layout's minimum of 8 blocks (1024 threads, at
// most 64 registers) also keeps ptxas from its default 32-register target for 128-thread kernels,
// at which it spilled a few bytes in the float64 argmax pass.
template <bool kBlockRow>
constexpr int kBlockThreads = kBlockRow ? kMaxRowBlock : kGroupBlock;
template <bool kBlockRow>
constexpr int kMinBlocksPerSm = kBlockRow ? 1 : 8;

template <typename scalar_t, typename acc_t>
struct FwdArgs {
  const scalar_t* input;
  int64_t row_stride;
  const int64_t* target;
  const acc_t* weight;  // nullptr: every w_j = 1
  acc_t* loss;          // (N,)
  int64_t n_rows;
  Options<acc_t> o;
};

template <typename scalar_t, typename acc_t>
struct BwdArgs {
  const acc_t* grad_loss;
  int64_t grad_loss_stride;  // any, 0 for an expanded scalar
  const scalar_t* input;
  int64_t row_stride;
  const int64_t* target;
  const acc_t* weight;
  scalar_t* grad;  // (N, C) contiguous
  int64_t n_rows;
  Options<acc_t> o;
};

template <typename acc_t>
__device__ __forceinline__ bool row_is_live(int64_t y, const Options<acc_t>& o) {
  return !is_ignored(y, o) && target_in_range(y, o);
}

// What a row that is not live holds: 0 if ignored, NaN for a target outside [0, C).
template <typename acc_t>
__device__ __forceinline__ acc_t dead_row_fill(int64_t y, const Options<acc_t>& o) {
  return is_ignored(y, o) ? acc_t(0) : fl_nan<acc_t>();
}

// The row this thread works on, its lane among the row's nt lanes.
struct RowSlot {
  int64_t row;
  int lane;
  int nt;
};

template <bool kBlockRow>
__device__ __forceinline__ RowSlot row_slot(int group) {
  if constexpr (kBlockRow) {
    return {static_cast<int64_t>(blockIdx.x), static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x)};
  } else {
    const int rows_per_block = kGroupBlock / group;
    return {static_cast<int64_t>(blockIdx.x) * rows_per_block + static_cast<int>(threadIdx.x) / group,
            static_cast<int>(threadIdx.x) & (group - 1), group};
  }
}

// A candidate for the first j != y with the largest gap h_j: key is the value it is ranked by (see
// gap_rank_key), NaN where h_j is NaN.
template <typename acc_t>
struct ArgMax {
  acc_t key;
  int64_t j;  // kNoClass: none
};

template <typename acc_t>
__device__ __forceinline__ ArgMax<acc_t> no_argmax() {
  return {-fl_inf<acc_t>(), kNoClass};
}

// Found by ADL from cuda_utils::group_allreduce (more specialized than its generic shfl_xor).
template <typename acc_t>
__device__ __forceinline__ ArgMax<acc_t> shfl_xor(ArgMax<acc_t> v, int lane_mask) {
  return {cuda_utils::shfl_xor(v.key, lane_mask), cuda_utils::shfl_xor(v.j, lane_mask)};
}

struct SumOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return a + b;
  }
};

struct MaxOp {  // NaN wins, as in the forward's per-lane max
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return fl_max(a, b);
  }
};

// A strict total order on candidates: a NaN key first, then the larger key, then the smaller j.
// The winner does not depend on the order of the operands, so lanes and trees all agree.
struct ArgMaxOp {
  template <typename acc_t>
  __device__ __forceinline__ ArgMax<acc_t> operator()(ArgMax<acc_t> a, ArgMax<acc_t> b) const {
    const bool a_nan = a.key != a.key;
    const bool b_nan = b.key != b.key;
    bool take_b;
    if (a_nan != b_nan) {
      take_b = b_nan;
    } else if (!a_nan && a.key != b.key) {
      take_b = b.key > a.key;
    } else {
      take_b = b.j < a.j;
    }
    return take_b ? b : a;
  }
};

template <typename acc_t>
__device__ __forceinline__ bool is_finite(acc_t v) {
  return v - v == acc_t(0);  // inf - inf and NaN - NaN are NaN
}

// What mode "max" ranks class j by, so that the order is the reference's (torch.argmax over the
// gaps h_j in float64: a NaN gap is the largest, ties go to the first j). With x_y and the margin
// finite, h_j is NaN exactly where x_j is, and x_j orders the gaps exactly (h_j in acc_t could round
// two different x_j to one gap, a tie the reference does not see): the key is x_j. Otherwise every
// gap that is not NaN is the same infinity (x_y = -inf: +inf; x_y = +inf: -inf), so they all tie
// and the first j wins: the key is h_j itself.
template <typename acc_t>
__device__ __forceinline__ acc_t gap_rank_key(acc_t x_j, acc_t h_j, bool rank_by_x) {
  return rank_by_x ? x_j : h_j;
}

// All-reduce over the lanes of one row: the group's butterfly, or the whole block's.
template <bool kBlockRow, typename T, typename Op>
__device__ __forceinline__ T row_allreduce(T v, int group, T* smem, const T& identity, Op op) {
  if constexpr (kBlockRow) {
    return block_allreduce(v, smem, identity, op);
  } else {
    return group_allreduce(v, group, op);
  }
}

// The lane that owns column col in the read/write loops below.
__device__ __forceinline__ int owner_lane(int64_t col, int64_t C, int V, int nt) {
  const int64_t vec_cols = (C / V) * V;
  return static_cast<int>(col < vec_cols ? (col / V) % nt : (col - vec_cols) % nt);
}

// One pass over the columns of one row that lane t of nt owns: the V-wide vectors t, t + nt, ...
// (kUnroll independent loads issued before their use), then the < V tail columns one by one.
// f(col, x_col) gets x_col in acc_t; with kStore it returns the gradient of col (in acc_t), stored
// into out in the same layout. On the vector path every row base is 16-byte aligned.
template <int V, bool kStore, typename acc_t, typename scalar_t, typename F>
__device__ __forceinline__ void row_pass(const scalar_t* x, scalar_t* out, int64_t C, int t, int nt, F&& f) {
  using PackT = Pack<scalar_t, V>;
  auto visit = [&](const PackT& in, int64_t vi) {
    PackT res;
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const int64_t col = vi * V + e;
      if constexpr (kStore) {
        res.v[e] = static_cast<scalar_t>(f(col, static_cast<acc_t>(in.v[e])));
      } else {
        f(col, static_cast<acc_t>(in.v[e]));
      }
    }
    if constexpr (kStore) store_pack<V>(out + vi * V, res);
  };
  const int64_t nvec = C / V;
  int64_t i = t;
  for (; i + int64_t(kUnroll - 1) * nt < nvec; i += int64_t(kUnroll) * nt) {
    PackT p[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) p[u] = load_pack<V>(x + (i + int64_t(u) * nt) * V);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) visit(p[u], i + int64_t(u) * nt);
  }
  for (; i < nvec; i += nt) visit(load_pack<V>(x + i * V), i);
  // Rows whose length is not a multiple of V (the forward with a padded row stride).
  for (int64_t c = nvec * V + t; c < C; c += nt) {
    if constexpr (kStore) {
      out[c] = static_cast<scalar_t>(f(c, static_cast<acc_t>(x[c])));
    } else {
      f(c, static_cast<acc_t>(x[c]));
    }
  }
}

// Writes out[col] = f(col) over the columns lane t of nt owns (the same layout as row_pass).
template <int V, typename scalar_t, typename F>
__device__ __forceinline__ void write_row(scalar_t* out, int64_t C, int t, int nt, F&& f) {
  const int64_t nvec = C / V;
  for (int64_t i = t; i < nvec; i += nt) {
    Pack<scalar_t, V> res;
#pragma unroll
    for (int e = 0; e < V; ++e) res.v[e] = f(i * V + e);
    store_pack<V>(out + i * V, res);
  }
  for (int64_t c = nvec * V + t; c < C; c += nt) out[c] = f(c);
}

// Forward: (1) + (2) per lane, the lanes' reduction, (3) by the row's first lane. kBlockRow: one
// block per row (gridDim.x == n_rows); otherwise `group` lanes per row, kGroupBlock / group rows
// per block.
template <typename scalar_t, typename acc_t, int V, bool kMax, bool kBlockRow>
__global__ void __launch_bounds__(kBlockThreads<kBlockRow>, kMinBlocksPerSm<kBlockRow>)
    gap_fwd_kernel(const FwdArgs<scalar_t, acc_t> a, const int group) {
  __shared__ acc_t smem[kBlockRow ? kMaxRowBlock / kWarpSize : 1];
  const RowSlot s = row_slot<kBlockRow>(group);
  // No early return: every lane must reach the reduction (shuffles with a full mask; a block-wide
  // barrier), so rows past the end and dead rows only skip the reads.
  const bool valid = kBlockRow || s.row < a.n_rows;
  const int64_t y = valid ? a.target[s.row] : a.o.ignore_index;
  const bool live = valid && row_is_live(y, a.o);

  const acc_t identity = kMax ? -fl_inf<acc_t>() : acc_t(0);
  acc_t r = identity;  // the lane's sum of terms, or its largest gap
  if (live) {
    const scalar_t* x = a.input + s.row * a.row_stride;
    const acc_t x_y = static_cast<acc_t>(x[y]);
    const acc_t margin = a.o.margin;
    const int p = a.o.p;
    row_pass<V, false, acc_t, scalar_t>(x, nullptr, a.o.num_classes, s.lane, s.nt, [&](int64_t col, acc_t x_j) {
      const acc_t h = x_j - x_y + margin;  // (1)
      if (col != y) {
        if constexpr (kMax) {
          r = fl_max(r, h);
        } else {
          r += hinge_term(h, p);  // (2)
        }
      }
    });
  }
  using Op = std::conditional_t<kMax, MaxOp, SumOp>;
  r = row_allreduce<kBlockRow>(r, group, smem, identity, Op{});

  if (valid && s.lane == 0) {
    acc_t loss;
    if (live) {
      const acc_t w_y = a.weight != nullptr ? a.weight[y] : acc_t(1);
      // (3); in mode "max" the term of the largest gap is the largest term (the term is monotone
      // in h; a NaN gap gives 0, as in the reference). With C = 1 there is no j: r stays -inf.
      loss = row_scale(w_y, a.o) * (kMax ? hinge_term(r, a.o.p) : r);
    } else {
      loss = dead_row_fill(y, a.o);
    }
    a.loss[s.row] = loss;
  }
}

// Backward: (1) + (4). Layouts as for the forward.
template <typename scalar_t, typename acc_t, int V, bool kMax, bool kBlockRow>
__global__ void __launch_bounds__(kBlockThreads<kBlockRow>, kMinBlocksPerSm<kBlockRow>)
    gap_bwd_kernel(const BwdArgs<scalar_t, acc_t> a, const int group) {
  using Red = std::conditional_t<kMax, ArgMax<acc_t>, acc_t>;
  __shared__ Red smem[kBlockRow ? kMaxRowBlock / kWarpSize : 1];
  const RowSlot s = row_slot<kBlockRow>(group);
  const bool valid = kBlockRow || s.row < a.n_rows;  // no early return before the reduction
  const int64_t y = valid ? a.target[s.row] : a.o.ignore_index;
  const bool live = valid && row_is_live(y, a.o);
  const int64_t C = a.o.num_classes;
  const scalar_t* x = a.input + s.row * a.row_stride;
  scalar_t* out = a.grad + s.row * C;
  const acc_t margin = a.o.margin;
  const int p = a.o.p;

  // Per-row constants: every lane reads them (a few broadcast loads), which is cheaper than a
  // shared-memory round trip and a barrier.
  acc_t x_y = 0;
  acc_t gscale = 0;  // g * scale
  if (live) {
    x_y = static_cast<acc_t>(x[y]);
    const acc_t w_y = a.weight != nullptr ? a.weight[y] : acc_t(1);
    gscale = a.grad_loss[s.row * a.grad_loss_stride] * row_scale(w_y, a.o);
  }

  if constexpr (kMax) {
    // Read pass: this lane's best candidate, then the row's.
    const bool rank_by_x = is_finite(x_y) && is_finite(margin);
    ArgMax<acc_t> best = no_argmax<acc_t>();
    if (live) {
      row_pass<V, false, acc_t, scalar_t>(x, nullptr, C, s.lane, s.nt, [&](int64_t col, acc_t x_j) {
        if (col != y) {
          const acc_t h = x_j - x_y + margin;  // (1)
          best = ArgMaxOp{}(best, ArgMax<acc_t>{gap_rank_key(x_j, h, rank_by_x), col});
        }
      });
    }
    best = row_allreduce<kBlockRow>(best, group, smem, no_argmax<acc_t>(), ArgMaxOp{});
    if (!valid) return;  // after the last shuffle

    // (4) in mode "max": j gets g scale slope_j and y minus that. Every lane recomputes the same
    // h_j from the same bits (a NaN gap has slope 0).
    const bool has_j = best.j != kNoClass;  // only in a live row with C > 1
    const acc_t h_j = rank_by_x ? best.key - x_y + margin : best.key;
    const acc_t g_j = has_j ? hinge_slope(h_j, p) * gscale : acc_t(0);
    const scalar_t v_j = static_cast<scalar_t>(g_j);
    const scalar_t v_y = static_cast<scalar_t>(has_j ? -g_j : acc_t(0));
    const int64_t j = best.j;
    const int64_t y_col = live ? y : kNoClass;
    const scalar_t fill = static_cast<scalar_t>(live ? acc_t(0) : dead_row_fill(y, a.o));
    write_row<V>(out, C, s.lane, s.nt, [&](int64_t col) { return col == j ? v_j : (col == y_col ? v_y : fill); });
  } else {
    // One streaming pass: g scale slope_j for j != y, a placeholder (0 * g scale) at y.
    acc_t slopes = 0;
    if (live) {
      row_pass<V, true, acc_t>(x, out, C, s.lane, s.nt, [&](int64_t col, acc_t x_j) {
        const acc_t slope = col != y ? hinge_slope(x_j - x_y + margin, p) : acc_t(0);  // (1), (4)
        slopes += slope;
        return slope * gscale;
      });
    } else if (valid) {
      const scalar_t fill = static_cast<scalar_t>(dead_row_fill(y, a.o));
      write_row<V>(out, C, s.lane, s.nt, [&](int64_t) { return fill; });
    }
    slopes = row_allreduce<kBlockRow>(slopes, group, smem, acc_t(0), SumOp{});
    // d loss / d x_y = -sum_{j != y} g scale slope_j, written by the lane that wrote the
    // placeholder, so that the two writes are ordered.
    if (live && s.lane == owner_lane(y, C, V, s.nt)) out[y] = static_cast<scalar_t>(-slopes * gscale);
  }
}

// The same arguments for rows [r0, r0 + rows) only: a launcher covers an N beyond the grid limit
// with several launches instead of grid-stride loops in the kernels.
template <typename scalar_t, typename acc_t>
FwdArgs<scalar_t, acc_t> rows_from(FwdArgs<scalar_t, acc_t> a, int64_t r0, int64_t rows) {
  a.input += r0 * a.row_stride;
  a.target += r0;
  a.loss += r0;
  a.n_rows = rows;
  return a;
}

template <typename scalar_t, typename acc_t>
BwdArgs<scalar_t, acc_t> rows_from(BwdArgs<scalar_t, acc_t> a, int64_t r0, int64_t rows) {
  a.grad_loss += r0 * a.grad_loss_stride;
  a.input += r0 * a.row_stride;
  a.target += r0;
  a.grad += r0 * a.o.num_classes;
  a.n_rows = rows;
  return a;
}

// Lanes per row of the group layout: about kLoadsPerLane loads each, at most a warp.
inline int group_lanes(int64_t cols, int v) {
  return pow2_at_least(ceil_div(ceil_div(cols, v), kLoadsPerLane), kWarpSize);
}

// Row-layout block size: about kElemsPerThread elements per thread.
inline int row_block_threads(int64_t cols) {
  return std::max(kMinRowBlock, pow2_at_least(ceil_div(cols, kElemsPerThread), kMaxRowBlock));
}

// Calls launch(block_row, blocks, threads, args for a range of rows, group) for all rows of `args`,
// in the layout that C picks (block_row: std::true_type for the row layout): the forward and the
// backward share the grid arithmetic.
template <typename Launch, typename Args>
void launch_rows(const Args& args, Launch&& launch, int v) {
  const int64_t n = args.n_rows;
  const int64_t c = args.o.num_classes;
  if (c <= kGroupMaxClasses) {
    const int group = group_lanes(c, v);
    const int rows_per_block = kGroupBlock / group;
    const int64_t max_rows = kMaxGrid * rows_per_block;
    for (int64_t r0 = 0; r0 < n; r0 += max_rows) {
      const int64_t rows = std::min(max_rows, n - r0);
      const auto blocks = static_cast<unsigned>(ceil_div(rows, rows_per_block));
      launch(std::false_type{}, blocks, kGroupBlock, rows_from(args, r0, rows), group);
    }
    return;
  }
  const int threads = row_block_threads(c);
  for (int64_t r0 = 0; r0 < n; r0 += kMaxGrid) {
    const int64_t rows = std::min(kMaxGrid, n - r0);
    launch(std::true_type{}, static_cast<unsigned>(rows), threads, rows_from(args, r0, rows), threads);
  }
}

template <typename scalar_t, typename acc_t, int V, bool kMax>
void launch_fwd(const FwdArgs<scalar_t, acc_t>& args, cudaStream_t stream) {
  launch_rows(
      args,
      [&](auto block_row, unsigned blocks, int threads, const FwdArgs<scalar_t, acc_t>& a, int group) {
        gap_fwd_kernel<scalar_t, acc_t, V, kMax, decltype(block_row)::value><<<blocks, threads, 0, stream>>>(a, group);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      },
      V);
}

template <typename scalar_t, typename acc_t, int V, bool kMax>
void launch_bwd(const BwdArgs<scalar_t, acc_t>& args, cudaStream_t stream) {
  launch_rows(
      args,
      [&](auto block_row, unsigned blocks, int threads, const BwdArgs<scalar_t, acc_t>& a, int group) {
        gap_bwd_kernel<scalar_t, acc_t, V, kMax, decltype(block_row)::value><<<blocks, threads, 0, stream>>>(a, group);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      },
      V);
}

at::Tensor gap_loss_fwd_cuda(const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                             double margin, int64_t p, int64_t ignore_index, bool class_normalize, bool max_mode) {
  check_gap_args(input, target, weight, p);
  TORCH_CHECK(input.is_cuda(), "fusedloss: gap_loss_fwd (CUDA) needs CUDA input");
  const c10::cuda::CUDAGuard device_guard(input.device());

  const int64_t n = input.size(0);
  const int64_t c = input.size(1);
  const auto acc_dtype = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor loss = at::empty({n}, input.options().dtype(acc_dtype));
  if (n == 0) return loss;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fusedloss_gap_loss_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    FwdArgs<scalar_t, acc_t> args;
    args.input = input.const_data_ptr<scalar_t>();
    args.row_stride = input.stride(0);
    args.target = target.const_data_ptr<int64_t>();
    args.weight = weight.has_value() ? weight->const_data_ptr<acc_t>() : nullptr;
    args.loss = loss.mutable_data_ptr<acc_t>();
    args.n_rows = n;
    args.o = gap::make_options<acc_t>(c, margin, p, ignore_index, class_normalize, max_mode);
    constexpr int kVec = 16 / sizeof(scalar_t);
    const bool vec = rows_aligned16(args.input, args.row_stride, n);
    if (vec && max_mode) {
      launch_fwd<scalar_t, acc_t, kVec, true>(args, stream);
    } else if (vec) {
      launch_fwd<scalar_t, acc_t, kVec, false>(args, stream);
    } else if (max_mode) {
      launch_fwd<scalar_t, acc_t, 1, true>(args, stream);
    } else {
      launch_fwd<scalar_t, acc_t, 1, false>(args, stream);
    }
  });
  return loss;
}

at::Tensor gap_loss_bwd_cuda(const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& target,
                             const std::optional<at::Tensor>& weight, double margin, int64_t p, int64_t ignore_index,
                             bool class_normalize, bool max_mode) {
  check_gap_args(input, target, weight, p);
  check_row_grad(grad_loss, input, "grad_loss");
  TORCH_CHECK(input.is_cuda(), "fusedloss: gap_loss_bwd (CUDA) needs CUDA input");
  const c10::cuda::CUDAGuard device_guard(input.device());

  const int64_t n = input.size(0);
  const int64_t c = input.size(1);
  at::Tensor grad = at::empty({n, c}, input.options());  // contiguous
  if (grad.numel() == 0) return grad;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fusedloss_gap_loss_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    BwdArgs<scalar_t, acc_t> args;
    args.grad_loss = grad_loss.const_data_ptr<acc_t>();
    args.grad_loss_stride = grad_loss.stride(0);
    args.input = input.const_data_ptr<scalar_t>();
    args.row_stride = input.stride(0);
    args.target = target.const_data_ptr<int64_t>();
    args.weight = weight.has_value() ? weight->const_data_ptr<acc_t>() : nullptr;
    args.grad = grad.mutable_data_ptr<scalar_t>();
    args.n_rows = n;
    args.o = gap::make_options<acc_t>(c, margin, p, ignore_index, class_normalize, max_mode);
    // The vector path needs whole vectors on both sides: aligned input rows, and C % V == 0 for
    // the gradient rows (row stride C) to stay aligned.
    constexpr int kVec = 16 / sizeof(scalar_t);
    const bool vec = c % kVec == 0 && is_aligned16(args.grad) && rows_aligned16(args.input, args.row_stride, n);
    if (vec && max_mode) {
      launch_bwd<scalar_t, acc_t, kVec, true>(args, stream);
    } else if (vec) {
      launch_bwd<scalar_t, acc_t, kVec, false>(args, stream);
    } else if (max_mode) {
      launch_bwd<scalar_t, acc_t, 1, true>(args, stream);
    } else {
      launch_bwd<scalar_t, acc_t, 1, false>(args, stream);
    }
  });
  return grad;
}

}  // namespace
}  // namespace gap
}  // namespace fusedloss

TORCH_LIBRARY_IMPL(fusedloss, CUDA, m) {
  m.impl("gap_loss_fwd", &fusedloss::gap::gap_loss_fwd_cuda);
  m.impl("gap_loss_bwd", &fusedloss::gap::gap_loss_bwd_cuda);
}
