// CUDA kernels of fusedloss::cross_entropy_fwd, cross_entropy_bwd, cross_entropy_fwd_grad_ and
// focal_loss_fwd (the forward plus a per-row finish, at the end of this file). The per-row math
// (and its derivation) lives in fusedloss/cross_entropy_math.h; this file only decides who reads
// what and in which order.
//
// Launch configuration. N rows of C classes; V = 16 / sizeof(scalar_t) elements per 16-byte load
// (4 fp32, 8 fp16/bf16, 2 fp64), or V = 1 when some row base is not 16-byte aligned.
//
// Forward: one read of each row, an online RowStats per thread (update_stats), then a reduction
// of the per-thread stats with merge_stats in a fixed tree order.
//   * C <= 1024 ("group" kernel, 128-thread blocks): a whole block on a 10-class row would leave
//     more than 99% of its threads idle, so a row gets G lanes of one warp instead, G the power
//     of two (1..32) that gives each lane about 4 loads (up to 8 vector or 32 scalar loads for
//     the longest rows); a block covers 128 / G rows. The lanes of a row merge with shuffles
//     inside their group: no shared memory, no __syncthreads.
//   * C > 1024 ("row" kernel): one block per row, 128..1024 threads (a power of two, about 32
//     elements per thread), warp shuffles then one shared-memory hop across the warps.
//   * C >= 65536 and N < 2 blocks per SM ("split"): one block per row would leave most SMs idle
//     (N = 1 with a 256k vocabulary uses one SM of 132), so each row is cut into S ranges of at
//     least 8192 columns, S * N about 2 blocks per SM. Stage 1 writes one RowStats per
//     (row, range) to a workspace; stage 2, one thread per row, merges them in range order and
//     finishes the row.
//   The target logit z_y is read once per row by the thread that finishes it, only when
//   0 <= y < C: an out-of-range target never leads to an out-of-bounds read.
//   Outputs per row: loss, lse, and stats = (max, log_s) for the backward (row_loss).
// Backward: elementwise given the saved (max, log_s). 256-thread blocks over (row group, column chunk)
//   tiles: a row gets G lanes (a power of two up to 256) that each do up to 4 loads, a chunk is
//   G * 4 loads, so a small C packs 256 / G rows into a block and a large C spreads a row over
//   ceil(C / (1024 V)) blocks; either way there are about N * C / (1024 V) blocks to fill the GPU.
//   Loads and stores are 16-byte vectors when the logits rows and the gradient rows are aligned.
// Forward + gradient in place (fwd_grad_, the row kernel of chunked linear cross-entropy): the
//   forward's group and row kernels, extended: once the row's stats are merged, the finishing thread
//   reads z_y and writes loss and lse, a barrier (__syncwarp for a group, __syncthreads for a
//   block) orders every read of the row before any write, then each thread re-reads the columns it
//   scanned (from L1/L2) and overwrites them with their gradient (grad_lse = 0). Split rows
//   (few rows, C >= 65536) run the forward's two split stages into a (max, log_s) workspace, then
//   the backward kernel with the gradient pointer equal to the logits: it loads each element and
//   stores its gradient from the same thread, so it is safe in place.
//
// Determinism: no atomics; every reduction order is a function of (N, C, dtype, alignment, SM
// count) only, so results are bitwise reproducible run to run on a given GPU model.
// Offsets: row offsets and column indices are int64_t (N * C may exceed 2^31).
//
// Headers: c10/cuda rather than ATen/cuda/CUDAContext.h, which pulls in cuSPARSE/cuBLAS headers
// that a bare CUDA toolkit (or torch's pip wheels without their include dirs on the path) lacks.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>

#include "fusedloss/checks.h"
#include "fusedloss/cross_entropy_math.h"
#include "fusedloss/cuda_utils.cuh"

