// The one TORCH_LIBRARY block of fusedloss: every op's schema. Each backend file registers its
// kernels with TORCH_LIBRARY_IMPL(fusedloss, <key>); fake kernels are registered from Python
// (fusedloss/ops/). Two layers:
//   - the public-level ops (cross_entropy, focal_loss, gap_loss, linear_cross_entropy): what fusedloss.functional calls, a
//     reduced loss and what the backward needs; autograd in C++ (csrc/autograd.cpp);
//   - the kernel ops they are made of (<op>_fwd, <op>_bwd, reduce_rows): per-row values.
// The Triton twins (fusedloss::<op>_triton) are torch.library.triton_op registrations made in Python
// (fusedloss/ops/) with the same schemas.
#include <Python.h>
#include <torch/library.h>

PyMethodDef* fusedloss_python_methods();  // csrc/python_call.cpp: the direct op call of the functional API

extern "C" {
// `import fusedloss._C` loads this shared object, which runs the static registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, fusedloss_python_methods()};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fusedloss, m) {
  // ---- public-level ops. reduction is at::Reduction's value: 0 none, 1 mean, 2 sum. The loss is 0-dim
  // for mean/sum, per row (N,) for none, in the accumulation dtype; mass, the mean's denominator (see
  // reduce_rows), is 0-dim for mean/sum and (0,) for none. Other outputs as the kernel ops' below.
  // token_weight: (N,) contiguous in the accumulation dtype, multiplies each row's loss (none: the
  // rows; mean/sum: the sums of reduce_rows, whose mass then weighs each kept row by it too).
  // extras: logprob and entropy per row (N,), differentiable (else both (0,)).
  m.def(
      "cross_entropy(Tensor logits, Tensor target, Tensor? weight, Tensor? token_weight, int ignore_index, "
      "int reduction, float label_smoothing, float z_loss, float softcap, float temperature, bool extras=False) "
      "-> (Tensor loss, Tensor lse, Tensor stats, Tensor mass, Tensor logprob, Tensor entropy)");
  // factor: the row loss's per-class factor a_y (weight * alpha); weight: the class weights of the mean.
  m.def(
      "focal_loss(Tensor logits, Tensor target, Tensor? factor, Tensor? weight, Tensor? token_weight, "
      "int ignore_index, int reduction, float gamma) -> (Tensor loss, Tensor stats, Tensor coef, Tensor mass)");
  m.def(
      "gap_loss(Tensor input, Tensor target, Tensor? weight, float margin, int p, int ignore_index, "
      "bool class_normalize, bool max_mode, int reduction) -> (Tensor loss, Tensor mass)");
  // Linear cross-entropy, cross_entropy(input @ linear_weight.T + linear_bias, target) without the (N, V)
  // logits, in chunks of chunk_size rows (> 0). lse (N,) per row, not differentiable. With mean/sum and
  // gradients wanted, the autograd kernel computes them in the forward (csrc/autograd.cpp), except with
  // extras: logprob and entropy per row (N,), differentiable (else both (0,)), whose gradients the
  // backward makes from recomputed logits and stats, cross_entropy_fwd's (N, 4) ones (else (0,)).
  m.def(
      "linear_cross_entropy(Tensor input, Tensor linear_weight, Tensor target, Tensor? linear_bias, "
      "Tensor? weight, Tensor? token_weight, int ignore_index, int reduction, float label_smoothing, "
      "float z_loss, float softcap, int chunk_size, bool extras=False) "
      "-> (Tensor loss, Tensor lse, Tensor mass, Tensor stats, Tensor logprob, Tensor entropy)");
  // sum_i kept_i u_i loss_i and mass = sum_i kept_i u_i w[target_i] (kept_i: target_i != ignore_index;
  // u the token weights, w the class weights, 1 when absent), the first divided by mass when mean, as
  // 0-dim tensors of the loss's dtype; deterministic (fusedloss/reduce_math.h).
  m.def(
      "reduce_rows(Tensor loss, Tensor target, Tensor? weight, Tensor? token_weight, int ignore_index, bool mean) "
      "-> (Tensor out, Tensor mass)");

  // ---- kernel ops
  // logits (N, C) with unit class stride; target (N,) int64; weight (C,) in the accumulation dtype
  // (float32, float64 for float64 logits). Returns, in the accumulation dtype: the per-row loss
  // (N,), the per-row lse (N,), and stats (N, 2) = (max, log_s) of the transformed row, which the
  // backward needs (lse = max + log_s loses log_s when |max| is huge). Ignored rows give zeros.
  // extras: stats is (N, 4) = (max, log_s, logprob, entropy) (cross_entropy_math.h (7)).
  // The reduction happens in Python, on device.
  m.def(
      "cross_entropy_fwd(Tensor logits, Tensor target, Tensor? weight, int ignore_index, "
      "float label_smoothing, float z_loss, float softcap, float temperature, bool extras=False) "
      "-> (Tensor, Tensor, Tensor)");
  // grad_loss and grad_lse are (N,) in the accumulation dtype, any stride (an expanded scalar is
  // fine); stats is the forward's third output. grad_logprob / grad_entropy: the gradients of the
  // extras, (N,) like grad_loss; grad_entropy needs the (N, 4) stats. Returns the (N, C) gradient of
  // the logits, contiguous, in the logits' dtype.
  m.def(
      "cross_entropy_bwd(Tensor grad_loss, Tensor? grad_lse, Tensor logits, Tensor target, "
      "Tensor? weight, Tensor stats, int ignore_index, float label_smoothing, float z_loss, "
      "float softcap, float temperature, Tensor? grad_logprob=None, Tensor? grad_entropy=None) -> Tensor");

  // The row kernel of chunked linear cross-entropy: forward and gradient in one pass over a chunk
  // of logits. logits (N, C) contiguous, overwritten in place with d loss_i / d logits_i times
  // grad_scale_i (grad_scale (N,) in the accumulation dtype, any stride; None means 1), in the
  // logits' dtype; z_loss enters the gradient, the returned lse does not carry a gradient. Returns
  // the per-row loss and lse in the accumulation dtype, as cross_entropy_fwd (0 for ignored rows,
  // whose gradient rows are written as 0).
  m.def(
      "cross_entropy_fwd_grad_(Tensor(a!) logits, Tensor target, Tensor? weight, Tensor? grad_scale, "
      "int ignore_index, float label_smoothing, float z_loss, float softcap, float temperature) "
      "-> (Tensor, Tensor)");

  // The same, on class-major logits (CPU only): logits_t (C, N) contiguous in the accumulation dtype,
  // column i holding row i. Chunked linear cross-entropy computes a chunk's logits in this layout
  // on CPU, where the BLAS is faster at producing it (see csrc/cpu/linear_cross_entropy.cpp).
  m.def(
      "cross_entropy_fwd_grad_cols_(Tensor(a!) logits_t, Tensor target, Tensor? weight, Tensor? grad_scale, "
      "int ignore_index, float label_smoothing, float z_loss, float softcap, float temperature) "
      "-> (Tensor, Tensor)");

  // The chunk loop of linear_cross_entropy (csrc/linear_cross_entropy.cpp): input (N, D), linear_weight
  // (V, D), target (N,) int64, linear_bias (V,), weight (V,) in the accumulation dtype, grad_scale (N,)
  // (None: 1) scaling each row's gradient. Returns the per-row loss and lse (N,) and the gradients of
  // sum_i grad_scale_i loss_i for input, linear_weight, linear_bias where asked ((0,) otherwise), all in
  // the accumulation dtype. The sixth output is the extras' stats: extras=True (no gradients) gives
  // cross_entropy_fwd's (N, 4) ones; passing them back as stats, with grad_logprob / grad_entropy (N,),
  // makes the gradients of sum_i (grad_scale_i loss_i + grad_logprob_i logprob_i + grad_entropy_i H_i)
  // from recomputed logits (loss and lse are then (0,)); (0,) otherwise.
  m.def(
      "linear_cross_entropy_chunks(Tensor input, Tensor linear_weight, Tensor target, Tensor? linear_bias, "
      "Tensor? weight, Tensor? grad_scale, int ignore_index, float label_smoothing, float z_loss, float softcap, "
      "int chunk_size, bool input_grad, bool weight_grad, bool bias_grad, Tensor? stats=None, "
      "Tensor? grad_logprob=None, Tensor? grad_entropy=None, bool extras=False) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");

  // Focal loss (cross_entropy_math.h (6)): the cross-entropy forward's row pass with a focal finish.
  // logits, target as for cross_entropy_fwd; weight (C,) in the accumulation dtype is the per-class
  // factor a_y of the row's loss (the functional API passes weight * alpha); gamma >= 0. Returns, in
  // the accumulation dtype: the per-row loss a_y (1 - p_y)^gamma (-log p_y) (N,), stats (N, 2) =
  // (max, log_s) as cross_entropy_fwd's, and coef (N,) with d loss_i / d logits_i = coef_i *
  // (softmax(logits_i) - onehot(y_i)). Ignored rows give zeros. No backward op of its own: the
  // gradient is cross_entropy_bwd(grad_loss * coef, None, logits, target, None, stats, ignore_index,
  // 0, 0, 0, 1), composed in Python (fusedloss/ops/focal_loss.py).
  m.def("focal_loss_fwd(Tensor logits, Tensor target, Tensor? weight, int ignore_index, float gamma) "
        "-> (Tensor, Tensor, Tensor)");

  // Multi-class gap hinge. input (N, C) with unit class stride, target (N,) int64, weight (C,) in
  // the accumulation dtype; p is 1 or 2; max_mode keeps only the largest violation per row
  // (Crammer-Singer). Returns the per-row loss (N,) in the accumulation dtype, 0 for ignored rows.
  m.def(
      "gap_loss_fwd(Tensor input, Tensor target, Tensor? weight, float margin, int p, int ignore_index, "
      "bool class_normalize, bool max_mode) -> Tensor");
  // Returns the (N, C) gradient, contiguous, in the input's dtype. grad_loss as for cross_entropy_bwd.
  m.def(
      "gap_loss_bwd(Tensor grad_loss, Tensor input, Tensor target, Tensor? weight, float margin, int p, "
      "int ignore_index, bool class_normalize, bool max_mode) -> Tensor");

  // InfoNCE's one kernel (fusedloss/info_nce_math.h): log-sum-exp of the scaled similarity S = scale *
  // query @ key.T along its rows (N,) and, when cols, along its columns (M,), and the positive logits
  // pos_i = S_{i, labels_i} (labels (N,) int64 in [0, M); None: labels_i = i, which needs M >= N), without
  // materializing S. query (N, D) and key (M, D) contiguous, one floating dtype; scale a 0-dim tensor in
  // the accumulation dtype or float64 (1 / temperature, on the inputs' device: learnable, never read on
  // the host). With key_groups (M,) int64, query i's positives are every key j with key_groups_j ==
  // labels_i (labels are then the queries' group ids, any values) and pos_i is the mean of their S_ij.
  // Returns lse_rows (N,), lse_cols (M,) ((0,) when not cols) and pos (N,) in the accumulation dtype,
  // and npos (N,) int64, each query's number of positives; pos is NaN where a query has none (a label
  // out of range: checked only on CPU, without key_groups). The loss lse - pos and the reduction are
  // left to the caller (autograd composes them).
  m.def("info_nce_lse_fwd(Tensor query, Tensor key, Tensor scale, bool cols, Tensor? labels=None, "
        "Tensor? key_groups=None) -> (Tensor, Tensor, Tensor, Tensor)");
  // Gradients of sum_i grad_rows_i lse_rows_i + sum_j grad_cols_j lse_cols_j + sum_i grad_pos_i pos_i:
  // grad_query (N, D) and grad_key (M, D) in the inputs' dtype, grad_scale 0-dim in scale's dtype.
  // pos, npos, labels and key_groups are the forward's (pos gives (3')'s shifts). The tiles of S are
  // recomputed; no atomics: the result is deterministic.
  m.def(
      "info_nce_lse_bwd(Tensor grad_rows, Tensor? grad_cols, Tensor? grad_pos, Tensor query, Tensor key, "
      "Tensor scale, Tensor lse_rows, Tensor? lse_cols, Tensor pos, Tensor npos, Tensor? labels=None, "
      "Tensor? key_groups=None) -> (Tensor, Tensor, Tensor)");
  // The forward of a reduced InfoNCE with its gradients (CPU): returns total = sum over the queries with
  // a positive of lse_rows_i - pos_i (0-dim, accumulation dtype), npos (N,) int64, and the gradients of
  // total: grad_query (N, D) and grad_key (M, D) in the inputs' dtype ((0,) where not asked for) and
  // grad_scale 0-dim in scale's dtype (0 where not asked for). The autograd (csrc/autograd.cpp) scales
  // them by the upstream gradient of total. Arguments as info_nce_lse_fwd's, one direction.
  m.def(
      "info_nce_fwd_grad(Tensor query, Tensor key, Tensor scale, Tensor? labels=None, Tensor? key_groups=None, "
      "bool query_grad=True, bool key_grad=True, bool scale_grad=True) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");

  // Distillation (fusedloss/kl_div_math.h). student and teacher (N, C), one floating dtype, unit
  // class stride; target (N,) int64 or None (rows whose target is ignore_index are skipped). jsd false:
  // KL(p_teacher || q_student) times temperature^2 (kl_div_logits, beta unused); jsd true: the
  // generalized JSD of beta (0 and 1 the two KLs), no temperature^2. Returns, in the accumulation
  // dtype, the per-row loss (N,) and stats (N, 6) for the backward (kl_div_math.h (5)); 0 for
  // ignored rows.
  m.def(
      "kl_div_fwd(Tensor student, Tensor teacher, Tensor? target, int ignore_index, float temperature, "
      "float beta, bool jsd) -> (Tensor, Tensor)");
  // grad_loss (N,) in the accumulation dtype, any stride. Returns the student's (N, C) gradient and,
  // when teacher_grad, the teacher's (else a (0,) tensor), contiguous, in the inputs' dtype.
  m.def(
      "kl_div_bwd(Tensor grad_loss, Tensor student, Tensor teacher, Tensor? target, Tensor stats, int ignore_index, "
      "float temperature, float beta, bool jsd, bool teacher_grad) -> (Tensor, Tensor)");
}
