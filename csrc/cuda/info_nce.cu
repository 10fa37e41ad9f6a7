// CUDA kernels of fusedloss::info_nce_lse_fwd and fusedloss::info_nce_lse_bwd. The math (what is
// computed, the gradient (1)-(3)) lives in fusedloss/info_nce_math.h; this file decides who
// computes which tile of S = scale * Q K^T, in which order, and never holds more than a
// 64 x 64 tile of it.
//
// Roles. Both kernels are launched over "own" tiles of 64 rows of one operand, which stream
// every 64-row tile of the other operand. Blocks [0, tiles_q) own query tiles (S's rows), the
// blocks after them own key tiles (S's columns, the same code with Q and K swapped: a tile of
// S^T = scale * K Q^T), so one launch does both directions and fills twice as many SMs.
//
// Forward: a block computes the dot tile Q_own K_tile^T into shared memory, then each of its
//   rows takes 4 lanes of 16 columns each; a lane folds its columns' max and sum exp into its
//   running Lse (merge_part), and at the end the 4 lanes of a row merge in a fixed butterfly and
//   the first writes finish(). Query blocks write lse_rows and the positives' mean pos and count
//   npos (each lane sums the values it merged at the row's positive columns; the 4 lanes merge in
//   the same butterfly); key blocks lse_cols (only with cols).
// Backward: a query block streams the key tiles; per tile it recomputes the dot tile, turns it
//   into P (grad_s, (1), the positive's u at its label's column) in shared memory, adds its rows'
//   sums of (3') to its dscale partial, and
//   for each 64-column chunk of D adds scale * P K_tile to its rows of dQ. A key block does the
//   same with P^T and Q: dK. The partial sums of dQ over key tiles live in an fp32 buffer of
//   (N, D) (the output itself for fp32 / fp64); the last key tile writes the output dtype. Each
//   block owns its rows of the output, so there are no atomics. The per-block dscale partials
//   (double) are summed by one block in a fixed order (info_nce_dscale_kernel).
//   Nothing of size N x M is ever allocated; the scratch is O((N + M) D).
//
// Paths per dtype.
//   float32, float64: SIMT. 256 threads as 16 x 16, each a 4 x 4 micro-tile of the 64 x 64 tile
//     (rows ty + 16u, columns tx + 16v), operands in shared memory in the accumulation dtype,
//     D in steps of 32. Exact fp32 (fp64) FMAs: no TF32, so fp32 meets its 2e-5 tolerance.
//   float16, bfloat16 (compute capability >= 8.0): tensor cores through WMMA 16x16x16 fragments
//     with fp32 accumulators; 8 warps, each 1 x 2 fragments of the 64 x 64 tile; D in steps of
//     64. The products of two 16-bit values are exact in fp32, so S is as accurate as on the
//     SIMT path. P is fp32 but the MMA takes 16-bit operands: it is split into a sum of 16-bit
//     parts (part_0 = round(P'), part_1 = round(P' - part_0), ...; each difference is exact in
//     fp32) and multiplied once per part: bfloat16 takes 3 parts (P' to about 2^-27, fp32's
//     level; with 2 parts, 2^-18, the gradient missed the bf16 test tolerance in the emulation),
//     float16 2 parts (2^-22). A single rounding (2^-9) would dominate the error of dQ and dK.
//     P' = P * 2^e with e per row and tile so that max |P'| lies in [2^14, 2^15): float16's
//     exponent range would otherwise flush a small P (g = 1/N times a softmax) to zero; the
//     epilogue multiplies by 2^-e (exact).
//
// Tiles: 64 x 64 of S per step, 256 threads, D in steps of 32 (SIMT) or 64 (WMMA) for S and of
// 64 for the output chunks. Shared memory (dynamic), forward / backward: fp32 34 / 35 KiB, fp64
// 67 / 69 KiB, fp16 35 / 55 KiB, bf16 35 / 64 KiB; __launch_bounds__(256, 2) keeps two blocks
// per SM. The chunk operand V aliases the dot operands and the WMMA staging tile O aliases S,
// each dead by then (the barriers below say where).
//
// Any N, M, D (including 0 and 1): loads outside the tensors are zero-filled and stores masked.
// Offsets are int64_t (N * D may exceed 2^31). Determinism: no atomics, every sum in an order
// fixed by (N, M, D, dtype, alignment): bitwise reproducible run to run.
//
// Headers: c10/cuda rather than ATen/cuda/CUDAContext.h, which pulls in cuSPARSE/cuBLAS headers
// that a bare CUDA toolkit (or torch's pip wheels without their include dirs on the path) lacks.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>

#include "fusedloss/cuda_utils.cuh"
#include "fusedloss/info_nce_math.h"

namespace fusedloss {
namespace info_nce {
namespace {

// ---- kernels (device code) ----

using cuda_utils::block_allreduce;
using cuda_utils::ceil_div;
using cuda_utils::kWarpSize;
using cuda_utils::load_pack;
using cuda_utils::Pack;
using cuda_utils::shfl_xor;
using cuda_utils::store_pack;

constexpr int kThreads = 256;                        // 8 warps
constexpr int kTile = 64;                            // rows of each operand per tile
constexpr int kChunk = 64;                           // D columns per backward output chunk
constexpr int kLanesPerRow = kThreads / kTile;       // per-row phases: 4 lanes per tile row
constexpr int kColsPerLane = kTile / kLanesPerRow;   // 16 columns each: c = sub + 4 k
constexpr int kMicro = 4;                            // SIMT: 4 x 4 outputs per thread
constexpr int kGrid16 = kTile / kMicro;              // SIMT: threads as 16 x 16
constexpr int kFrag = 16;                            // WMMA fragment side
constexpr int kFp16ScaleExp = 15;                    // max |P'| in [2^14, 2^15)
// Two blocks per SM (16 warps) caps the tile kernels at 128 registers; without it ptxas took up
// to 177 and left room for one block.
constexpr int kMinBlocks = 2;
static_assert(kLanesPerRow * kTile == kThreads && kGrid16 * kGrid16 == kThreads, "thread layouts");
static_assert(kTile / kFrag * kTile / kFrag == 2 * kThreads / kWarpSize, "2 fragments per warp");

template <typename T>
struct WmmaType;
template <>
struct WmmaType<at::Half> {
  using type = __half;
};
template <>
struct WmmaType<at::BFloat16> {
  using type = __nv_bfloat16;
};

constexpr int align128(int64_t bytes) { return static_cast<int>((bytes + 127) / 128 * 128); }

// Shared-memory layout of one block, byte offsets from the dynamic buffer. kTC: the WMMA path.
//   A, B: the dot operands (own rows, other rows) x kDotK columns of D, in op_t.
//   S:    the 64 x 64 dot tile (unscaled q . k) in acc_t; the SIMT backward overwrites it with P.
//   P parts, row_exp (WMMA backward): P' = P 2^e as kSplits 16-bit tiles, e per row.
//   col_g, col_l (backward): the other side's gradient weight and lse for the tile's columns;
//   col_id, col_u (backward): the columns' ids for the positive test (query blocks: the keys' ids;
//   key blocks: the streamed queries' labels) and, in key blocks, the queries' u / npos.
//   V (backward) = the chunk operand (other rows) x kChunk columns, over A and B.
//   O (WMMA backward) = the fp32 output chunk from the fragments, over S.
template <typename scalar_t, typename acc_t, bool kTC>
struct Layout {
  using op_t = std::conditional_t<kTC, scalar_t, acc_t>;
  static constexpr int kDotK = kTC ? 64 : 32;
  // Row strides in elements. WMMA needs a multiple of 8 (16-bit) or 4 (fp32) elements and 32-byte
  // aligned fragment pointers; the SIMT strides are odd, so a column walk hits distinct banks.
  static constexpr int kLdOp = kTC ? kDotK + 8 : kDotK + 1;
  static constexpr int kLdV = kTC ? kChunk + 8 : kChunk + 1;
  static constexpr int kLdS = kTile + 4;  // the per-row phase's 8 rows x 4 lanes hit 32 banks
  static constexpr int kLdP = kTile + 8;
  static constexpr int kLdO = kChunk + 4;