namespace fusedloss {
namespace ce {
namespace {

using cuda_utils::ceil_div;
using cuda_utils::is_aligned16;
using cuda_utils::kFullMask;
using cuda_utils::kMaxGrid;
using cuda_utils::kWarpSize;
using cuda_utils::load_pack;
using cuda_utils::Pack;
using cuda_utils::pow2_at_least;
using cuda_utils::rows_aligned16;
using cuda_utils::store_pack;

// Forward.
constexpr int kGroupBlock = 128;             // threads of the group kernel
constexpr int64_t kGroupMaxClasses = 1024;   // C up to this uses the group kernel
constexpr int kLoadsPerLane = 4;             // group kernel: loads per lane that set G
constexpr int kElemsPerThread = 32;          // row/split kernels: elements per thread that set the block
constexpr int kMinRowBlock = 128;
constexpr int kMaxRowBlock = 1024;
constexpr int kUnroll = 4;                   // loads in flight per thread in the scan loop
constexpr int64_t kSplitMinClasses = 65536;  // no split below this C
constexpr int64_t kSplitMinCols = 8192;      // smallest range of one split block
constexpr int kSplitBlocksPerSm = 2;
constexpr int kFinishBlock = 128;
// Backward.
constexpr int kBwdBlock = 256;
constexpr int kBwdIlp = 4;                   // loads per thread per tile

// Row/split block size: about kElemsPerThread elements per thread, so short rows do not pay for
// idle threads in the reduction and long rows get the full 1024.
inline int row_block_threads(int64_t cols) {
  return std::max(kMinRowBlock, pow2_at_least(ceil_div(cols, kElemsPerThread), kMaxRowBlock));
}

template <typename P>
struct PackWidth;
template <typename T, int V>
struct PackWidth<Pack<T, V>> {
  static constexpr int value = V;
};

template <typename scalar_t, typename acc_t>
struct FwdArgs {
  const scalar_t* logits;
  int64_t row_stride;
  const int64_t* target;
  const acc_t* weight;  // nullptr: every w_j = 1
  acc_t* loss;
  acc_t* lse;
  acc_t* stats;  // (N, 2) contiguous: (max, log_s); nullptr in FwdGradArgs (not stored)
  int64_t n_rows;
  Options<acc_t> o;
  int stats_width = 2;  // 4: stats also holds the extras (logprob, entropy), cross_entropy_math.h (7)
};

template <typename scalar_t, typename acc_t>
struct BwdArgs {
  const acc_t* grad_loss;
  int64_t grad_loss_stride;
  const acc_t* grad_lse;  // nullptr: no gradient flows into lse
  int64_t grad_lse_stride;
  const scalar_t* logits;
  int64_t row_stride;
  const int64_t* target;
  const acc_t* weight;
  const acc_t* weight_sum;  // device scalar W; nullptr: W = C (or W unused: no smoothing)
  const acc_t* stats;       // (N, stats_width) contiguous: the forward's (max, log_s[, logprob, entropy])
  scalar_t* grad;           // (N, C) contiguous
  int64_t n_rows;
  Options<acc_t> o;
  int stats_width = 2;
  const acc_t* grad_logprob = nullptr;  // the extras' gradients (7); nullptr: none
  int64_t grad_logprob_stride = 0;
  const acc_t* grad_entropy = nullptr;  // needs stats_width 4 (the entropy is read from stats)
  int64_t grad_entropy_stride = 0;
};

// Forward + gradient in place: the forward's arguments (stats unused), and the backward's.
template <typename scalar_t, typename acc_t>
struct FwdGradArgs {
  FwdArgs<scalar_t, acc_t> f;  // f.logits is grad, read-only view; rows contiguous (row_stride C)
  scalar_t* grad;              // the logits themselves, overwritten with the gradient
  const acc_t* grad_scale;     // nullptr: 1
  int64_t grad_scale_stride;
  const acc_t* weight_sum;     // as in BwdArgs
};

template <typename acc_t>
__device__ __forceinline__ bool row_is_live(int64_t y, const Options<acc_t>& o) {
  return !is_ignored(y, o) && target_in_range(y, o);
}

// What a dead row's outputs hold: 0 for an ignored row, NaN for a target outside [0, C).
template <typename acc_t>
__device__ __forceinline__ acc_t dead_row_value(int64_t y, const Options<acc_t>& o) {
  return is_ignored(y, o) ? acc_t(0) : fl_nan<acc_t>();
}

// Visits the columns [begin, end) of one row: thread t of nt takes the V-wide vectors t, t + nt, ...
// (coalesced across the threads), then the < V tail columns one by one (rows whose length is not a
// multiple of V: a padded row stride). visit(pack, col) gets a Pack<scalar_t, V> (Pack<scalar_t, 1>
// in the tail) whose first element is column col. begin must be a multiple of V so that every
// vector is 16-byte aligned. The same (begin, end, t, nt) give the same columns to the same thread
// (whatever UNROLL): the forward + gradient kernels overwrite, per thread, what that thread read.
template <int V, int UNROLL = kUnroll, typename scalar_t, typename Visit>
__device__ __forceinline__ void visit_cols(const scalar_t* x, int64_t begin, int64_t end, int t, int nt,
                                           Visit&& visit) {
  const int64_t nvec = (end - begin) / V;
  const scalar_t* xb = x + begin;
  int64_t i = t;
  // UNROLL independent loads are issued before their (serially dependent) visits, so each
  // thread keeps several requests in flight.
  for (; i + int64_t(UNROLL - 1) * nt < nvec; i += int64_t(UNROLL) * nt) {
    Pack<scalar_t, V> p[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      p[u] = load_pack<V>(xb + (i + int64_t(u) * nt) * V);
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      visit(p[u], begin + (i + int64_t(u) * nt) * V);
    }
  }
  for (; i < nvec; i += nt) {
    visit(load_pack<V>(xb + i * V), begin + i * V);
  }
  for (int64_t c = begin + nvec * V + t; c < end; c += nt) {
    visit(load_pack<1>(x + c), c);
  }
}

// Folds the columns [begin, end) of one row into this thread's stats (visit_cols' columns).
template <int V, typename scalar_t, typename acc_t>
__device__ __forceinline__ void scan_cols(RowStats<acc_t>& st, const scalar_t* x, int64_t begin,
                                          int64_t end, int t, int nt, const acc_t* weight,
                                          const Options<acc_t>& o, bool entropy = false) {
  // The weights only enter the stats through the smoothing sums (sum_wd, sum_w): skip their
  // reads without smoothing.
  const bool smoothing = o.smoothing > acc_t(0);
  visit_cols<V>(x, begin, end, t, nt, [&](const auto& p, int64_t col) {
    constexpr int W = PackWidth<std::decay_t<decltype(p)>>::value;
#pragma unroll
    for (int e = 0; e < W; ++e) {
      const acc_t z = transform_logit<acc_t>(static_cast<acc_t>(p.v[e]), o);
      const acc_t w = smoothing && weight != nullptr ? weight[col + e] : acc_t(1);
      update_stats(st, z, w, smoothing, entropy);
    }
  });
}

// (4) + (5) for column col of a live row, in scalar_t. The true class goes through grad_target:
// its p_y - 1 comes from expm1 in acc_t, where p_y * A - c_y would cancel when p_y is close to 1.
// need_w: the weights are read only where they enter (c.smooth * w_k, with label smoothing).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ scalar_t grad_at(scalar_t xv, int64_t col, int64_t y, acc_t w_y, const acc_t* weight,
                                            bool need_w, const GradCoefs<acc_t>& c, const Options<acc_t>& o) {
  const acc_t z = transform_logit<acc_t>(static_cast<acc_t>(xv), o);
  const acc_t d = col == y ? grad_target(z, w_y, c, o) : grad_element(z, need_w ? weight[col] : acc_t(1), c, o);
  return static_cast<scalar_t>(d);
}

// Overwrites the columns [0, C) of a live row with their gradient, thread t of nt taking
// visit_cols' columns: each thread loads a vector, then stores its gradient at the same place.
// The row was just read, so these loads hit L1/L2; in float64 the row constants leave no room for
// kUnroll loads in flight under the row kernel's 64-register bound (ptxas spilled), so one.
template <int V, typename scalar_t, typename acc_t>
__device__ __forceinline__ void write_grad_cols(scalar_t* g, int64_t C, int t, int nt, int64_t y, acc_t w_y,
                                                const acc_t* weight, const GradCoefs<acc_t>& c,
                                                const Options<acc_t>& o) {
  constexpr int kGradUnroll = sizeof(acc_t) == 8 ? 1 : kUnroll;
  const bool need_w = weight != nullptr && o.smoothing > acc_t(0);
  visit_cols<V, kGradUnroll>(g, 0, C, t, nt, [&](const auto& p, int64_t col) {
    using P = std::decay_t<decltype(p)>;
    constexpr int W = PackWidth<P>::value;
    P out;
#pragma unroll
    for (int e = 0; e < W; ++e) out.v[e] = grad_at(p.v[e], col + e, y, w_y, weight, need_w, c, o);
    store_pack<W>(g + col, out);
  });
}

// Writes `value` over the columns [0, C) of a dead row, with visit_cols' columns (nothing read).
template <int V, typename scalar_t>
__device__ __forceinline__ void fill_cols(scalar_t* g, int64_t C, int t, int nt, scalar_t value) {
  Pack<scalar_t, V> out;
#pragma unroll
  for (int e = 0; e < V; ++e) out.v[e] = value;
  const int64_t nvec = C / V;
  for (int64_t i = t; i < nvec; i += nt) store_pack<V>(g + i * V, out);
  for (int64_t c = nvec * V + t; c < C; c += nt) g[c] = value;
}

// Tree reduction over aligned groups of `width` lanes (a power of two <= 32); the group's first
// lane ends with the merge of the whole group, in a fixed order. Every lane of the warp must call
// it (full mask); lanes whose partner lies outside the warp merge garbage but are never read.
template <typename acc_t>
__device__ __forceinline__ RowStats<acc_t> reduce_lanes(RowStats<acc_t> s, int width) {
  for (int off = width / 2; off > 0; off /= 2) {
    RowStats<acc_t> other;
    other.max = __shfl_down_sync(kFullMask, s.max, off);
    other.sumexp = __shfl_down_sync(kFullMask, s.sumexp, off);
    other.sum_wd = __shfl_down_sync(kFullMask, s.sum_wd, off);
    other.sum_w = __shfl_down_sync(kFullMask, s.sum_w, off);
    other.sum_ed = __shfl_down_sync(kFullMask, s.sum_ed, off);
    s = merge_stats(s, other);
  }
  return s;
}

// Block-wide merge (blockDim.x a multiple of 32, <= 1024); the result is valid in thread 0.
// Must be reached by every thread of the block, at most once per kernel (smem is not reusable
// after it without another barrier).
template <typename acc_t>
__device__ __forceinline__ RowStats<acc_t> reduce_block(RowStats<acc_t> s, RowStats<acc_t>* smem) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int n_warps = blockDim.x / kWarpSize;
  s = reduce_lanes(s, kWarpSize);
  if (lane == 0) smem[warp] = s;
  __syncthreads();
  if (warp == 0) {
    s = lane < n_warps ? smem[lane] : empty_stats<acc_t>();
    s = reduce_lanes(s, kWarpSize);
  }
  return s;
}

// Writes the loss and lse of a live row from its merged stats (reading its target logit) and
// returns log_s.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t finish_live_row(const RowStats<acc_t>& st, int64_t row, int64_t y,
                                                 const FwdArgs<scalar_t, acc_t>& a) {
  const acc_t z_y = transform_logit<acc_t>(static_cast<acc_t>(a.logits[row * a.row_stride + y]), a.o);
  const acc_t w_y = a.weight != nullptr ? a.weight[y] : acc_t(1);
  acc_t log_s;
  row_loss(st, z_y, w_y, a.o, a.loss + row, a.lse + row, &log_s);
  return log_s;
}

