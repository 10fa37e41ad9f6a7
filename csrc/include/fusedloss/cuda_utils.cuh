#pragma once
// Small launch and memory helpers of the CUDA kernels, for .cu files only (nvcc).
//
// Shared by every .cu file. The lane-order reductions at the end are not used by cross_entropy.cu,
// whose own reductions merge (max, sum) pairs.

#include <cstdint>
#include <limits>

namespace fusedloss {
namespace cuda_utils {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarpSize = 32;
// Grids are 1-D with at most 2^31 - 1 blocks; launchers split larger work into several launches.
constexpr int64_t kMaxGrid = std::numeric_limits<int32_t>::max();

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Smallest power of two >= v, for v <= hi; 1 for v <= 1.
inline int pow2_at_least(int64_t v, int hi) {
  int p = 1;
  while (p < v && p < hi) p *= 2;
  return p;
}

template <typename T>
inline bool is_aligned16(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// Every row base base + r * row_stride is 16-byte aligned (a single row needs no stride check:
// torch reports arbitrary strides for size-1 dimensions).
template <typename scalar_t>
inline bool rows_aligned16(const scalar_t* base, int64_t row_stride, int64_t n_rows) {
  return is_aligned16(base) && (n_rows <= 1 || (row_stride * static_cast<int64_t>(sizeof(scalar_t))) % 16 == 0);
}

// V elements loaded or stored as one 16-byte (V * sizeof(T) == 16) or scalar (V == 1) access.
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <int V, typename T>
__device__ __forceinline__ Pack<T, V> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, V>*>(p);
}

template <int V, typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, V>& v) {
  *reinterpret_cast<Pack<T, V>*>(p) = v;
}

// Lane-order reductions. `op(left, right)` always gets the partial of the lower lanes on the left,
// so every lane ends with the same bits even for an op that is not commutative bit for bit (a
// NaN-propagating max picks between NaN payloads and signed zeros by operand order), and the order
// is a fixed tree: deterministic run to run.
template <typename T>
__device__ __forceinline__ T shfl_xor(T v, int lane_mask) {
  return __shfl_xor_sync(kFullMask, v, lane_mask);
}

// Butterfly over aligned groups of `width` lanes (a power of two <= 32): every lane of a group
// ends with the reduction of the group. Every lane of the warp must call it (full mask).
template <typename T, typename Op>
__device__ __forceinline__ T group_allreduce(T v, int width, Op op) {
  const int lane = static_cast<int>(threadIdx.x) & (kWarpSize - 1);
  for (int off = 1; off < width; off *= 2) {
    const T other = shfl_xor(v, off);
    v = (lane & off) ? op(other, v) : op(v, other);
  }
  return v;
}

// Block-wide all-reduce (blockDim.x a multiple of 32, <= 1024, smem of blockDim.x / 32 slots):
// every thread ends with the same result. Every thread of the block must reach it, at most once
// per kernel (smem is not reusable after it without another barrier). Each warp folds the warp
// partials itself, so no second barrier is needed.
template <typename T, typename Op>
__device__ __forceinline__ T block_allreduce(T v, T* smem, const T& identity, Op op) {
  const int lane = static_cast<int>(threadIdx.x) & (kWarpSize - 1);
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int n_warps = static_cast<int>(blockDim.x) / kWarpSize;
  v = group_allreduce(v, kWarpSize, op);
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = lane < n_warps ? smem[lane] : identity;
  return group_allreduce(v, kWarpSize, op);
}

}  // namespace cuda_utils
}  // namespace fusedloss