  static constexpr int kA = 0;
  static constexpr int kB = align128(kA + int64_t(kTile) * kLdOp * sizeof(op_t));
  static constexpr int kS = align128(kB + int64_t(kTile) * kLdOp * sizeof(op_t));
  static constexpr int kFwdBytes = align128(kS + int64_t(kTile) * kLdS * sizeof(acc_t));
  static constexpr int kSplits = !kTC ? 0 : std::is_same_v<scalar_t, at::BFloat16> ? 3 : 2;
  static constexpr int kPartBytes = align128(int64_t(kTile) * kLdP * sizeof(scalar_t));
  static constexpr int kP = kFwdBytes;  // part s at kP + s * kPartBytes
  static constexpr int kRowExp = kP + kSplits * kPartBytes;
  static constexpr int kColG = align128(kRowExp + int64_t(kTile) * sizeof(int));
  static constexpr int kColL = align128(kColG + int64_t(kTile) * sizeof(acc_t));
  static constexpr int kColU = align128(kColL + int64_t(kTile) * sizeof(acc_t));
  static constexpr int kColId = align128(kColU + int64_t(kTile) * sizeof(acc_t));
  static constexpr int kBwdBytes = align128(kColId + int64_t(kTile) * sizeof(int64_t));
  static constexpr int kV = kA;
  static constexpr int kO = kS;
  static_assert(int64_t(kTile) * kLdV * sizeof(op_t) <= kS - kV, "V fits over A and B");
  static_assert(!kTC || int64_t(kTile) * kLdO * sizeof(float) <= kFwdBytes - kO, "O fits over S");
};

template <typename T>
__device__ __forceinline__ T* smem_at(unsigned char* smem, int offset) {
  return reinterpret_cast<T*>(smem + offset);
}

// Which tile this block owns. Blocks [0, tiles_q) own query rows [r0, r0 + own_rows) and stream
// the keys; the others own key rows and stream the queries.
template <typename scalar_t>
struct TileRole {
  bool own_is_query;
  const scalar_t* own;    // first row of the owned tile
  const scalar_t* other;  // the streamed operand, row 0
  int64_t r0;             // first owned row
  int own_rows;           // 1..64
  int64_t n_other;
};

template <typename scalar_t>
__device__ __forceinline__ TileRole<scalar_t> tile_role(const scalar_t* query, const scalar_t* key, int64_t n,
                                                         int64_t m, int64_t d, int64_t tiles_q) {
  TileRole<scalar_t> t;
  const int64_t b = blockIdx.x;
  t.own_is_query = b < tiles_q;
  const int64_t tile = t.own_is_query ? b : b - tiles_q;
  const int64_t n_own = t.own_is_query ? n : m;
  t.r0 = tile * kTile;
  t.own_rows = static_cast<int>(std::min<int64_t>(kTile, n_own - t.r0));
  t.own = (t.own_is_query ? query : key) + t.r0 * d;
  t.other = t.own_is_query ? key : query;
  t.n_other = t.own_is_query ? m : n;
  return t;
}

// rows x kCols elements of src (row stride d) from column d0 into dst (row stride ld), converted
// to dst_t; zero outside [0, rows) x [d0, d). Thread t takes column t % kCols of rows t / kCols,
// t / kCols + 256 / kCols, ...: 32 threads read consecutive columns of a row.
template <int kCols, typename dst_t, typename scalar_t>
__device__ __forceinline__ void load_tile(dst_t* dst, int ld, const scalar_t* src, int rows, int64_t d, int64_t d0) {
  constexpr int kRowStep = kThreads / kCols;
  static_assert(kRowStep * kCols == kThreads && kTile % kRowStep == 0, "whole rows per step");
  const int col = static_cast<int>(threadIdx.x) % kCols;
  const int row0 = static_cast<int>(threadIdx.x) / kCols;
  const bool col_in = d0 + col < d;
#pragma unroll
  for (int row = row0; row < kTile; row += kRowStep) {
    dst_t v = static_cast<dst_t>(0.0f);
    if (col_in && row < rows) v = static_cast<dst_t>(src[row * d + d0 + col]);
    dst[row * ld + col] = v;
  }
}

// The same for 16-bit operands in 16-byte vectors (8 elements). Needs d % 8 == 0 and a 16-byte
// aligned src: then d0 + col < d implies the whole vector is inside the row, and every vector is
// aligned (d0 and col are multiples of 8).
template <int kCols, typename scalar_t>
__device__ __forceinline__ void load_tile_vec(scalar_t* dst, int ld, const scalar_t* src, int rows, int64_t d,
                                              int64_t d0) {
  constexpr int kV = 8;
  constexpr int kVecsPerRow = kCols / kV;
  constexpr int kRowStep = kThreads / kVecsPerRow;
  static_assert(kRowStep * kVecsPerRow == kThreads && kTile % kRowStep == 0, "whole rows per step");
  const int col = static_cast<int>(threadIdx.x) % kVecsPerRow * kV;
  const int row0 = static_cast<int>(threadIdx.x) / kVecsPerRow;
  const bool col_in = d0 + col < d;
#pragma unroll
  for (int row = row0; row < kTile; row += kRowStep) {
    Pack<scalar_t, kV> p;
    if (col_in && row < rows) {
      p = load_pack<kV>(src + row * d + d0 + col);
    } else {
#pragma unroll
      for (int i = 0; i < kV; ++i) p.v[i] = static_cast<scalar_t>(0.0f);
    }
    store_pack<kV>(dst + row * ld + col, p);
  }
}

template <bool kTC, int kCols, typename op_t, typename scalar_t>
__device__ __forceinline__ void load_operand(op_t* dst, int ld, const scalar_t* src, int rows, int64_t d, int64_t d0,
                                             bool vec) {
  if constexpr (kTC) {
    if (vec) {
      load_tile_vec<kCols>(dst, ld, src, rows, d, d0);
      return;
    }
  }
  load_tile<kCols>(dst, ld, src, rows, d, d0);
}

// S[r][c] = own_r . other_c (unscaled) for the 64 x 64 tile, into shared memory; rows and columns
// past own_rows / other_rows are 0. Entry: no thread still reads A, B or S (the caller's barrier).
// Exit: S is complete and visible to the block.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void dot_tile_simt(unsigned char* smem, const scalar_t* own, int own_rows,
                                              const scalar_t* other, int other_rows, int64_t d) {
  using L = Layout<scalar_t, acc_t, false>;
  acc_t* As = smem_at<acc_t>(smem, L::kA);
  acc_t* Bs = smem_at<acc_t>(smem, L::kB);
  acc_t* S = smem_at<acc_t>(smem, L::kS);
  const int tx = static_cast<int>(threadIdx.x) % kGrid16;
  const int ty = static_cast<int>(threadIdx.x) / kGrid16;
  acc_t acc[kMicro][kMicro];
#pragma unroll
  for (int u = 0; u < kMicro; ++u)
#pragma unroll
    for (int v = 0; v < kMicro; ++v) acc[u][v] = acc_t(0);

  for (int64_t d0 = 0; d0 < d; d0 += L::kDotK) {
    load_tile<L::kDotK>(As, L::kLdOp, own, own_rows, d, d0);
    load_tile<L::kDotK>(Bs, L::kLdOp, other, other_rows, d, d0);
    __syncthreads();
#pragma unroll 8
    for (int k = 0; k < L::kDotK; ++k) {
      acc_t a[kMicro], b[kMicro];
#pragma unroll
      for (int u = 0; u < kMicro; ++u) a[u] = As[(ty + kGrid16 * u) * L::kLdOp + k];
#pragma unroll
      for (int v = 0; v < kMicro; ++v) b[v] = Bs[(tx + kGrid16 * v) * L::kLdOp + k];
#pragma unroll
      for (int u = 0; u < kMicro; ++u)
#pragma unroll
        for (int v = 0; v < kMicro; ++v) acc[u][v] += a[u] * b[v];
    }
    __syncthreads();  // A and B are reloaded
  }
#pragma unroll
  for (int u = 0; u < kMicro; ++u)
#pragma unroll
    for (int v = 0; v < kMicro; ++v) S[(ty + kGrid16 * u) * L::kLdS + tx + kGrid16 * v] = acc[u][v];
  __syncthreads();
}

// The same contract on tensor cores (fp32 accumulators): warp w computes fragment row w / 2,
// fragment columns 2 (w % 2) and 2 (w % 2) + 1. B = other^T is other's rows read column-major.
template <typename scalar_t>
__device__ __forceinline__ void dot_tile_tc(unsigned char* smem, const scalar_t* own, int own_rows,
                                            const scalar_t* other, int other_rows, int64_t d, bool vec) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // the launcher never picks this path below compute capability 8.0
#else
  namespace wmma = nvcuda::wmma;
  using L = Layout<scalar_t, float, true>;
  using T = typename WmmaType<scalar_t>::type;
  scalar_t* As = smem_at<scalar_t>(smem, L::kA);
  scalar_t* Bs = smem_at<scalar_t>(smem, L::kB);
  float* S = smem_at<float>(smem, L::kS);
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int fr = warp / 2;
  const int fc0 = (warp % 2) * 2;
  wmma::fragment<wmma::accumulator, kFrag, kFrag, kFrag, float> acc[2];
  wmma::fill_fragment(acc[0], 0.0f);
  wmma::fill_fragment(acc[1], 0.0f);