// Writes the row's loss, lse and (max, log_s) from its merged stats: zeros for an ignored row,
// NaN for a target outside [0, C) (without touching the logits), row_loss otherwise.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void finish_row(const RowStats<acc_t>& st, int64_t row, int64_t y,
                                           const FwdArgs<scalar_t, acc_t>& a) {
  acc_t* stats = a.stats + a.stats_width * row;
  if (!row_is_live(y, a.o)) {
    const acc_t fill = dead_row_value(y, a.o);
    a.loss[row] = fill;
    a.lse[row] = fill;
    for (int k = 0; k < a.stats_width; ++k) stats[k] = fill;
    return;
  }
  stats[1] = finish_live_row(st, row, y, a);
  stats[0] = st.max;
  if (a.stats_width == 4) {
    const acc_t z_y = transform_logit<acc_t>(static_cast<acc_t>(a.logits[row * a.row_stride + y]), a.o);
    row_extras(st, z_y, stats[1], stats + 2, stats + 3);
  }
}

// C <= 1024: `group` lanes per row, kGroupBlock / group rows per block.
template <typename scalar_t, typename acc_t, int V>
__global__ void __launch_bounds__(kGroupBlock)
    ce_fwd_group_kernel(const FwdArgs<scalar_t, acc_t> a, const int group) {
  const int rows_per_block = kGroupBlock / group;
  const int lane = threadIdx.x & (group - 1);
  const int64_t row = int64_t(blockIdx.x) * rows_per_block + threadIdx.x / group;
  // No early return: every lane of the warp must reach the shuffles in reduce_lanes, so rows past
  // the end and dead rows only skip the scan.
  const bool valid = row < a.n_rows;
  const int64_t y = valid ? a.target[row] : a.o.ignore_index;
  RowStats<acc_t> st = empty_stats<acc_t>();
  if (valid && row_is_live(y, a.o)) {
    scan_cols<V>(st, a.logits + row * a.row_stride, 0, a.o.num_classes, lane, group, a.weight, a.o,
                 a.stats_width == 4);
  }
  st = reduce_lanes(st, group);
  if (valid && lane == 0) finish_row(st, row, y, a);
}

// C > 1024: one block per row (gridDim.x == n_rows).
template <typename scalar_t, typename acc_t, int V>
__global__ void __launch_bounds__(kMaxRowBlock, 1) ce_fwd_row_kernel(const FwdArgs<scalar_t, acc_t> a) {
  __shared__ RowStats<acc_t> smem[kMaxRowBlock / kWarpSize];
  const int64_t row = blockIdx.x;
  const int64_t y = a.target[row];
  RowStats<acc_t> st = empty_stats<acc_t>();
  // Block-uniform branch (one row per block), so the barriers in reduce_block are safe.
  if (row_is_live(y, a.o)) {
    scan_cols<V>(st, a.logits + row * a.row_stride, 0, a.o.num_classes, threadIdx.x, blockDim.x,
                 a.weight, a.o, a.stats_width == 4);
    st = reduce_block(st, smem);
  }
  if (threadIdx.x == 0) finish_row(st, row, y, a);
}

// Split stage 1: block b takes columns [s * split_cols, (s + 1) * split_cols) of row b / splits,
// s = b % splits, and stores their stats in partial[row * splits + s].
template <typename scalar_t, typename acc_t, int V>
__global__ void __launch_bounds__(kMaxRowBlock, 1)
    ce_fwd_split_kernel(const FwdArgs<scalar_t, acc_t> a, const int splits, const int64_t split_cols,
                        RowStats<acc_t>* __restrict__ partial) {
  __shared__ RowStats<acc_t> smem[kMaxRowBlock / kWarpSize];
  const int64_t row = blockIdx.x / splits;
  const int split = blockIdx.x % splits;
  const int64_t y = a.target[row];
  // Block-uniform, before any barrier; stage 2 does not read a dead row's partials.
  if (!row_is_live(y, a.o)) return;
  const int64_t begin = split * split_cols;
  const int64_t end = min(begin + split_cols, a.o.num_classes);
  RowStats<acc_t> st = empty_stats<acc_t>();
  scan_cols<V>(st, a.logits + row * a.row_stride, begin, end, threadIdx.x, blockDim.x, a.weight, a.o,
               a.stats_width == 4);
  st = reduce_block(st, smem);
  if (threadIdx.x == 0) partial[row * splits + split] = st;
}

