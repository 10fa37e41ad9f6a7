#pragma once
// Macros shared by every kernel header. The math headers are compiled twice: by the host compiler
// for the CPU kernels and by nvcc for the CUDA kernels, so that the CPU tests run the same
// formulas as the GPU.

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FL_HOST_DEVICE __host__ __device__ __forceinline__
#define FL_DEVICE_CODE 1
#else
#define FL_HOST_DEVICE inline
#define FL_DEVICE_CODE 0
#endif

#include <cmath>
#include <cstdint>

namespace fusedloss {

// Overloads picked by argument type, so templated math reads the same for float and double.
FL_HOST_DEVICE float fl_exp(float x) { return ::expf(x); }
FL_HOST_DEVICE double fl_exp(double x) { return ::exp(x); }
FL_HOST_DEVICE float fl_log(float x) { return ::logf(x); }
FL_HOST_DEVICE double fl_log(double x) { return ::log(x); }
FL_HOST_DEVICE float fl_expm1(float x) { return ::expm1f(x); }
FL_HOST_DEVICE double fl_expm1(double x) { return ::expm1(x); }
FL_HOST_DEVICE float fl_tanh(float x) { return ::tanhf(x); }
FL_HOST_DEVICE double fl_tanh(double x) { return ::tanh(x); }
FL_HOST_DEVICE float fl_pow(float x, float y) { return ::powf(x, y); }
FL_HOST_DEVICE double fl_pow(double x, double y) { return ::pow(x, y); }
// A product rounded on its own. nvcc fuses a * b - c into one FMA by default; where a backward
// recomputes a value whose rounded form the forward already used (the transformed logit z, whose
// row max the forward saved), the fused form would differ from the forward by a rounding.
FL_HOST_DEVICE float fl_mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
FL_HOST_DEVICE double fl_mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
// at::vec vectors (host only): GCC does not contract in the ISO C++ mode torch builds with
// (-std=c++NN implies -ffp-contract=off).
template <typename T>
FL_HOST_DEVICE T fl_mul_rn(const T& a, const T& b) {
  return a * b;
}
template <typename T>
FL_HOST_DEVICE T fl_max(T a, T b) {
  // NaN must win so that a NaN logit poisons its row, as in torch.
  return (a != a || a > b) ? a : b;
}
// x where x > 0, else 0 (NaN gives 0); and the matching step function [x > 0].
FL_HOST_DEVICE float fl_positive_part(float x) { return x > 0.f ? x : 0.f; }
FL_HOST_DEVICE double fl_positive_part(double x) { return x > 0.0 ? x : 0.0; }
FL_HOST_DEVICE float fl_step(float x) { return x > 0.f ? 1.f : 0.f; }
FL_HOST_DEVICE double fl_step(double x) { return x > 0.0 ? 1.0 : 0.0; }
// v where c > 0, else 0 (v is not evaluated into the result elsewhere, so an inf * 0 there is harmless).
FL_HOST_DEVICE float fl_where_positive(float c, float v) { return c > 0.f ? v : 0.f; }
FL_HOST_DEVICE double fl_where_positive(double c, double v) { return c > 0.0 ? v : 0.0; }
template <typename T>
FL_HOST_DEVICE T fl_nan() {
  return T(NAN);
}
template <typename T>
FL_HOST_DEVICE T fl_inf() {
  return T(INFINITY);
}

}  // namespace fusedloss

#if defined(FL_CPU_VEC) && !FL_DEVICE_CODE
// The same templates run on at::vec vectors in the CPU kernels. These overloads must be declared
// before the math headers' templates (two-phase lookup does not find them through ADL).
#include <ATen/cpu/vec/vec.h>
namespace fusedloss {
template <typename T>
inline at::vec::Vectorized<T> fl_exp(const at::vec::Vectorized<T>& x) {
  // exp_u20 (max 2 ulp) instead of exp (1 ulp): about 2x the throughput, which bounds the CPU
  // kernels; the error is far below the fp32 test tolerance.
  return x.exp_u20();
}
template <typename T>
inline at::vec::Vectorized<T> fl_tanh(const at::vec::Vectorized<T>& x) {
  return x.tanh();
}
template <typename T>
inline at::vec::Vectorized<T> fl_max(const at::vec::Vectorized<T>& a, const at::vec::Vectorized<T>& b) {
  return at::vec::maximum(a, b);  // propagates NaN, like the scalar fl_max
}
template <typename T>
inline at::vec::Vectorized<T> fl_positive_part(const at::vec::Vectorized<T>& x) {
  const at::vec::Vectorized<T> zero(T(0));
  return at::vec::Vectorized<T>::blendv(zero, x, x > zero);
}
template <typename T>
inline at::vec::Vectorized<T> fl_where_positive(const at::vec::Vectorized<T>& c, const at::vec::Vectorized<T>& v) {
  const at::vec::Vectorized<T> zero(T(0));
  return at::vec::Vectorized<T>::blendv(zero, v, c > zero);
}
template <typename T>
inline at::vec::Vectorized<T> fl_step(const at::vec::Vectorized<T>& x) {
  const at::vec::Vectorized<T> zero(T(0));
  return at::vec::Vectorized<T>::blendv(zero, at::vec::Vectorized<T>(T(1)), x > zero);
}
}  // namespace fusedloss
#endif