  for (int64_t d0 = 0; d0 < d; d0 += L::kDotK) {
    load_operand<true, L::kDotK>(As, L::kLdOp, own, own_rows, d, d0, vec);
    load_operand<true, L::kDotK>(Bs, L::kLdOp, other, other_rows, d, d0, vec);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < L::kDotK; kk += kFrag) {
      wmma::fragment<wmma::matrix_a, kFrag, kFrag, kFrag, T, wmma::row_major> fa;
      wmma::load_matrix_sync(fa, reinterpret_cast<const T*>(As) + fr * kFrag * L::kLdOp + kk, L::kLdOp);
#pragma unroll
      for (int f = 0; f < 2; ++f) {
        wmma::fragment<wmma::matrix_b, kFrag, kFrag, kFrag, T, wmma::col_major> fb;
        wmma::load_matrix_sync(fb, reinterpret_cast<const T*>(Bs) + (fc0 + f) * kFrag * L::kLdOp + kk, L::kLdOp);
        wmma::mma_sync(acc[f], fa, fb, acc[f]);
      }
    }
    __syncthreads();  // A and B are reloaded
  }
#pragma unroll
  for (int f = 0; f < 2; ++f) {
    wmma::store_matrix_sync(S + fr * kFrag * L::kLdS + (fc0 + f) * kFrag, acc[f], L::kLdS, wmma::mem_row_major);
  }
  __syncthreads();
#endif
}

template <typename scalar_t, typename acc_t, bool kTC>
__device__ __forceinline__ void dot_tile(unsigned char* smem, const scalar_t* own, int own_rows,
                                         const scalar_t* other, int other_rows, int64_t d, bool vec) {
  if constexpr (kTC) {
    dot_tile_tc<scalar_t>(smem, own, own_rows, other, other_rows, d, vec);
  } else {
    dot_tile_simt<scalar_t, acc_t>(smem, own, own_rows, other, other_rows, d);
  }
}

// The 4 lanes of a tile row (aligned lanes 4r .. 4r + 3 of a warp) merge their Lse; every lane
// gets the same bits (the lower lanes' part always on the left). All lanes of the warp call it.
template <typename acc_t>
__device__ __forceinline__ Lse<acc_t> row_lanes_merge(Lse<acc_t> run) {
  const int lane = static_cast<int>(threadIdx.x) & (kWarpSize - 1);
#pragma unroll
  for (int off = 1; off < kLanesPerRow; off *= 2) {
    const Lse<acc_t> other{shfl_xor(run.max, off), shfl_xor(run.sum, off)};
    run = (lane & off) ? merge(other, run) : merge(run, other);
  }
  return run;
}

template <typename scalar_t, typename acc_t>
struct FwdArgs {
  const scalar_t* query;  // (n, d) contiguous
  const scalar_t* key;    // (m, d) contiguous
  int64_t n, m, d;
  const acc_t* scale;     // 0-dim, read on the device
  acc_t* lse_rows;        // (n,), by the query blocks
  acc_t* lse_cols;        // (m,), by the key blocks (launched only with cols)
  const int64_t* labels;      // (n,) contiguous, the positives' keys; nullptr: query i's is key i
  const int64_t* key_groups;  // (m,) contiguous or nullptr: with groups, query i's positives are the
                              // keys j with key_groups[j] == labels[i]
  acc_t* pos;                 // (n,), the mean S of the row's positives (NaN without any), query blocks
  int64_t* npos;              // (n,), their count
  int64_t tiles_q;
  bool vec;                   // 16-byte operand loads (WMMA path)
};

// The positive label of query row i, and the id key j is matched against (info_nce_math.h's P(i)).
__device__ __forceinline__ int64_t label_of(const int64_t* labels, int64_t i) { return labels ? labels[i] : i; }
__device__ __forceinline__ int64_t key_id(const int64_t* key_groups, int64_t j) {
  return key_groups ? key_groups[j] : j;
}