// Split stage 2: one thread per row merges the row's partials in split order.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kFinishBlock)
    ce_fwd_split_finish_kernel(const FwdArgs<scalar_t, acc_t> a, const int splits,
                               const RowStats<acc_t>* __restrict__ partial) {
  const int64_t row = int64_t(blockIdx.x) * kFinishBlock + threadIdx.x;
  if (row >= a.n_rows) return;
  const int64_t y = a.target[row];
  RowStats<acc_t> st = empty_stats<acc_t>();
  if (row_is_live(y, a.o)) {
    for (int s = 0; s < splits; ++s) {
      st = merge_stats(st, partial[row * splits + s]);
    }
  }
  finish_row(st, row, y, a);
}

// Backward. Block b is the tile (row group b / chunks_per_row, chunk b % chunks_per_row); thread
// (local_row, lane) writes the vectors chunk * group * kBwdIlp + k * group + lane, k < kBwdIlp, of
// row row_group * rows_per_block + local_row. On the vector path C % V == 0, so every vector is
// whole and aligned.
template <typename scalar_t, typename acc_t, int V>
__global__ void __launch_bounds__(kBwdBlock)
    ce_bwd_kernel(const BwdArgs<scalar_t, acc_t> a, const int group, const unsigned chunks_per_row) {
  using PackT = Pack<scalar_t, V>;
  const int rows_per_block = kBwdBlock / group;
  const int lane = threadIdx.x & (group - 1);
  const unsigned row_group = blockIdx.x / chunks_per_row;
  const unsigned chunk = blockIdx.x - row_group * chunks_per_row;
  const int64_t row = int64_t(row_group) * rows_per_block + threadIdx.x / group;
  if (row >= a.n_rows) return;  // no barriers below

  const int64_t C = a.o.num_classes;
  const int64_t nvec = C / V;
  const int64_t v_first = int64_t(chunk) * group * kBwdIlp + lane;
  // In place (fwd_grad_'s split path, grad == logits): each thread stores only the vectors it
  // loaded itself, after loading them; the target's value comes from the thread's own load.
  scalar_t* g = a.grad + row * C;
  const int64_t y = a.target[row];
  // c.smooth * w_k vanishes without smoothing: skip the per-element weight reads then.
  const bool need_w = a.weight != nullptr && a.o.smoothing > acc_t(0);

  if (!row_is_live(y, a.o)) {
    // Ignored rows get 0; an out-of-range target poisons its row with NaN instead of a device
    // assert, and its logits are never read.
    const scalar_t fill = static_cast<scalar_t>(dead_row_value(y, a.o));
    PackT out;
#pragma unroll
    for (int e = 0; e < V; ++e) out.v[e] = fill;
#pragma unroll
    for (int k = 0; k < kBwdIlp; ++k) {
      const int64_t vi = v_first + int64_t(k) * group;
      if (vi < nvec) store_pack<V>(g + vi * V, out);
    }
    return;
  }

  // Loads first, so that they are in flight while the row constants are fetched.
  const scalar_t* x = a.logits + row * a.row_stride;
  PackT in[kBwdIlp];
#pragma unroll
  for (int k = 0; k < kBwdIlp; ++k) {
    const int64_t vi = v_first + int64_t(k) * group;
    if (vi < nvec) in[k] = load_pack<V>(x + vi * V);
  }

  // Per-row constants: every thread of the row recomputes them (a handful of broadcast loads),
  // which is cheaper than a shared-memory round trip and a barrier.
  const acc_t w_y = a.weight != nullptr ? a.weight[y] : acc_t(1);
  const acc_t w_sum = a.weight_sum != nullptr ? *a.weight_sum : static_cast<acc_t>(C);
  const acc_t g_loss = a.grad_loss[row * a.grad_loss_stride];
  const acc_t g_lse = a.grad_lse != nullptr ? a.grad_lse[row * a.grad_lse_stride] : acc_t(0);
  const acc_t* st = a.stats + a.stats_width * row;
  const acc_t g_lp = a.grad_logprob != nullptr ? a.grad_logprob[row * a.grad_logprob_stride] : acc_t(0);
  const acc_t g_h = a.grad_entropy != nullptr ? a.grad_entropy[row * a.grad_entropy_stride] : acc_t(0);
  const acc_t entropy = a.grad_entropy != nullptr ? st[3] : acc_t(0);
  const GradCoefs<acc_t> coefs = grad_coefs(st[0], st[1], w_y, w_sum, g_loss, g_lse, a.o, g_lp, g_h, entropy);

#pragma unroll
  for (int k = 0; k < kBwdIlp; ++k) {
    const int64_t vi = v_first + int64_t(k) * group;
    if (vi < nvec) {
      PackT out;
#pragma unroll
      for (int e = 0; e < V; ++e) {
        out.v[e] = grad_at(in[k].v[e], vi * V + e, y, w_y, a.weight, need_w, coefs, a.o);
      }
      store_pack<V>(g + vi * V, out);
    }
  }
}

// Forward + gradient in place, C <= 1024: the forward's group kernel, then each lane overwrites the
// columns it scanned with their gradient.
template <typename scalar_t, typename acc_t, int V>
__global__ void __launch_bounds__(kGroupBlock)
    ce_fwd_grad_group_kernel(const FwdGradArgs<scalar_t, acc_t> a, const int group) {
  const FwdArgs<scalar_t, acc_t>& f = a.f;
  const int64_t C = f.o.num_classes;
  const int rows_per_block = kGroupBlock / group;
  const int lane = threadIdx.x & (group - 1);
  const int64_t row = int64_t(blockIdx.x) * rows_per_block + threadIdx.x / group;
  // No early return before the shuffles: every lane of the warp must reach them.
  const bool valid = row < f.n_rows;
  const int64_t y = valid ? f.target[row] : f.o.ignore_index;
  const bool live = valid && row_is_live(y, f.o);
  RowStats<acc_t> st = empty_stats<acc_t>();
  if (live) scan_cols<V>(st, f.logits + row * C, 0, C, lane, group, f.weight, f.o);
  st = reduce_lanes(st, group);
  // The group's first lane holds the merged stats: it finishes the row (reading z_y) and passes
  // (max, log_s) to the group's other lanes.
  acc_t log_s = acc_t(0);
  if (valid && lane == 0) {
    if (live) {
      log_s = finish_live_row(st, row, y, f);
    } else {
      f.loss[row] = dead_row_value(y, f.o);
      f.lse[row] = dead_row_value(y, f.o);
    }
  }
  const acc_t max = __shfl_sync(kFullMask, st.max, 0, group);
  log_s = __shfl_sync(kFullMask, log_s, 0, group);
  // Every read of the row (the lanes' scans, the first lane's z_y) happens before any write.
  __syncwarp();
  if (!valid) return;
  scalar_t* g = a.grad + row * C;
  if (!live) {
    fill_cols<V>(g, C, lane, group, static_cast<scalar_t>(dead_row_value(y, f.o)));
    return;
  }
  const acc_t w_y = f.weight != nullptr ? f.weight[y] : acc_t(1);
  const acc_t w_sum = a.weight_sum != nullptr ? *a.weight_sum : static_cast<acc_t>(C);
  const acc_t g_scale = a.grad_scale != nullptr ? a.grad_scale[row * a.grad_scale_stride] : acc_t(1);
  const GradCoefs<acc_t> coefs = grad_coefs(max, log_s, w_y, w_sum, g_scale, acc_t(0), f.o);
  write_grad_cols<V>(g, C, lane, group, y, w_y, f.weight, coefs, f.o);
}

