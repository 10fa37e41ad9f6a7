// The schemas of the probability-target cross-entropy's kernel ops (issue #16, item 3), a fragment of
// the fusedloss library of csrc/registration.cpp kept in a file of its own so that the op's files are
// all new. Kernels: csrc/cpu/soft_cross_entropy.cpp, csrc/cuda/soft_cross_entropy.cu; the Triton twins
// fusedloss::soft_cross_entropy_{fwd,bwd}_triton (same schemas) and the fakes and autograd are
// registered in Python (fusedloss/ops/soft_cross_entropy.py). Math: fusedloss/soft_cross_entropy_math.h.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fusedloss, m) {
  // logits (N, C) with unit class stride; target (N, C) class probabilities (any rows, not necessarily
  // summing to 1) with unit class stride, in logits' dtype or the accumulation dtype (float32, float64
  // for float64 logits); weight (C,) in the accumulation dtype. label_smoothing in [0, 1] mixes the
  // target with the uniform distribution as torch does; z_loss, softcap (0: off) and temperature as
  // cross_entropy_fwd's. Returns, in the accumulation dtype: the per-row loss
  // -sum_j w_j t'_j log p_j + z_loss lse^2 (N,), the per-row lse (N,), stats (N, 3) = (max, log_s,
  // sum_j w_j t'_j) for the backward and, with entropy, the per-row entropy of the transformed logits'
  // softmax (N,) from the same pass (math header (6); stats is then (N, 4), H last), else a (0,)
  // tensor. The reduction happens in Python, on device.
  m.def(
      "soft_cross_entropy_fwd(Tensor logits, Tensor target, Tensor? weight, float label_smoothing, float z_loss, "
      "float softcap, float temperature, bool entropy=False) -> (Tensor, Tensor, Tensor, Tensor)");
  // grad_loss, grad_lse and grad_entropy (N,) in the accumulation dtype, any stride (an expanded scalar
  // is fine); stats the forward's third output ((N, 4), from entropy=True, when grad_entropy is given).
  // Returns the (N, C) gradient of the logits in their dtype and, when target_grad, the target's (N, C)
  // gradient in its dtype (else a (0,) tensor: no extra write), both contiguous.
  m.def(
      "soft_cross_entropy_bwd(Tensor grad_loss, Tensor? grad_lse, Tensor logits, Tensor target, Tensor? weight, "
      "Tensor stats, float label_smoothing, float z_loss, float softcap, float temperature, bool target_grad, "
      "Tensor? grad_entropy=None) -> (Tensor, Tensor)");
}