template <typename scalar_t, typename acc_t, bool kTC>
__global__ void __launch_bounds__(kThreads, kMinBlocks) info_nce_lse_fwd_kernel(const FwdArgs<scalar_t, acc_t> a) {
  using L = Layout<scalar_t, acc_t, kTC>;
  extern __shared__ __align__(128) unsigned char smem[];
  const TileRole<scalar_t> t = tile_role(a.query, a.key, a.n, a.m, a.d, a.tiles_q);
  const acc_t scale = *a.scale;
  const int r = static_cast<int>(threadIdx.x) / kLanesPerRow;
  const int sub = static_cast<int>(threadIdx.x) % kLanesPerRow;
  const acc_t* S_row = smem_at<acc_t>(smem, L::kS) + r * L::kLdS;

  // The row's positives (query blocks): this lane's sum of their S and their count.
  const bool has_pos = t.own_is_query && r < t.own_rows;
  const int64_t label = has_pos ? label_of(a.labels, t.r0 + r) : 0;
  double pos_sum = 0.0;
  int64_t pos_count = 0;
  Lse<acc_t> run = empty_lse<acc_t>();
  for (int64_t c0 = 0; c0 < t.n_other; c0 += kTile) {
    const int other_rows = static_cast<int>(std::min<int64_t>(kTile, t.n_other - c0));
    dot_tile<scalar_t, acc_t, kTC>(smem, t.own, t.own_rows, t.other + c0 * a.d, other_rows, a.d, a.vec);
    // This lane's columns c = sub + 4k of the tile: their max, then sum exp(x - max).
    acc_t x[kColsPerLane];
    acc_t tile_max = -fl_inf<acc_t>();
#pragma unroll
    for (int k = 0; k < kColsPerLane; ++k) {
      const int c = sub + kLanesPerRow * k;
      x[k] = c < other_rows ? scale * S_row[c] : -fl_inf<acc_t>();
      tile_max = fl_max(tile_max, x[k]);
      if (has_pos && c < other_rows && key_id(a.key_groups, c0 + c) == label) {
        pos_sum += static_cast<double>(x[k]);
        ++pos_count;
      }
    }
    acc_t tile_sum = 0;
#pragma unroll
    for (int k = 0; k < kColsPerLane; ++k) {
      if (sub + kLanesPerRow * k < other_rows) tile_sum += fl_exp(x[k] - tile_max);
    }
    run = merge_part(run, tile_max, tile_sum);  // a part with max -inf (no columns) adds nothing
    __syncthreads();  // S is rewritten by the next tile
  }
  run = row_lanes_merge(run);
  // The 4 lanes' positives, in the same fixed butterfly (every lane gets the same bits).
#pragma unroll
  for (int off = 1; off < kLanesPerRow; off *= 2) {
    pos_sum += shfl_xor(pos_sum, off);
    pos_count += shfl_xor(pos_count, off);
  }
  if (sub == 0 && r < t.own_rows) {
    acc_t* lse = t.own_is_query ? a.lse_rows : a.lse_cols;
    lse[t.r0 + r] = finish(run);
    if (has_pos) {
      a.pos[t.r0 + r] = pos_count ? static_cast<acc_t>(pos_sum / static_cast<double>(pos_count)) : fl_nan<acc_t>();
      a.npos[t.r0 + r] = pos_count;
    }
  }
}

template <typename scalar_t, typename acc_t>
struct BwdArgs {
  const scalar_t* query;  // (n, d)
  const scalar_t* key;    // (m, d)
  int64_t n, m, d;
  const acc_t* scale;
  // Per-query g_i and lse_r_i; per-key h_j and lse_c_j (nullptr without cols). Any stride.
  const acc_t* g;
  int64_t g_stride;
  const acc_t* lse_r;
  int64_t lse_r_stride;
  const acc_t* h;
  int64_t h_stride;
  const acc_t* lse_c;
  int64_t lse_c_stride;
  bool has_cols;
  // The positives: u_i (nullptr: no positive term), any stride; labels (nullptr: i) and key_groups
  // as in FwdArgs; the forward's pos (contiguous), whose pos / scale are (3')'s shifts, and npos.
  const acc_t* u;
  int64_t u_stride;
  const int64_t* labels;
  const int64_t* key_groups;
  const acc_t* pos;
  const int64_t* npos;
  // dQ (n, d) and dK (m, d) in the input dtype, and their running sums over the streamed tiles
  // in acc_t: the outputs themselves when scalar_t == acc_t, else scratch (nullptr when a single
  // streamed tile makes it unnecessary).
  scalar_t* grad_q;
  scalar_t* grad_k;
  acc_t* buf_q;
  acc_t* buf_k;
  double* dscale_partial;  // (blocks,): one per block, (3') of its own rows
  int64_t tiles_q;
  bool vec;
};

// Row r's 16 values p[k] (columns c = sub + 4k) into the tile's P. SIMT: in place over S, in acc_t.
// WMMA: P' = p 2^e as kSplits parts, e from the row's largest |p| (the 4 lanes agree on it), kept in
// row_exp for the epilogue. A row of zeros (or with a NaN / inf) keeps e = 0.
template <typename scalar_t, typename acc_t, bool kTC>
__device__ __forceinline__ void store_p(unsigned char* smem, int r, int sub, const acc_t (&p)[kColsPerLane]) {
  using L = Layout<scalar_t, acc_t, kTC>;
  if constexpr (!kTC) {
    acc_t* P_row = smem_at<acc_t>(smem, L::kS) + r * L::kLdS;
#pragma unroll
    for (int k = 0; k < kColsPerLane; ++k) P_row[sub + kLanesPerRow * k] = p[k];
  } else {
    float amax = 0.0f;
#pragma unroll
    for (int k = 0; k < kColsPerLane; ++k) amax = fl_max(amax, fabsf(p[k]));
#pragma unroll
    for (int off = 1; off < kLanesPerRow; off *= 2) amax = fl_max(amax, shfl_xor(amax, off));
    int e = 0;
    if (amax > 0.0f && amax < fl_inf<float>()) {
      int ex;
      frexpf(amax, &ex);  // amax in [2^(ex-1), 2^ex)
      e = kFp16ScaleExp - ex;
    }
#pragma unroll
    for (int k = 0; k < kColsPerLane; ++k) {
      float rest = ldexpf(p[k], e);
#pragma unroll
      for (int part = 0; part < L::kSplits; ++part) {
        const scalar_t v = static_cast<scalar_t>(rest);
        smem_at<scalar_t>(smem, L::kP + part * L::kPartBytes)[r * L::kLdP + sub + kLanesPerRow * k] = v;
        rest -= static_cast<float>(v);  // exact: v is rest rounded to fewer bits
      }
    }
    if (sub == 0) smem_at<int>(smem, L::kRowExp)[r] = e;
  }
}

