#pragma once
// Helpers shared by the CPU kernels (compiled with FL_CPU_VEC, see common.h).
#include "fusedloss/common.h"

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/Exception.h>

#include <sys/mman.h>

#include <algorithm>
#include <cstdint>

namespace fusedloss {
namespace cpu {

using at::vec::Vectorized;

// Loads and stores Vectorized<acc_t>::size() elements of scalar_t, converting to acc_t.
template <typename scalar_t>
struct VecIO {
  using Vec = Vectorized<scalar_t>;
  static Vec load(const scalar_t* p) { return Vec::loadu(p); }
  static void store(scalar_t* p, const Vec& v) { v.store(p); }
};
template <typename reduced_t>
struct ReducedVecIO {
  using Vec = Vectorized<float>;
  static Vec load(const reduced_t* p) {
    Vec out;
    at::vec::load_to_float(p, out);
    return out;
  }
  static void store(reduced_t* p, const Vec& v) {
    at::vec::convert_from_float<reduced_t>(v, v).store(p, Vec::size());
  }
};
template <>
struct VecIO<at::BFloat16> : ReducedVecIO<at::BFloat16> {};
template <>
struct VecIO<at::Half> : ReducedVecIO<at::Half> {};

template <typename acc_t>
inline acc_t reduce_max(const Vectorized<acc_t>& v) {
  alignas(64) acc_t buf[Vectorized<acc_t>::size()];
  v.store(buf);
  acc_t m = buf[0];
  for (int i = 1; i < Vectorized<acc_t>::size(); ++i) m = fl_max(m, buf[i]);
  return m;
}

template <typename acc_t>
inline acc_t reduce_sum(const Vectorized<acc_t>& v) {
  alignas(64) acc_t buf[Vectorized<acc_t>::size()];
  v.store(buf);
  acc_t s = 0;
  for (int i = 0; i < Vectorized<acc_t>::size(); ++i) s += buf[i];
  return s;
}

// A fresh gradient buffer of hundreds of MB costs more in 4 KB page faults than the kernel's math
// (measured: ~150 ms per 512 MB). Asking for transparent huge pages before the first touch cuts the
// faults 512-fold where THP is in madvise mode. Best effort: a failure only loses the speed-up.
inline void advise_huge_pages(void* ptr, size_t bytes) {
#ifdef MADV_HUGEPAGE
  constexpr size_t kMinBytes = size_t(8) << 20;
  if (bytes < kMinBytes) return;
  const uintptr_t page = 4096;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(ptr) + page - 1) & ~(page - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(ptr) + bytes) & ~(page - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
}

// Work items per thread of at::parallel_for when each item touches `elements` elements: torch's own
// grain (at::internal::GRAIN_SIZE, 32768 elements), so that a small input runs on the calling thread
// instead of paying a thread wake-up (tens of microseconds) for a few microseconds of work. Rows are
// independent: how they are split between threads changes no bit of the result.
inline int64_t grain_items(int64_t elements) {
  constexpr int64_t kGrainElements = 32768;
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(elements, 1));
}

// Class-index targets must be in [0, C) or equal ignore_index: IndexError (via TORCH_CHECK_INDEX)
// before any kernel reads x[target].
inline void check_targets(const int64_t* target, int64_t N, int64_t C, int64_t ignore_index) {
  for (int64_t i = 0; i < N; ++i) {
    const int64_t y = target[i];
    TORCH_CHECK_INDEX(y == ignore_index || (y >= 0 && y < C), "fusedloss: target ", y, " at position ", i,
                      " is out of range for ", C, " classes (and is not ignore_index=", ignore_index, ")");
  }
}

}  // namespace cpu
}  // namespace fusedloss