// Forward + gradient in place, C > 1024 without a split: the forward's row kernel, then every
// thread overwrites the columns it scanned with their gradient.
template <typename scalar_t, typename acc_t, int V>
__global__ void __launch_bounds__(kMaxRowBlock, 1) ce_fwd_grad_row_kernel(const FwdGradArgs<scalar_t, acc_t> a) {
  __shared__ RowStats<acc_t> smem[kMaxRowBlock / kWarpSize];
  __shared__ acc_t row_consts[2];  // (max, log_s)
  const FwdArgs<scalar_t, acc_t>& f = a.f;
  const int64_t C = f.o.num_classes;
  const int64_t row = blockIdx.x;
  const int64_t y = f.target[row];
  scalar_t* g = a.grad + row * C;
  // Block-uniform branches (one row per block), so the barriers below are safe.
  if (!row_is_live(y, f.o)) {
    if (threadIdx.x == 0) {
      f.loss[row] = dead_row_value(y, f.o);
      f.lse[row] = dead_row_value(y, f.o);
    }
    fill_cols<V>(g, C, threadIdx.x, blockDim.x, static_cast<scalar_t>(dead_row_value(y, f.o)));
    return;
  }
  RowStats<acc_t> st = empty_stats<acc_t>();
  scan_cols<V>(st, f.logits + row * C, 0, C, threadIdx.x, blockDim.x, f.weight, f.o);
  st = reduce_block(st, smem);
  if (threadIdx.x == 0) {
    row_consts[1] = finish_live_row(st, row, y, f);
    row_consts[0] = st.max;
  }
  // Every read of the row (the threads' scans, thread 0's z_y) happens before any write.
  __syncthreads();
  const acc_t w_y = f.weight != nullptr ? f.weight[y] : acc_t(1);
  const acc_t w_sum = a.weight_sum != nullptr ? *a.weight_sum : static_cast<acc_t>(C);
  const acc_t g_scale = a.grad_scale != nullptr ? a.grad_scale[row * a.grad_scale_stride] : acc_t(1);
  const GradCoefs<acc_t> coefs = grad_coefs(row_consts[0], row_consts[1], w_y, w_sum, g_scale, acc_t(0), f.o);
  write_grad_cols<V>(g, C, threadIdx.x, blockDim.x, y, w_y, f.weight, coefs, f.o);
}

// The same arguments for rows [r0, r0 + rows) only: grids are 1-D with at most 2^31 - 1 blocks,
// so a launcher covers a (hypothetical) larger N with several launches instead of grid-stride
// loops in the kernels (which made ptxas spill in the shuffle-reduction kernels).
template <typename scalar_t, typename acc_t>
FwdArgs<scalar_t, acc_t> rows_from(FwdArgs<scalar_t, acc_t> a, int64_t r0, int64_t rows) {
  a.logits += r0 * a.row_stride;
  a.target += r0;
  a.loss += r0;
  a.lse += r0;
  if (a.stats != nullptr) a.stats += a.stats_width * r0;
  a.n_rows = rows;
  return a;
}

template <typename scalar_t, typename acc_t>
FwdGradArgs<scalar_t, acc_t> rows_from(FwdGradArgs<scalar_t, acc_t> a, int64_t r0, int64_t rows) {
  a.f = rows_from(a.f, r0, rows);
  a.grad += r0 * a.f.o.num_classes;
  if (a.grad_scale != nullptr) a.grad_scale += r0 * a.grad_scale_stride;
  return a;
}

template <typename scalar_t, typename acc_t>
BwdArgs<scalar_t, acc_t> rows_from(BwdArgs<scalar_t, acc_t> a, int64_t r0, int64_t rows) {
  a.grad_loss += r0 * a.grad_loss_stride;
  if (a.grad_lse != nullptr) a.grad_lse += r0 * a.grad_lse_stride;
  a.logits += r0 * a.row_stride;
  a.target += r0;
  a.stats += a.stats_width * r0;
  if (a.grad_logprob != nullptr) a.grad_logprob += r0 * a.grad_logprob_stride;
  if (a.grad_entropy != nullptr) a.grad_entropy += r0 * a.grad_entropy_stride;
  a.grad += r0 * a.o.num_classes;
  a.n_rows = rows;
  return a;
}

template <typename acc_t>
Options<acc_t> make_options(int64_t num_classes, int64_t ignore_index, double label_smoothing,
                            double z_loss, double softcap, double temperature) {
  TORCH_CHECK(temperature > 0, "fusedloss: temperature must be > 0, got ", temperature);
  return Options<acc_t>{num_classes,
                        ignore_index,
                        static_cast<acc_t>(label_smoothing),
                        static_cast<acc_t>(z_loss),
                        static_cast<acc_t>(softcap),
                        static_cast<acc_t>(1.0 / temperature)};
}

// The backward's W = sum_j w_j, as a device scalar: no host sync. Only the smoothing terms use W
// (the forward accumulates it in RowStats::sum_w instead).
inline std::optional<at::Tensor> weight_sum_of(const std::optional<at::Tensor>& weight,
                                               double label_smoothing) {
  if (weight.has_value() && label_smoothing > 0) return weight->sum();
  return std::nullopt;
}

// Group kernels: the lanes of a row, each doing about kLoadsPerLane loads of V elements.
inline int group_lanes(int64_t c, int v) {
  return pow2_at_least(ceil_div(ceil_div(c, v), kLoadsPerLane), kWarpSize);
}