// One D chunk [d0, d0 + 64) of P V (V the streamed tile's rows); emit(row, col, value) gets every
// element of the 64 x 64 result, unscaled by scale (and, on the WMMA path, already times 2^-e).
// Entry: P complete and visible; nobody reads V (or O). Exit: every thread is done with V and O.
template <typename scalar_t, typename acc_t, bool kTC, typename Emit>
__device__ __forceinline__ void pv_chunk(unsigned char* smem, const scalar_t* other, int other_rows, int64_t d,
                                         int64_t d0, bool vec, Emit&& emit) {
  using L = Layout<scalar_t, acc_t, kTC>;
  using op_t = typename L::op_t;
  op_t* Vs = smem_at<op_t>(smem, L::kV);
  load_operand<kTC, kChunk>(Vs, L::kLdV, other, other_rows, d, d0, vec);
  __syncthreads();
  if constexpr (!kTC) {
    const acc_t* P = smem_at<acc_t>(smem, L::kS);
    const int tx = static_cast<int>(threadIdx.x) % kGrid16;
    const int ty = static_cast<int>(threadIdx.x) / kGrid16;
    acc_t acc[kMicro][kMicro];
#pragma unroll
    for (int u = 0; u < kMicro; ++u)
#pragma unroll
      for (int v = 0; v < kMicro; ++v) acc[u][v] = acc_t(0);
#pragma unroll 8
    for (int c = 0; c < kTile; ++c) {
      acc_t pa[kMicro], vb[kMicro];
#pragma unroll
      for (int u = 0; u < kMicro; ++u) pa[u] = P[(ty + kGrid16 * u) * L::kLdS + c];
#pragma unroll
      for (int v = 0; v < kMicro; ++v) vb[v] = Vs[c * L::kLdV + tx + kGrid16 * v];
#pragma unroll
      for (int u = 0; u < kMicro; ++u)
#pragma unroll
        for (int v = 0; v < kMicro; ++v) acc[u][v] += pa[u] * vb[v];
    }
#pragma unroll
    for (int u = 0; u < kMicro; ++u)
#pragma unroll
      for (int v = 0; v < kMicro; ++v) emit(ty + kGrid16 * u, tx + kGrid16 * v, acc[u][v]);
    __syncthreads();  // V is reloaded by the next chunk
  } else {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    __trap();
#else
    namespace wmma = nvcuda::wmma;
    using T = typename WmmaType<scalar_t>::type;
    const T* Vt = reinterpret_cast<const T*>(Vs);
    float* O = smem_at<float>(smem, L::kO);
    const int* row_exp = smem_at<int>(smem, L::kRowExp);
    const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
    const int fr = warp / 2;
    const int fc0 = (warp % 2) * 2;
    wmma::fragment<wmma::accumulator, kFrag, kFrag, kFrag, float> acc[2];
    wmma::fill_fragment(acc[0], 0.0f);
    wmma::fill_fragment(acc[1], 0.0f);
#pragma unroll
    for (int kk = 0; kk < kTile; kk += kFrag) {
      wmma::fragment<wmma::matrix_b, kFrag, kFrag, kFrag, T, wmma::row_major> fb[2];
#pragma unroll
      for (int f = 0; f < 2; ++f) wmma::load_matrix_sync(fb[f], Vt + kk * L::kLdV + (fc0 + f) * kFrag, L::kLdV);
#pragma unroll
      for (int part = 0; part < L::kSplits; ++part) {
        const T* Pp = reinterpret_cast<const T*>(smem_at<scalar_t>(smem, L::kP + part * L::kPartBytes));
        wmma::fragment<wmma::matrix_a, kFrag, kFrag, kFrag, T, wmma::row_major> fa;
        wmma::load_matrix_sync(fa, Pp + fr * kFrag * L::kLdP + kk, L::kLdP);
#pragma unroll
        for (int f = 0; f < 2; ++f) wmma::mma_sync(acc[f], fa, fb[f], acc[f]);
      }
    }
#pragma unroll
    for (int f = 0; f < 2; ++f) {
      wmma::store_matrix_sync(O + fr * kFrag * L::kLdO + (fc0 + f) * kFrag, acc[f], L::kLdO, wmma::mem_row_major);
    }
    __syncthreads();
    constexpr int kRowStep = kThreads / kChunk;  // thread t: column t % 64 of rows t / 64 + 4 i
    const int col = static_cast<int>(threadIdx.x) % kChunk;
#pragma unroll 4
    for (int row = static_cast<int>(threadIdx.x) / kChunk; row < kTile; row += kRowStep) {
      emit(row, col, ldexpf(O[row * L::kLdO + col], -row_exp[row]));
    }
    __syncthreads();  // V and O are rewritten by the next chunk
#endif
  }
}

template <typename scalar_t, typename acc_t, bool kTC>
__global__ void __launch_bounds__(kThreads, kMinBlocks) info_nce_lse_bwd_kernel(const BwdArgs<scalar_t, acc_t> a) {
  using L = Layout<scalar_t, acc_t, kTC>;
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ double red[kThreads / kWarpSize];
  const TileRole<scalar_t> t = tile_role(a.query, a.key, a.n, a.m, a.d, a.tiles_q);
  const acc_t scale = *a.scale;
  const int64_t d = a.d;
  const int r = static_cast<int>(threadIdx.x) / kLanesPerRow;
  const int sub = static_cast<int>(threadIdx.x) % kLanesPerRow;
  const bool row_valid = r < t.own_rows;

  // The own side's (weight, lse) per row and the other side's per column: (g, lse_r) for
  // queries, (h, lse_c) for keys, which exist only with cols.
  const bool q = t.own_is_query;
  const acc_t* own_w = q ? a.g : a.h;
  const int64_t own_ws = q ? a.g_stride : a.h_stride;
  const acc_t* own_l = q ? a.lse_r : a.lse_c;
  const int64_t own_ls = q ? a.lse_r_stride : a.lse_c_stride;
  const bool own_has = q || a.has_cols;
  const acc_t* oth_w = q ? a.h : a.g;
  const int64_t oth_ws = q ? a.h_stride : a.g_stride;
  const acc_t* oth_l = q ? a.lse_c : a.lse_r;
  const int64_t oth_ls = q ? a.lse_c_stride : a.lse_r_stride;
  const bool oth_has = !q || a.has_cols;
  scalar_t* out = (q ? a.grad_q : a.grad_k) + t.r0 * d;
  acc_t* buf = q ? a.buf_q : a.buf_k;
  if (buf != nullptr) buf += t.r0 * d;

  acc_t row_w = 0, row_l = 0;
  if (row_valid && own_has) {
    row_w = own_w[(t.r0 + r) * own_ws];
    row_l = own_l[(t.r0 + r) * own_ls];
  }
  // The positives (info_nce_math.h): element (row, c) is one when col_id[c] == row_id, with row_id a
  // query's label (query blocks) or a key's id (key blocks); its weight is u / npos of the query.
  // (3')'s shift of the own row: c_i for a query, c'_j = c_j (j < n) for a key.
  int64_t row_id = 0;
  acc_t row_u = 0, row_c = 0;
  if (row_valid) {
    const int64_t i = t.r0 + r;
    if (q) {
      row_id = label_of(a.labels, i);
      const int64_t np = a.npos[i];
      if (a.u != nullptr && np > 0) row_u = a.u[i * a.u_stride] / static_cast<acc_t>(np);
    } else {
      row_id = key_id(a.key_groups, i);
    }
    if (q || i < a.n) row_c = shift_of(a.pos[i], scale);
  }
  double row_tpos = 0.0;  // sum of T[i, j] - c_i over the positives this lane met (query blocks)
  acc_t* col_w = smem_at<acc_t>(smem, L::kColG);
  acc_t* col_l = smem_at<acc_t>(smem, L::kColL);
  acc_t* col_u = smem_at<acc_t>(smem, L::kColU);
  int64_t* col_id = smem_at<int64_t>(smem, L::kColId);
  const acc_t* S_row = smem_at<acc_t>(smem, L::kS) + r * L::kLdS;

  // (3') for this block's own rows (queries: the row direction; keys: the column direction): this
  // lane's part of sum_j e_ij (dot_ij - c) and of sum_j e_ij, float32 per tile, double across tiles.
  double own_num = 0.0, own_den = 0.0;
  const int64_t n_tiles = ceil_div(t.n_other, kTile);
  for (int64_t jt = 0; jt < n_tiles; ++jt) {
    const int64_t c0 = jt * kTile;
    const int other_rows = static_cast<int>(std::min<int64_t>(kTile, t.n_other - c0));
    const scalar_t* other = t.other + c0 * d;
    __syncthreads();  // the previous tile's P, V, O and column values are no longer read
    if (threadIdx.x < kTile) {
      const int c = static_cast<int>(threadIdx.x);
      acc_t w = 0, l = 0;
      if (c < other_rows && oth_has) {
        w = oth_w[(c0 + c) * oth_ws];
        l = oth_l[(c0 + c) * oth_ls];
      }
      col_w[c] = w;
      col_l[c] = l;
      // Query blocks: the streamed keys' ids. Key blocks: the streamed queries' labels and u / npos.
      int64_t id = 0;
      acc_t uc = 0;
      if (c < other_rows) {
        if (q) {
          id = key_id(a.key_groups, c0 + c);
        } else {
          id = label_of(a.labels, c0 + c);
          const int64_t np = a.npos[c0 + c];
          if (a.u != nullptr && np > 0) uc = a.u[(c0 + c) * a.u_stride] / static_cast<acc_t>(np);
        }
      }
      col_id[c] = id;
      col_u[c] = uc;
    }
    dot_tile<scalar_t, acc_t, kTC>(smem, t.own, t.own_rows, other, other_rows, d, a.vec);  // ends with a barrier

    // (1) for this lane's 16 elements; (3') from the unscaled dot products.
    acc_t p[kColsPerLane];
    acc_t tile_num = 0, tile_den = 0;
#pragma unroll
    for (int k = 0; k < kColsPerLane; ++k) {
      const int c = sub + kLanesPerRow * k;
      acc_t pk = 0;
      if (row_valid && c < other_rows) {
        const acc_t dot = S_row[c];
        const acc_t s = scale * dot;
        // grad_s(s, g_i, lse_r_i, has_cols, h_j, lse_c_j) term by term (a zero weight gives an
        // exact 0 term): the query's pair is the row's in a query block and the column's in a key
        // block, and the row direction's term comes first, as in grad_s.
        const acc_t e_own = own_has ? softmax_weight(s, row_w, row_l) : acc_t(0);
        const acc_t e_oth = oth_has ? softmax_weight(s, col_w[c], col_l[c]) : acc_t(0);
        pk = q ? row_w * e_own + col_w[c] * e_oth : col_w[c] * e_oth + row_w * e_own;
        // The positives' u last, as grad_s adds it: a one-hot row cancels before any rounding.
        if (col_id[c] == row_id) {
          if (q) {
            pk += row_u;
            row_tpos += static_cast<double>(dot - row_c);
          } else {
            pk += col_u[c];
          }
        }
        tile_num += e_own * (dot - row_c);
        tile_den += e_own;
      }
      p[k] = pk;
    }
    own_num += static_cast<double>(tile_num);
    own_den += static_cast<double>(tile_den);
    store_p<scalar_t, acc_t, kTC>(smem, r, sub, p);  // each thread rewrites only its own S elements
    __syncthreads();

    const bool first = jt == 0;
    const bool last = jt == n_tiles - 1;
    for (int64_t d0 = 0; d0 < d; d0 += kChunk) {
      pv_chunk<scalar_t, acc_t, kTC>(smem, other, other_rows, d, d0, a.vec, [&](int row, int col, acc_t v) {
        const int64_t dc = d0 + col;
        if (row < t.own_rows && dc < d) {
          const int64_t idx = row * d + dc;
          acc_t val = scale * v;
          if (!first) val += buf[idx];  // written by this same thread for the previous tile
          if (last) {
            out[idx] = static_cast<scalar_t>(val);
          } else {
            buf[idx] = val;
          }
        }
      });
    }
  }
  // (3'): the 4 lanes of a row merge their sums in a fixed butterfly (every lane gets the same bits),
  // the first adds w num / den, and the block's rows are summed in a fixed tree.
#pragma unroll
  for (int off = 1; off < kLanesPerRow; off *= 2) {
    own_num += shfl_xor(own_num, off);
    own_den += shfl_xor(own_den, off);
    row_tpos += shfl_xor(row_tpos, off);
  }
  double mine = 0.0;
  if (sub == 0 && row_valid) {
    // dscale_row for a query (u = 0 without positives); a key's column is dscale_col's h (num / den + c').
    if (q) {
      const int64_t np = a.npos[t.r0 + r];
      const acc_t u = a.u != nullptr ? a.u[(t.r0 + r) * a.u_stride] : acc_t(0);
      const double t_mean = np > 0 ? row_tpos / static_cast<double>(np) : fl_nan<double>();
      mine = dscale_row(row_w, own_num, own_den, u, t_mean, row_c);
    } else if (own_has) {
      mine = dscale_col(row_w, own_num, own_den, row_c);
    }
  }
  const double total = block_allreduce(mine, red, 0.0, [](double x, double y) { return x + y; });
  if (threadIdx.x == 0) a.dscale_partial[blockIdx.x] = total;
}

// grad_scale = the sum of the blocks' partials, in index order per thread, then a fixed tree.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) info_nce_dscale_kernel(const double* partial, int64_t n, acc_t* out) {
  __shared__ double red[kThreads / kWarpSize];
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) s += partial[i];
  s = block_allreduce(s, red, 0.0, [](double x, double y) { return x + y; });
  if (threadIdx.x == 0) *out = static_cast<acc_t>(s);
}

// ---- launchers (host code) ----

// The argument checks of this file, with the CPU kernel's messages; the CPU kernel's branch adds
// check_info_nce_args / check_info_nce_bwd_args to fusedloss/checks.h, which can replace these.
void check_inputs(const at::Tensor& query, const at::Tensor& key, const at::Tensor& scale, const char* op) {
  TORCH_CHECK(query.dim() == 2, "fusedloss: ", op, ": query must be 2-D (N, D), got ", query.dim(), "-D");
  TORCH_CHECK(key.dim() == 2, "fusedloss: ", op, ": key must be 2-D (M, D), got ", key.dim(), "-D");
  TORCH_CHECK(key.size(1) == query.size(1), "fusedloss: ", op, ": query and key must have the same feature size, got ",
              query.size(1), " and ", key.size(1));
  const auto dt = query.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, "fusedloss: ", op,
              ": query must be float32, float64, float16 or bfloat16, got ", dt);
  TORCH_CHECK(key.scalar_type() == dt, "fusedloss: ", op, ": key must have query's dtype ", dt, ", got ",
              key.scalar_type());
  TORCH_CHECK(query.is_cuda(), "fusedloss: ", op, " (CUDA): query must be a CUDA tensor, got ", query.device());
  TORCH_CHECK(key.device() == query.device(), "fusedloss: ", op, ": key is on ", key.device(), " but query is on ",
              query.device());
  TORCH_CHECK(query.is_contiguous(), "fusedloss: ", op, ": query must be contiguous");
  TORCH_CHECK(key.is_contiguous(), "fusedloss: ", op, ": key must be contiguous");
  const auto acc = dt == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(scale.dim() == 0, "fusedloss: ", op, ": scale must be a 0-dim tensor, got shape ", scale.sizes());
  TORCH_CHECK(scale.scalar_type() == acc || scale.scalar_type() == at::kDouble, "fusedloss: ", op, ": scale must be ",
              acc, " or float64 for ", dt, " inputs, got ", scale.scalar_type());
  TORCH_CHECK(scale.device() == query.device(), "fusedloss: ", op, ": scale is on ", scale.device(),
              " but query is on ", query.device());
}