// How many ranges each row of a C > kGroupMaxClasses forward is cut into (1: no split).
inline int64_t fwd_splits(int64_t n, int64_t c, int num_sms) {
  if (c < kSplitMinClasses) return 1;
  return std::max<int64_t>(1, std::min(ceil_div(int64_t(kSplitBlocksPerSm) * num_sms, n), c / kSplitMinCols));
}

// The split forward (splits > 1): stage 1 into a workspace of partial stats, stage 2 finishes.
template <typename scalar_t, typename acc_t, int V>
void launch_fwd_split(const FwdArgs<scalar_t, acc_t>& args, const at::Tensor& logits, int64_t splits,
                      cudaStream_t stream) {
  const int64_t n = args.n_rows;
  const int64_t c = args.o.num_classes;
  // Ranges are whole 16-byte vectors so that every range starts aligned; recount the splits
  // after the rounding (the last range is non-empty, possibly shorter).
  constexpr int64_t kVec = 16 / sizeof(scalar_t);
  const int64_t split_cols = ceil_div(ceil_div(c, splits), kVec) * kVec;
  splits = ceil_div(c, split_cols);
  at::Tensor workspace = at::empty({n, splits, int64_t(sizeof(RowStats<acc_t>) / sizeof(acc_t))},
                                   logits.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  auto* partial = reinterpret_cast<RowStats<acc_t>*>(workspace.data_ptr<acc_t>());
  // n * splits is at most about 2 blocks per SM plus n, far below the grid limit.
  const int threads = row_block_threads(split_cols);
  ce_fwd_split_kernel<scalar_t, acc_t, V><<<static_cast<unsigned>(n * splits), threads, 0, stream>>>(
      args, static_cast<int>(splits), split_cols, partial);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  ce_fwd_split_finish_kernel<scalar_t, acc_t>
      <<<static_cast<unsigned>(ceil_div(n, kFinishBlock)), kFinishBlock, 0, stream>>>(
          args, static_cast<int>(splits), partial);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename acc_t, int V>
void launch_fwd(const FwdArgs<scalar_t, acc_t>& args, const at::Tensor& logits, int num_sms,
                cudaStream_t stream) {
  const int64_t n = args.n_rows;
  const int64_t c = args.o.num_classes;

  if (c <= kGroupMaxClasses) {
    const int group = group_lanes(c, V);
    const int rows_per_block = kGroupBlock / group;
    const int64_t max_rows = kMaxGrid * rows_per_block;
    for (int64_t r0 = 0; r0 < n; r0 += max_rows) {
      const int64_t rows = std::min(max_rows, n - r0);
      ce_fwd_group_kernel<scalar_t, acc_t, V>
          <<<static_cast<unsigned>(ceil_div(rows, rows_per_block)), kGroupBlock, 0, stream>>>(
              rows_from(args, r0, rows), group);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    return;
  }

  const int64_t splits = fwd_splits(n, c, num_sms);
  if (splits > 1) {
    launch_fwd_split<scalar_t, acc_t, V>(args, logits, splits, stream);
    return;
  }

  const int threads = row_block_threads(c);
  for (int64_t r0 = 0; r0 < n; r0 += kMaxGrid) {
    const int64_t rows = std::min(kMaxGrid, n - r0);
    ce_fwd_row_kernel<scalar_t, acc_t, V><<<static_cast<unsigned>(rows), threads, 0, stream>>>(
        rows_from(args, r0, rows));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename scalar_t, typename acc_t, int V>
void launch_bwd(const BwdArgs<scalar_t, acc_t>& args, cudaStream_t stream) {
  const int64_t n = args.n_rows;
  const int64_t nvec = ceil_div(args.o.num_classes, V);
  const int group = pow2_at_least(ceil_div(nvec, kBwdIlp), kBwdBlock);
  const int64_t chunks_per_row = ceil_div(nvec, int64_t(group) * kBwdIlp);
  TORCH_CHECK(chunks_per_row <= kMaxGrid, "fusedloss: too many classes (", args.o.num_classes, ")");
  const int rows_per_block = kBwdBlock / group;
  const int64_t max_rows = (kMaxGrid / chunks_per_row) * rows_per_block;
  for (int64_t r0 = 0; r0 < n; r0 += max_rows) {
    const int64_t rows = std::min(max_rows, n - r0);
    const int64_t blocks = ceil_div(rows, rows_per_block) * chunks_per_row;  // <= kMaxGrid
    ce_bwd_kernel<scalar_t, acc_t, V><<<static_cast<unsigned>(blocks), kBwdBlock, 0, stream>>>(
        rows_from(args, r0, rows), group, static_cast<unsigned>(chunks_per_row));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// Forward + gradient in place. V is the vector width of the group and row kernels (logits rows
// aligned); the split path picks the backward's own width.
template <typename scalar_t, typename acc_t, int V>
void launch_fwd_grad(const FwdGradArgs<scalar_t, acc_t>& args, const at::Tensor& logits,
                     const std::optional<at::Tensor>& grad_scale, int num_sms, cudaStream_t stream) {
  const int64_t n = args.f.n_rows;
  const int64_t c = args.f.o.num_classes;

  if (c <= kGroupMaxClasses) {
    const int group = group_lanes(c, V);
    const int rows_per_block = kGroupBlock / group;
    const int64_t max_rows = kMaxGrid * rows_per_block;
    for (int64_t r0 = 0; r0 < n; r0 += max_rows) {
      const int64_t rows = std::min(max_rows, n - r0);
      ce_fwd_grad_group_kernel<scalar_t, acc_t, V>
          <<<static_cast<unsigned>(ceil_div(rows, rows_per_block)), kGroupBlock, 0, stream>>>(
              rows_from(args, r0, rows), group);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    return;
  }

  const int64_t splits = fwd_splits(n, c, num_sms);
  if (splits > 1) {
    // Few long rows: the split forward's (max, log_s) into a workspace, then the backward over the
    // logits in place (its threads store only what they loaded). grad_lse = 0: none.
    const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
    at::Tensor stats = at::empty({n, 2}, logits.options().dtype(acc_dtype));
    FwdArgs<scalar_t, acc_t> fwd = args.f;
    fwd.stats = stats.mutable_data_ptr<acc_t>();
    launch_fwd_split<scalar_t, acc_t, V>(fwd, logits, splits, stream);
    const at::Tensor scale = grad_scale.has_value() ? *grad_scale : at::ones({1}, logits.options().dtype(acc_dtype));
    BwdArgs<scalar_t, acc_t> bwd;
    bwd.grad_loss = scale.const_data_ptr<acc_t>();
    bwd.grad_loss_stride = grad_scale.has_value() ? grad_scale->stride(0) : 0;
    bwd.grad_lse = nullptr;
    bwd.grad_lse_stride = 0;
    bwd.logits = args.f.logits;
    bwd.row_stride = c;
    bwd.target = args.f.target;
    bwd.weight = args.f.weight;
    bwd.weight_sum = args.weight_sum;
    bwd.stats = stats.const_data_ptr<acc_t>();
    bwd.grad = args.grad;
    bwd.n_rows = n;
    bwd.o = args.f.o;
    constexpr int kVec = 16 / sizeof(scalar_t);
    if (c % kVec == 0 && is_aligned16(args.grad)) {
      launch_bwd<scalar_t, acc_t, kVec>(bwd, stream);
    } else {
      launch_bwd<scalar_t, acc_t, 1>(bwd, stream);
    }
    return;
  }

  const int threads = row_block_threads(c);
  for (int64_t r0 = 0; r0 < n; r0 += kMaxGrid) {
    const int64_t rows = std::min(kMaxGrid, n - r0);
    ce_fwd_grad_row_kernel<scalar_t, acc_t, V><<<static_cast<unsigned>(rows), threads, 0, stream>>>(
        rows_from(args, r0, rows));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_fwd_cuda(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    int64_t ignore_index, double label_smoothing, double z_loss, double softcap, double temperature, bool extras) {
  check_ce_args(logits, target, weight);
  TORCH_CHECK(logits.is_cuda(), "fusedloss: cross_entropy_fwd (CUDA) needs CUDA logits");
  const c10::cuda::CUDAGuard device_guard(logits.device());

  const int64_t n = logits.size(0);
  const int64_t c = logits.size(1);
  const auto acc_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor loss = at::empty({n}, logits.options().dtype(acc_dtype));
  at::Tensor lse = at::empty({n}, logits.options().dtype(acc_dtype));
  at::Tensor stats = at::empty({n, extras ? 4 : 2}, logits.options().dtype(acc_dtype));
  if (n == 0) return {loss, lse, stats};

  int num_sms = 0;  // an attribute query, no sync
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, logits.get_device()));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "fusedloss_cross_entropy_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    FwdArgs<scalar_t, acc_t> args;
    args.logits = logits.const_data_ptr<scalar_t>();
    args.row_stride = logits.stride(0);
    args.target = target.const_data_ptr<int64_t>();
    args.weight = weight.has_value() ? weight->const_data_ptr<acc_t>() : nullptr;
    args.loss = loss.mutable_data_ptr<acc_t>();
    args.lse = lse.mutable_data_ptr<acc_t>();
    args.stats = stats.mutable_data_ptr<acc_t>();
    args.n_rows = n;
    args.o = make_options<acc_t>(c, ignore_index, label_smoothing, z_loss, softcap, temperature);
    args.stats_width = extras ? 4 : 2;
    constexpr int kVec = 16 / sizeof(scalar_t);
    if (rows_aligned16(args.logits, args.row_stride, n)) {
      launch_fwd<scalar_t, acc_t, kVec>(args, logits, num_sms, stream);
    } else {
      launch_fwd<scalar_t, acc_t, 1>(args, logits, num_sms, stream);
    }
  });
  return {loss, lse, stats};
}

at::Tensor cross_entropy_bwd_cuda(const at::Tensor& grad_loss, const std::optional<at::Tensor>& grad_lse,
                                  const at::Tensor& logits, const at::Tensor& target,
                                  const std::optional<at::Tensor>& weight, const at::Tensor& stats,
                                  int64_t ignore_index, double label_smoothing, double z_loss,
                                  double softcap, double temperature, const std::optional<at::Tensor>& grad_logprob,
                                  const std::optional<at::Tensor>& grad_entropy) {
  check_ce_args(logits, target, weight);
  check_row_grad(grad_loss, logits, "grad_loss");
  if (grad_lse.has_value()) check_row_grad(*grad_lse, logits, "grad_lse");
  if (grad_logprob.has_value()) check_row_grad(*grad_logprob, logits, "grad_logprob");
  if (grad_entropy.has_value()) check_row_grad(*grad_entropy, logits, "grad_entropy");
  check_row_stats(stats, logits, grad_entropy.has_value());
  TORCH_CHECK(logits.is_cuda(), "fusedloss: cross_entropy_bwd (CUDA) needs CUDA logits");
  const c10::cuda::CUDAGuard device_guard(logits.device());

  const int64_t n = logits.size(0);
  const int64_t c = logits.size(1);
  at::Tensor grad = at::empty({n, c}, logits.options());  // contiguous
  if (grad.numel() == 0) return grad;

  const std::optional<at::Tensor> w_sum = weight_sum_of(weight, label_smoothing);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "fusedloss_cross_entropy_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    BwdArgs<scalar_t, acc_t> args;
    args.grad_loss = grad_loss.const_data_ptr<acc_t>();
    args.grad_loss_stride = grad_loss.stride(0);
    args.grad_lse = grad_lse.has_value() ? grad_lse->const_data_ptr<acc_t>() : nullptr;
    args.grad_lse_stride = grad_lse.has_value() ? grad_lse->stride(0) : 0;
    args.logits = logits.const_data_ptr<scalar_t>();
    args.row_stride = logits.stride(0);
    args.target = target.const_data_ptr<int64_t>();
    args.weight = weight.has_value() ? weight->const_data_ptr<acc_t>() : nullptr;
    args.weight_sum = w_sum.has_value() ? w_sum->const_data_ptr<acc_t>() : nullptr;
    args.stats = stats.const_data_ptr<acc_t>();
    args.grad = grad.mutable_data_ptr<scalar_t>();
    args.n_rows = n;
    args.o = make_options<acc_t>(c, ignore_index, label_smoothing, z_loss, softcap, temperature);
    args.stats_width = static_cast<int>(stats.size(1));
    args.grad_logprob = grad_logprob.has_value() ? grad_logprob->const_data_ptr<acc_t>() : nullptr;
    args.grad_logprob_stride = grad_logprob.has_value() ? grad_logprob->stride(0) : 0;
    args.grad_entropy = grad_entropy.has_value() ? grad_entropy->const_data_ptr<acc_t>() : nullptr;
    args.grad_entropy_stride = grad_entropy.has_value() ? grad_entropy->stride(0) : 0;
    // The vector path needs whole vectors on both sides: aligned logits rows, and C % V == 0 for
    // the gradient rows (row stride C) to stay aligned.
    constexpr int kVec = 16 / sizeof(scalar_t);
    if (c % kVec == 0 && is_aligned16(args.grad) && rows_aligned16(args.logits, args.row_stride, n)) {
      launch_bwd<scalar_t, acc_t, kVec>(args, stream);
    } else {
      launch_bwd<scalar_t, acc_t, 1>(args, stream);
    }
  });
  return grad;
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd_grad_cuda(at::Tensor& logits, const at::Tensor& target,
                                                               const std::optional<at::Tensor>& weight,
                                                               const std::optional<at::Tensor>& grad_scale,
                                                               int64_t ignore_index, double label_smoothing,
                                                               double z_loss, double softcap, double temperature) {
  check_in_place_logits(logits);  // first: a strided view gets the in-place reason, not a layout detail
  check_ce_args(logits, target, weight);
  if (grad_scale.has_value()) check_row_grad(*grad_scale, logits, "grad_scale");
  TORCH_CHECK(logits.is_cuda(), "fusedloss: cross_entropy_fwd_grad_ (CUDA) needs CUDA logits");
  const c10::cuda::CUDAGuard device_guard(logits.device());

  const int64_t n = logits.size(0);
  const int64_t c = logits.size(1);
  const auto acc_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor loss = at::empty({n}, logits.options().dtype(acc_dtype));
  at::Tensor lse = at::empty({n}, logits.options().dtype(acc_dtype));
  if (n == 0) return {loss, lse};

  int num_sms = 0;  // an attribute query, no sync
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, logits.get_device()));
  const std::optional<at::Tensor> w_sum = weight_sum_of(weight, label_smoothing);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "fusedloss_cross_entropy_fwd_grad_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    FwdGradArgs<scalar_t, acc_t> args;
    args.grad = logits.mutable_data_ptr<scalar_t>();
    args.f.logits = args.grad;
    args.f.row_stride = c;  // contiguous
    args.f.target = target.const_data_ptr<int64_t>();
    args.f.weight = weight.has_value() ? weight->const_data_ptr<acc_t>() : nullptr;
    args.f.loss = loss.mutable_data_ptr<acc_t>();
    args.f.lse = lse.mutable_data_ptr<acc_t>();
    args.f.stats = nullptr;
    args.f.n_rows = n;
    args.f.o = make_options<acc_t>(c, ignore_index, label_smoothing, z_loss, softcap, temperature);
    args.grad_scale = grad_scale.has_value() ? grad_scale->const_data_ptr<acc_t>() : nullptr;
    args.grad_scale_stride = grad_scale.has_value() ? grad_scale->stride(0) : 0;
    args.weight_sum = w_sum.has_value() ? w_sum->const_data_ptr<acc_t>() : nullptr;
    constexpr int kVec = 16 / sizeof(scalar_t);
    if (rows_aligned16(args.f.logits, c, n)) {
      launch_fwd_grad<scalar_t, acc_t, kVec>(args, logits, grad_scale, num_sms, stream);
    } else {
      launch_fwd_grad<scalar_t, acc_t, 1>(args, logits, grad_scale, num_sms, stream);
    }
  });
  return {loss, lse};
}

// Focal loss forward: the cross-entropy forward above, unchanged and without weights (its loss is
// then each row's nll), followed by focal_finish_kernel, which turns every row's nll into its focal
// loss (in place) and gradient coefficient with focal_row. The second launch moves O(N) values next
// to the forward's O(N C) read of the logits; it keeps the row kernels bit for bit as validated on
// the H100 (folding focal_row into finish_row would save this one small launch).
template <typename acc_t>
__global__ void __launch_bounds__(kFinishBlock)
    focal_finish_kernel(acc_t* loss, acc_t* __restrict__ coef, const int64_t* __restrict__ target,
                        const acc_t* __restrict__ weight, const int64_t n_rows, const acc_t gamma,
                        const Options<acc_t> o) {
  const int64_t step = int64_t(gridDim.x) * kFinishBlock;
  for (int64_t row = int64_t(blockIdx.x) * kFinishBlock + threadIdx.x; row < n_rows; row += step) {
    const int64_t y = target[row];
    if (!row_is_live(y, o)) {
      // The forward wrote the dead row's loss: 0 if ignored, NaN for a target outside [0, C).
      coef[row] = dead_row_value(y, o);
      continue;
    }
    const FocalRow<acc_t> f = focal_row(loss[row], weight != nullptr ? weight[y] : acc_t(1), gamma);
    loss[row] = f.loss;
    coef[row] = f.coef;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> focal_loss_fwd_cuda(const at::Tensor& logits, const at::Tensor& target,
                                                                    const std::optional<at::Tensor>& weight,
                                                                    int64_t ignore_index, double gamma) {
  check_ce_args(logits, target, weight);
  TORCH_CHECK(gamma >= 0, "fusedloss: focal_loss gamma must be >= 0, got ", gamma);
  TORCH_CHECK(logits.is_cuda(), "fusedloss: focal_loss_fwd (CUDA) needs CUDA logits");
  const c10::cuda::CUDAGuard device_guard(logits.device());

  auto fwd = cross_entropy_fwd_cuda(logits, target, std::nullopt, ignore_index, 0.0, 0.0, 0.0, 1.0, false);
  at::Tensor loss = std::get<0>(fwd);  // each live row's nll until focal_finish_kernel
  at::Tensor stats = std::get<2>(fwd);
  at::Tensor coef = at::empty({logits.size(0)}, loss.options());
  const int64_t n = logits.size(0);
  if (n == 0) return {loss, stats, coef};

  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(loss.scalar_type(), "fusedloss_focal_loss_fwd_cuda", [&] {
    using acc_t = scalar_t;
    const unsigned blocks = static_cast<unsigned>(std::min(ceil_div(n, kFinishBlock), kMaxGrid));
    focal_finish_kernel<acc_t><<<blocks, kFinishBlock, 0, stream>>>(
        loss.mutable_data_ptr<acc_t>(), coef.mutable_data_ptr<acc_t>(), target.const_data_ptr<int64_t>(),
        weight.has_value() ? weight->const_data_ptr<acc_t>() : nullptr, n, static_cast<acc_t>(gamma),
        make_options<acc_t>(logits.size(1), ignore_index, 0.0, 0.0, 0.0, 1.0));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, stats, coef};
}

}  // namespace
}  // namespace ce
}  // namespace fusedloss

TORCH_LIBRARY_IMPL(fusedloss, CUDA, m) {
  m.impl("focal_loss_fwd", &fusedloss::ce::focal_loss_fwd_cuda);
  m.impl("cross_entropy_fwd_grad_", &fusedloss::ce::cross_entropy_fwd_grad_cuda);
  m.impl("cross_entropy_fwd", &fusedloss::ce::cross_entropy_fwd_cuda);
  m.impl("cross_entropy_bwd", &fusedloss::ce::cross_entropy_bwd_cuda);
}