// labels: (n,) int64 on query's device (values not read: no sync); none means query i's key is i.
void check_labels(const std::optional<at::Tensor>& labels, const at::Tensor& query, const at::Tensor& key,
                  const std::optional<at::Tensor>& key_groups, const char* op) {
  const int64_t n = query.size(0), m = key.size(0);
  if (key_groups.has_value()) {
    TORCH_CHECK(labels.has_value(), "fusedloss: ", op, ": key_groups needs labels (the queries' group ids)");
    TORCH_CHECK(key_groups->dim() == 1 && key_groups->size(0) == m, "fusedloss: ", op, ": key_groups must have shape (",
                m, ",), got ", key_groups->sizes());
    TORCH_CHECK(key_groups->scalar_type() == at::kLong, "fusedloss: ", op, ": key_groups must be int64, got ",
                key_groups->scalar_type());
    TORCH_CHECK(key_groups->device() == query.device(), "fusedloss: ", op, ": key_groups is on ", key_groups->device(),
                " but query is on ", query.device());
  }
  if (!labels.has_value()) {
    TORCH_CHECK(m >= n, "fusedloss: ", op, ": without labels (labels_i = i) there must be at least as many keys as "
                "queries, got N=", n, " and M=", m);
    return;
  }
  TORCH_CHECK(labels->dim() == 1 && labels->size(0) == n, "fusedloss: ", op, ": labels must have shape (", n,
              ",), got ", labels->sizes());
  TORCH_CHECK(labels->scalar_type() == at::kLong, "fusedloss: ", op, ": labels must be int64, got ",
              labels->scalar_type());
  TORCH_CHECK(labels->device() == query.device(), "fusedloss: ", op, ": labels is on ", labels->device(),
              " but query is on ", query.device());
}

// A (len,) vector in the accumulation dtype on query's device, any stride.
void check_vector(const at::Tensor& v, int64_t len, const at::Tensor& query, const char* name, const char* op) {
  const auto acc = query.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(v.dim() == 1 && v.size(0) == len, "fusedloss: ", op, ": ", name, " must have shape (", len,
              ",), got ", v.sizes());
  TORCH_CHECK(v.scalar_type() == acc, "fusedloss: ", op, ": ", name, " must be ", acc, ", got ", v.scalar_type());
  TORCH_CHECK(v.device() == query.device(), "fusedloss: ", op, ": ", name, " is on ", v.device(),
              " but query is on ", query.device());
}

// float16 / bfloat16 always take the WMMA path, whose bf16 fragments need compute capability 8.0.
void check_device_arch(at::ScalarType dt, const at::Device& device) {
  if (dt != at::kHalf && dt != at::kBFloat16) return;
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device.index()));
  TORCH_CHECK(major >= 8, "fusedloss: info_nce's CUDA kernels need compute capability 8.0 or newer for ", dt,
              " inputs (tensor cores); use float32 or another backend");
}

template <typename Kernel>
void allow_smem(Kernel kernel, int bytes) {
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  }
}

// The path of each dtype: WMMA for the 16-bit types, SIMT when the input is already the
// accumulation dtype.
template <typename scalar_t, typename acc_t>
constexpr bool kTensorCores = !std::is_same_v<scalar_t, acc_t>;

template <typename scalar_t, typename acc_t>
void launch_fwd(const FwdArgs<scalar_t, acc_t>& args, int64_t blocks, cudaStream_t stream) {
  constexpr bool kTC = kTensorCores<scalar_t, acc_t>;
  const int bytes = Layout<scalar_t, acc_t, kTC>::kFwdBytes;
  auto kernel = info_nce_lse_fwd_kernel<scalar_t, acc_t, kTC>;
  allow_smem(kernel, bytes);
  kernel<<<static_cast<unsigned>(blocks), kThreads, bytes, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename acc_t>
void launch_bwd(const BwdArgs<scalar_t, acc_t>& args, int64_t blocks, cudaStream_t stream) {
  constexpr bool kTC = kTensorCores<scalar_t, acc_t>;
  const int bytes = Layout<scalar_t, acc_t, kTC>::kBwdBytes;
  auto kernel = info_nce_lse_bwd_kernel<scalar_t, acc_t, kTC>;
  allow_smem(kernel, bytes);
  kernel<<<static_cast<unsigned>(blocks), kThreads, bytes, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// 16-byte operand loads: d a multiple of 8 16-bit elements and both bases aligned.
template <typename scalar_t>
bool vec_ok(const scalar_t* query, const scalar_t* key, int64_t d) {
  return d % 8 == 0 && cuda_utils::is_aligned16(query) && cuda_utils::is_aligned16(key);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> info_nce_lse_fwd_cuda(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& scale, bool cols,
    const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& key_groups) {
  constexpr const char* op = "info_nce_lse_fwd";
  check_inputs(query, key, scale, op);
  check_labels(labels, query, key, key_groups, op);
  const c10::cuda::CUDAGuard device_guard(query.device());
  const int64_t n = query.size(0);
  const int64_t m = key.size(0);
  const int64_t d = query.size(1);
  const auto acc_dtype = query.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor lse_rows = at::empty({n}, query.options().dtype(acc_dtype));
  at::Tensor lse_cols = at::empty({cols ? m : 0}, query.options().dtype(acc_dtype));
  at::Tensor pos = at::empty({n}, query.options().dtype(acc_dtype));
  at::Tensor npos = at::empty({n}, query.options().dtype(at::kLong));
  const at::Tensor lab = labels.has_value() ? labels->contiguous() : at::Tensor();
  const at::Tensor kg = key_groups.has_value() ? key_groups->contiguous() : at::Tensor();
  const int64_t tiles_q = ceil_div(n, kTile);
  const int64_t blocks = tiles_q + (cols ? ceil_div(m, kTile) : 0);
  if (blocks == 0) return {lse_rows, lse_cols, pos, npos};
  TORCH_CHECK(blocks <= cuda_utils::kMaxGrid, "fusedloss: ", op, ": N + M too large for one grid");
  check_device_arch(query.scalar_type(), query.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor scale_acc = scale.to(acc_dtype);  // the kernels read scale in acc_t (a float64 scale is allowed)

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "fusedloss_info_nce_lse_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    FwdArgs<scalar_t, acc_t> args;
    args.query = query.const_data_ptr<scalar_t>();
    args.key = key.const_data_ptr<scalar_t>();
    args.n = n;
    args.m = m;
    args.d = d;
    args.scale = scale_acc.const_data_ptr<acc_t>();
    args.lse_rows = lse_rows.mutable_data_ptr<acc_t>();
    args.lse_cols = cols ? lse_cols.mutable_data_ptr<acc_t>() : nullptr;
    args.labels = lab.defined() ? lab.const_data_ptr<int64_t>() : nullptr;
    args.key_groups = kg.defined() ? kg.const_data_ptr<int64_t>() : nullptr;
    args.pos = pos.mutable_data_ptr<acc_t>();
    args.npos = npos.mutable_data_ptr<int64_t>();
    args.tiles_q = tiles_q;
    args.vec = vec_ok(args.query, args.key, d);
    launch_fwd(args, blocks, stream);
  });
  return {lse_rows, lse_cols, pos, npos};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> info_nce_lse_bwd_cuda(
    const at::Tensor& grad_rows, const std::optional<at::Tensor>& grad_cols, const std::optional<at::Tensor>& grad_pos,
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& scale, const at::Tensor& lse_rows,
    const std::optional<at::Tensor>& lse_cols, const at::Tensor& pos, const at::Tensor& npos,
    const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& key_groups) {
  constexpr const char* op = "info_nce_lse_bwd";
  check_inputs(query, key, scale, op);
  const int64_t n = query.size(0);
  const int64_t m = key.size(0);
  const int64_t d = query.size(1);
  check_vector(grad_rows, n, query, "grad_rows", op);
  check_vector(lse_rows, n, query, "lse_rows", op);
  check_vector(pos, n, query, "pos", op);
  if (grad_pos.has_value()) check_vector(*grad_pos, n, query, "grad_pos", op);
  TORCH_CHECK(npos.dim() == 1 && npos.size(0) == n && npos.scalar_type() == at::kLong && npos.device() == query.device(),
              "fusedloss: ", op, ": npos must be an int64 (", n, ",) tensor on query's device");
  check_labels(labels, query, key, key_groups, op);
  const at::Tensor lab = labels.has_value() ? labels->contiguous() : at::Tensor();
  const at::Tensor kg = key_groups.has_value() ? key_groups->contiguous() : at::Tensor();
  const at::Tensor pos_c = pos.contiguous();
  const at::Tensor npos_c = npos.contiguous();
  // The column direction takes part when grad_cols is given (the forward ran with cols=True).
  const bool has_cols = grad_cols.has_value();
  if (has_cols) {
    check_vector(*grad_cols, m, query, "grad_cols", op);
    TORCH_CHECK(lse_cols.has_value(), "fusedloss: ", op, ": grad_cols needs lse_cols (the forward ran with cols=True)");
    check_vector(*lse_cols, m, query, "lse_cols", op);
  }
  const c10::cuda::CUDAGuard device_guard(query.device());
  const auto acc_dtype = query.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // A side with nothing to stream gets no contribution: its gradient is 0.
  at::Tensor grad_query = m == 0 ? at::zeros({n, d}, query.options()) : at::empty({n, d}, query.options());
  at::Tensor grad_key = n == 0 ? at::zeros({m, d}, key.options()) : at::empty({m, d}, key.options());
  // d scale summed in double, returned in scale's dtype (float64 from fusedloss.functional: (3')).
  at::Tensor grad_scale = at::empty({}, query.options().dtype(at::kDouble));
  const int64_t tiles_q = ceil_div(n, kTile);
  const int64_t tiles_k = ceil_div(m, kTile);
  const int64_t blocks = tiles_q + tiles_k;
  TORCH_CHECK(blocks <= cuda_utils::kMaxGrid, "fusedloss: ", op, ": N + M too large for one grid");
  at::Tensor partial = at::empty({blocks}, query.options().dtype(at::kDouble));
  check_device_arch(query.scalar_type(), query.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor scale_acc = scale.to(acc_dtype);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "fusedloss_info_nce_lse_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr bool kSame = std::is_same_v<scalar_t, acc_t>;
    // Running sums across streamed tiles: in the output when it has the accumulation dtype, else
    // in fp32 scratch, needed only when the other side has more than one tile.
    at::Tensor buf_q, buf_k;
    if (!kSame && tiles_k > 1) buf_q = at::empty({n, d}, query.options().dtype(acc_dtype));
    if (!kSame && tiles_q > 1) buf_k = at::empty({m, d}, key.options().dtype(acc_dtype));
    BwdArgs<scalar_t, acc_t> args;
    args.query = query.const_data_ptr<scalar_t>();
    args.key = key.const_data_ptr<scalar_t>();
    args.n = n;
    args.m = m;
    args.d = d;
    args.scale = scale_acc.const_data_ptr<acc_t>();
    args.g = grad_rows.const_data_ptr<acc_t>();
    args.g_stride = grad_rows.stride(0);
    args.lse_r = lse_rows.const_data_ptr<acc_t>();
    args.lse_r_stride = lse_rows.stride(0);
    args.has_cols = has_cols;
    args.h = has_cols ? grad_cols->const_data_ptr<acc_t>() : nullptr;
    args.h_stride = has_cols ? grad_cols->stride(0) : 0;
    args.lse_c = has_cols ? lse_cols->const_data_ptr<acc_t>() : nullptr;
    args.lse_c_stride = has_cols ? lse_cols->stride(0) : 0;
    args.u = grad_pos.has_value() ? grad_pos->const_data_ptr<acc_t>() : nullptr;
    args.u_stride = grad_pos.has_value() ? grad_pos->stride(0) : 0;
    args.labels = lab.defined() ? lab.const_data_ptr<int64_t>() : nullptr;
    args.key_groups = kg.defined() ? kg.const_data_ptr<int64_t>() : nullptr;
    args.pos = pos_c.const_data_ptr<acc_t>();
    args.npos = npos_c.const_data_ptr<int64_t>();
    args.grad_q = grad_query.mutable_data_ptr<scalar_t>();
    args.grad_k = grad_key.mutable_data_ptr<scalar_t>();
    args.buf_q = kSame ? grad_query.mutable_data_ptr<acc_t>() : (buf_q.defined() ? buf_q.mutable_data_ptr<acc_t>() : nullptr);
    args.buf_k = kSame ? grad_key.mutable_data_ptr<acc_t>() : (buf_k.defined() ? buf_k.mutable_data_ptr<acc_t>() : nullptr);
    args.dscale_partial = partial.mutable_data_ptr<double>();
    args.tiles_q = tiles_q;
    args.vec = vec_ok(args.query, args.key, d);
    if (blocks > 0) launch_bwd(args, blocks, stream);
    info_nce_dscale_kernel<double><<<1, kThreads, 0, stream>>>(args.dscale_partial, blocks,
                                                                grad_scale.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_query, grad_key, grad_scale.to(scale.scalar_type())};
}

}  // namespace
}  // namespace info_nce
}  // namespace fusedloss

TORCH_LIBRARY_IMPL(fusedloss, CUDA, m) {
  m.impl("info_nce_lse_fwd", &fusedloss::info_nce::info_nce_lse_fwd_cuda);
  m.impl("info_nce_lse_bwd", &fusedloss::info_nce::info_nce_lse_bwd_cuda);
}
